"""TensorBoard events read back with TensorBoard's reader, the manifest, and determinism:
runs of the training loop in this process, and one run of two real processes."""

import glob
import json
import os
import socket
import subprocess
import sys

import jax
import pytest
import tensorboardX
from tensorboard.backend.event_processing import event_accumulator

import helpers
from helpers import REPO, TINY as TINY_RUN, env_with_devices
from test_models import unet_params

HOST = socket.gethostname()  # the test's processes all run on this host
TINY = TINY_RUN + ["--config.model.dropout=0.2", "--config.train.num_steps=6",
                   "--config.train.eval_every_steps=3", "--config.monitor.log_every_steps=2",
                   "--config.monitor.system_interval_seconds=0.2"]


def train(workdir, *extra):
  """The loop in this process on 2 devices, as `medseg_jax.main` runs it; the records of
  metrics.jsonl."""
  cfg = helpers.config(*TINY[1:], "--config.parallel.num_devices=2", *extra)
  helpers.train(cfg, workdir, False)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  return workdir, train(workdir)


def test_event_files_hold_the_training_and_evaluation_tags(run):
  workdir, records = run
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"),
                                           size_guidance={event_accumulator.SCALARS: 0,
                                                          event_accumulator.IMAGES: 0})
  acc.Reload()
  scalars = set(acc.Tags()["scalars"])
  for tag in ("train/loss", "train/loss_ema_0.9", "train/loss_ema_0.99", "train/loss_ema_0.999",
              "train/learning_rate", "train/grad_norm", "train/slices_per_sec",
              "train/slices_per_sec_per_device", "train/step_time", "train/data_wait_time",
              "train/compute_time", "val/dice", "val/mean_iou", "test/dice",
              f"system/{HOST}/cpu_percent", f"system/{HOST}/host_memory_used_gib"):
    assert tag in scalars, tag
  assert {"val/overlay", "test/overlay"} <= set(acc.Tags()["images"])
  losses = acc.Scalars("train/loss")
  assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]
  # Every loss in the events matches the window means logged in metrics.jsonl.
  by_step = {r["step"]: r["loss"] for r in records if "loss" in r}
  for end in (2, 4, 6):
    window = [e.value for e in losses if end - 2 < e.step <= end]
    assert sum(window) / 2 == pytest.approx(by_step[end], rel=1e-6)
  # The smoothed curves are exponential moving averages of the raw loss.
  for decay in (0.9, 0.99, 0.999):
    ema = None
    for raw, smooth in zip(losses, acc.Scalars(f"train/loss_ema_{decay}")):
      ema = raw.value if ema is None else decay * ema + (1 - decay) * raw.value
      assert smooth.value == pytest.approx(ema, rel=1e-5)


def test_system_samples_reach_metrics_jsonl(run):
  _, records = run
  assert any(f"system/{HOST}/cpu_percent" in r for r in records)
  timed = [r for r in records if "step_time" in r]
  for r in timed:
    assert r["data_wait_time"] + r["compute_time"] == pytest.approx(r["step_time"])


def test_manifest_covers_the_reproducibility_checklist(run):
  workdir, _ = run
  with open(os.path.join(workdir, "manifest.json")) as f:
    m = json.load(f)
  required = {
      "config": ["model", "optim", "lr", "train", "data", "seed"],
      "code": ["commit", "dirty"],
      "software": ["python", "packages"],
      "hardware": ["backend", "device_kinds", "devices", "processes", "host_cpu",
                   "host_cpu_cores", "host_memory_gib", "accelerators"],
      "dataset": ["name", "modalities_used", "image_size", "volumes", "slices", "split",
                  "normalisation", "augmentation", "fingerprint", "slices_per_volume"],
      "model": ["name", "parameters"],
      "training": ["devices", "global_batch", "steps", "epochs", "optimizer"],
      "lr_policy": ["policy", "scaling", "k", "peak_lr", "phases"],
      "seeds": ["seed"],
      "final_metrics": ["test"],
  }
  for section, keys in required.items():
    for key in keys:
      assert key in m[section], (section, key)
  assert m["runs"] == {"count": 1, "seeds": [0]}  # a run on its own: once, with its seed
  assert m["wall_time_seconds"] > 0 and m["training"]["devices"] == 2
  assert m["hardware"]["devices"] == jax.device_count()  # the machine's, not the run's
  # quickstart's label_map (0, 1, 1) merges the synthetic labels oedema and tumour.
  assert m["dataset"]["classes"] == ["background", "oedema+tumour"]
  assert m["software"]["packages"]["jax"] and m["code"]["commit"]
  assert {"dice", "mean_accuracy", "mean_iou"} <= m["final_metrics"]["test"].keys()
  assert m["model"]["parameters"] == unet_params(1, 4, 1, 2)  # the tiny U-Net, by hand
  assert m["dataset"]["volumes"] == {"train": 4, "val": 1, "test": 1}
  with open(os.path.join(workdir, "MANIFEST.md")) as f:
    text = f.read()
  for section in required:
    assert f"## {section.replace('_', ' ')}" in text


