"""3D runs through the training loop and `medseg_jax.main`: 8 devices against one on the
same global batch of patches, a run killed and restarted against an uninterrupted one,
and a run's checkpoint against its exported model file."""

import json
import os
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import helpers
from helpers import REPO, checkpoint_arrays, env_with_devices
from medseg_jax.parallel import strategies

NETWORKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_net3d.py")
# The quickstart on 8 phantoms of 24x20x12 voxels, trained on patches of 16x16x8.
# (Each key once: absl appends a repeated tuple override to the first.)
RUN3D = ["--config=configs/quickstart.py", "--config.data.spatial_dims=3",
         "--config.data.synthetic_volumes=8", "--config.data.preprocess_workers=1",
         "--config.train.eval_every_steps=0", "--config.monitor.log_every_steps=1",
         "--config.monitor.enabled=False"]
SMALL = ["--config.data.synthetic_shape=(24, 20, 12)", "--config.data.patch_size=(16, 16, 8)"]
STEPS = 3


def _config(*overrides):
  return helpers.config(*RUN3D[1:], *SMALL, *overrides)


def _train(workdir, devices, per_device, strategy="shard_map"):
  """STEPS steps at the global batch 8 of patches; the LR does not depend on the devices.
  SGD, not Adam: the conv biases before the instance norms have no true gradient, and Adam
  would blow their float noise up to full steps."""
  cfg = _config("--config.model.name=unet3d", "--config.model.depth=1",
                "--config.model.base_features=4", "--config.model.norm=instance",
                "--config.lr.scaling=none", "--config.optim.name=sgd", "--config.optim.lr=0.05",
                f"--config.parallel.num_devices={devices}",
                f"--config.parallel.strategy={strategy}",
                f"--config.train.per_device_batch_size={per_device}",
                "--config.data.augment.samples_per_epoch=16",
                f"--config.train.num_steps={STEPS}", "--config.checkpoint.every_steps=1")
  return helpers.train(cfg, str(workdir))


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The reference: one device, the whole global batch of 8 patches per step."""
  workdir = tmp_path_factory.mktemp("one")
  _train(workdir, 1, 8)
  return workdir


@pytest.mark.parametrize("strategy", strategies.STRATEGIES)
def test_a_3d_run_on_8_devices_equals_one_device(one_device, tmp_path, strategy, devices8):
  """The same patches in every step, split over 8 devices: the losses and the 3D U-Net's
  parameters after STEPS steps are those of one device (the 2D tests' tolerance for runs;
  its instance norm is per patch, so the split does not change an example's output)."""
  _train(tmp_path, 8, 1, strategy)
  np.testing.assert_allclose(_losses(tmp_path), _losses(one_device), rtol=1e-5)
  for step in range(1, STEPS + 1):
    ours, theirs = checkpoint_arrays(tmp_path, step), checkpoint_arrays(one_device, step)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with open(tmp_path / "data_info.json") as f:
    assert json.load(f)["volumes"] == {"train": 6, "val": 1, "test": 1}


# Killed and restarted: as tests/test_fault_tolerance.py, in 3D and with a user's network
# named by file, on 2 of 8 devices as in this process. Dropout makes the step's rng matter; augmented epochs of 12 patches make
# the killed step fall inside an epoch.
KILLED = RUN3D + [*SMALL, f"--config.model.name={NETWORKS}:Tiny3DDropout",
                  "--config.train.per_device_batch_size=2", "--config.parallel.num_devices=2",
                  "--config.data.augment.samples_per_epoch=12",
                  "--config.checkpoint.every_steps=4"]
KILLED_STEPS = 12


def _run(workdir, *extra):
  return subprocess.run([sys.executable, "-m", "medseg_jax.main", *KILLED,
                         f"--config.train.num_steps={KILLED_STEPS}", f"--workdir={workdir}",
                         *extra], cwd=REPO, env=env_with_devices(8), capture_output=True,
                        text=True, timeout=900)


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def test_a_killed_3d_run_restarts_bitwise_equal_to_an_uninterrupted_one(tmp_path):
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "killed")
  helpers.train(helpers.config(*KILLED[1:], f"--config.train.num_steps={KILLED_STEPS}"),
                reference)
  kill = helpers.signal_at(tmp_path, "SIGKILL", 8)
  killed = _run(workdir, kill)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert KILLED_STEPS not in _steps(workdir)
  restarted = _run(workdir, kill)
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert "Resuming from checkpoint at step" in restarted.stderr
  ours, theirs = checkpoint_arrays(workdir, KILLED_STEPS), checkpoint_arrays(reference,
                                                                             KILLED_STEPS)
  assert len(ours) == len(theirs)
  for a, b in zip(ours, theirs):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  losses = _losses(workdir)
  assert len(losses) == KILLED_STEPS and losses == _losses(reference)  # the same patches


# Prediction: an odd eval batch, so the last batch of windows is padded.
PREDICT = [*RUN3D, *SMALL, f"--config.model.name={NETWORKS}:Tiny3D",
           "--config.train.eval_batch_size=3", "--config.train.per_device_batch_size=1"]


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
  """A 3D run trained for 3 steps, and its test volumes predicted on one device (both in
  this process): the reference."""
  workdir = tmp_path_factory.mktemp("predict")
  helpers.train(helpers.config(*PREDICT[1:], "--config.parallel.num_devices=2",
                               "--config.train.num_steps=3"), str(workdir))
  helpers.predict(helpers.config(*PREDICT[1:], "--config.parallel.num_devices=1"),
                  str(workdir), f"{workdir}/data/imagesTs", str(workdir / "one"),
                  probabilities=True)
  return workdir


@pytest.mark.parametrize("devices", [1, 2])
def test_two_processes_predict_3d_what_one_process_predicts(predicted, tmp_path, devices):
  """Each process feeds its own windows of each batch; process 0 writes the result."""
  output = tmp_path / "two"
  launched = subprocess.run(
      ["bash", "launch/local.sh", "2", *PREDICT, f"--workdir={predicted}", "--mode=predict",
       f"--input={predicted}/data/imagesTs", f"--output={output}", "--probabilities"],
      cwd=REPO, env=dict(env_with_devices(), CPU_DEVICES_PER_PROCESS=str(devices)),
      capture_output=True, text=True, timeout=300)
  assert launched.returncode == 0, launched.stderr[-3000:]
  helpers.assert_same_predictions(predicted / "one", output)
  source = nib.load(f"{predicted}/data/imagesTs/phantom_008.nii.gz")
  written = nib.load(output / "phantom_008.nii.gz")
  assert written.shape == source.shape and np.allclose(written.affine, source.affine)


def test_a_3d_model_file_predicts_what_its_run_predicts(predicted, tmp_path):
  """Exported with its 3D settings, the model file predicts the run's labels on every
  device of this process (and the same probabilities with ONNX Runtime on its graph)."""
  from medseg_jax.export import from_file, write  # pylint: disable=import-outside-toplevel
  model_path = str(tmp_path / "model.zip")
  write.export_run(str(predicted), "latest", model_path)
  model = from_file.load(model_path)
  assert model.info["preprocessing"]["spatial_dims"] == 3
  assert model.info["preprocessing"]["patch_size"] == [16, 16, 8]
  assert model.info["target_spacing"] == [1.0, 1.0, 2.0]
  from_file.predict_files(model, f"{predicted}/data/imagesTs", str(tmp_path / "jax"),
                          probabilities=True)
  helpers.assert_same_predictions(predicted / "one", tmp_path / "jax")
  if model.file.onnx is not None:
    from_file.predict_files(model, f"{predicted}/data/imagesTs", str(tmp_path / "onnx"),
                            "onnxruntime", probabilities=True)
    for name in os.listdir(tmp_path / "onnx"):
      if name.endswith("_probs.nii.gz"):
        np.testing.assert_allclose(nib.load(tmp_path / "onnx" / name).get_fdata(),
                                   nib.load(predicted / "one" / name).get_fdata(), atol=1e-5)


# The 3D quickstart command shrunk to seconds: a 2-level 3D U-Net on 16x16x8 patches of
# 6 volumes, augmented, 3 steps, validated at steps 2 and 3.
QUICKSTART = ["--config.data.synthetic_volumes=6", "--config.data.synthetic_shape=(24, 20, 12)",
              "--config.data.patch_size=(16, 16, 8)", "--config.model.depth=2",
              "--config.model.base_features=4", "--config.train.per_device_batch_size=1",
              "--config.data.preprocess_workers=1", "--config.train.num_steps=3",
              "--config.train.eval_every_steps=2", "--config.checkpoint.every_steps=2",
              "--config.monitor.log_every_steps=1", "--config.data.augment.enabled=True",
              "--config.data.augment.rotation_degrees=10.0",
              "--config.data.augment.flip_probability=0.5"]


def _main(cwd, *args):
  command = [sys.executable, "-m", "medseg_jax.main", "--config=configs/quickstart_3d.py"]
  return subprocess.run([*command, *QUICKSTART, *args], cwd=cwd,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=600)