def test_same_seed_same_losses_other_seed_other_losses(run, tmp_path):
  _, first = run
  losses = lambda records: [r["loss"] for r in records if "loss" in r]
  assert losses(train(str(tmp_path / "again"))) == losses(first)
  assert losses(train(str(tmp_path / "seed1"), "--config.seed=1")) != losses(first)


def test_two_processes_record_a_sample_of_each_host(tmp_path):
  """Each process samples its own host; process 0 records both, named by host and process
  (the two share this machine's hostname). Steps 2 and 3 are profiled (by process 0)."""
  env = dict(env_with_devices(None), CPU_DEVICES_PER_PROCESS="1")
  proc = subprocess.run(["bash", "launch/local.sh", "2", *TINY, f"--workdir={tmp_path}",
                         "--config.train.eval_every_steps=0",
                         "--config.monitor.profile_steps=(2, 3)"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  traces = glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert [os.path.basename(t) for t in traces] == [f"{HOST}.xplane.pb"]
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"),
                                           size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  for host in (f"{HOST}-p0", f"{HOST}-p1"):
    for quantity in ("cpu_percent", "host_memory_used_gib", "host_memory_percent"):
      key = f"system/{host}/{quantity}"
      logged = {r["step"]: r[key] for r in records if key in r}
      assert logged, key
      events = {e.step: e.value for e in acc.Scalars(key)}
      assert events.keys() == logged.keys()
      for step, value in logged.items():
        assert events[step] == pytest.approx(value, rel=1e-6)
  assert not [k for r in records for k in r if k.startswith("system/") and
              k.split("/")[1] not in (f"{HOST}-p0", f"{HOST}-p1")]


def test_the_tensorboardx_internals_the_full_disk_guard_wraps_are_there(tmp_path):
  """events._stop_on_full_disk reaches tensorboardX's record writer through private
  attributes; requirements.txt pins tensorboardX exactly for that. An upgrade that moves
  them fails here, by name, rather than as a hang on the next full disk."""
  with open(os.path.join(REPO, "requirements.txt")) as f:
    pinned = next(line.split("==")[1].split()[0] for line in f
                  if line.startswith("tensorboardX=="))
  assert tensorboardX.__version__ == pinned, (
      f"tensorboardX {tensorboardX.__version__} is installed, {pinned} pinned: check that "
      "monitor/events.py's _stop_on_full_disk still reaches its record writer, then re-pin")
  writer = tensorboardX.SummaryWriter(logdir=str(tmp_path))
  try:
    # pylint: disable-next=protected-access
    records = writer._get_file_writer().event_writer._ev_writer._py_recordio_writer
    assert all(callable(getattr(records, name)) for name in ("write", "flush", "close"))
    assert os.path.dirname(records.path) == str(tmp_path)  # the object that owns the file
  finally:
    writer.close()


def test_the_event_writer_starts_without_pytorch(tmp_path):
  """events.summary_writer keeps tensorboardX from importing an installed PyTorch (1.3 s of
  every run's start-up); the events it writes read back with TensorBoard's reader. Where
  PyTorch is not installed there is nothing to keep out."""
  pytest.importorskip("torch")
  code = ("import sys; from medseg_jax.monitor import events; "
          f"w = events.summary_writer({str(tmp_path)!r}); w.add_scalar('loss', 0.5, 3); "
          "w.close(); print('torch' in sys.modules)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "False"
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={
      event_accumulator.SCALARS: 0})
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(3, 0.5)]