@pytest.fixture(scope="module")
def quickstart3d(tmp_path_factory):
  """The command as the README gives it, from a directory holding configs/."""
  cwd = tmp_path_factory.mktemp("cwd")
  os.symlink(os.path.join(REPO, "configs"), cwd / "configs")
  proc = _main(cwd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return cwd, cwd / "runs" / "quickstart_3d", proc


def test_the_3d_quickstart_trains_validates_and_tests_whole_volumes(quickstart3d):
  _, workdir, proc = quickstart3d
  assert "Workdir: runs/quickstart_3d " in proc.stderr
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert "val_dice" in records[1] and "val_dice" in records[2]
  with open(workdir / "split.json") as f:
    split = json.load(f)
  with open(workdir / "eval" / "test_metrics.json") as f:
    test = json.load(f)
  voxels = len(split["test"]) * 24 * 20 * 12  # at the median spacing: the files' grids
  assert test["num_examples"] == len(split["test"])
  assert sum(c["support"] for c in test["per_class"]) == voxels
  with open(workdir / "manifest.json") as f:
    dataset = json.load(f)["dataset"]
  assert dataset["spatial_dims"] == 3 and dataset["patch_size"] == [16, 16, 8]
  assert dataset["target_spacing"] == [1.0, 1.0, 2.0]
  assert dataset["augmentation"]["enabled"] is True
  with open(workdir / "config.json") as f:
    assert json.load(f)["model"]["name"] == "unet3d"


def test_the_3d_quickstart_logs_its_throughput_in_patches(quickstart3d):
  """A 3D batch holds patches: the log lines, metrics.jsonl and TensorBoard say patches/s,
  the global batch of patches over the logged step time."""
  _, workdir, proc = quickstart3d
  with open(workdir / "manifest.json") as f:
    global_batch = json.load(f)["training"]["global_batch"]
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  for r in records:
    assert not any(key.startswith("slices") for key in r)
    assert r["patches_per_sec"] == pytest.approx(global_batch / r["step_time"], rel=1e-6)
  assert "patches/s" in proc.stderr and "slices/s" not in proc.stderr
  assert "patches drawn per epoch)" in proc.stderr
  acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
  acc.Reload()
  tags = set(acc.Tags()["scalars"])
  assert {"train/patches_per_sec", "train/patches_per_sec_per_device"} <= tags
  assert not any("slices" in tag for tag in tags)


def test_the_3d_quickstart_predicts_its_test_volumes_in_their_space(quickstart3d):
  cwd, workdir, _ = quickstart3d
  proc = _main(cwd, "--mode=predict", f"--input={workdir}/data/imagesTs",
               f"--output={workdir}/predictions", "--checkpoint=best")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in sorted(os.listdir(workdir / "data" / "imagesTs")):
    source, written = (nib.load(workdir / "data" / "imagesTs" / name),
                       nib.load(workdir / "predictions" / name))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}


def test_the_3d_quickstart_evaluates_its_best_checkpoint(quickstart3d):
  _, workdir, _ = quickstart3d
  cfg = helpers.config(*QUICKSTART, path="configs/quickstart_3d.py")
  result = helpers.evaluate(cfg, workdir, "best")
  with open(workdir / "eval" / "test_metrics.json") as f:
    assert json.load(f) == json.loads(json.dumps(result["test"]))
  assert result["val"]["per_volume"]["hd95_1"]["count"] <= result["val"]["num_examples"]


# Two processes against one: a user's 3D network named by file (with dropout: the step's
# rng matters) trained with SGD for 2 steps on 4 devices, 2 x 2 or 1 x 4, on every volume
# (evaluation across processes is the prediction tests' part).
TWO = [*RUN3D, *SMALL, f"--config.model.name={NETWORKS}:Tiny3DDropout",
       "--config.optim.name=sgd", "--config.optim.lr=0.05",
       "--config.train.per_device_batch_size=1", "--config.train.num_steps=2",
       "--config.checkpoint.every_steps=1", "--config.data.augment.samples_per_epoch=8",
       "--config.data.val_fraction=0", "--config.data.test_fraction=0"]


def test_two_processes_train_3d_like_one_with_the_same_global_batch(tmp_path):
  """Each process reads its own patches of every global batch; the parameters after each
  step are those of one process on as many devices (the 2D test's tolerance)."""
  two, one = tmp_path / "two", tmp_path / "one"
  launched = subprocess.run(["bash", "launch/local.sh", "2", *TWO, f"--workdir={two}"],
                            cwd=REPO, env=dict(env_with_devices(), CPU_DEVICES_PER_PROCESS="2"),
                            capture_output=True, text=True, timeout=600)
  assert launched.returncode == 0, launched.stderr[-3000:]
  helpers.train(helpers.config(*TWO[1:], "--config.parallel.num_devices=4"), str(one))
  for step in (1, 2):
    for a, b in zip(checkpoint_arrays(two, step, "params"), checkpoint_arrays(one, step, "params")):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
