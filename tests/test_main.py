"""The entry point, end to end through real processes: outputs, resume, and flag errors;
evaluation and prediction of its run in this process."""

import csv
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import pytest

import helpers
from helpers import REPO, TINY as TINY_RUN
from medseg_jax.errors import MedsegError

# Without --config: the tests name the config file themselves.
TINY = TINY_RUN[1:] + ["--config.train.num_steps=3", "--config.train.eval_every_steps=2",
                       "--config.checkpoint.every_steps=2", "--config.monitor.log_every_steps=1"]


def run_main(*args, timeout=300, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "medseg_jax.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory):
  """A directory to run the commands from, as from the repository: configs/ is there."""
  cwd = tmp_path_factory.mktemp("cwd")
  os.symlink(os.path.join(REPO, "configs"), cwd / "configs")
  return str(cwd)


@pytest.fixture(scope="module")
def quickstart_run(quickstart_dir):
  """The quickstart command as the README gives it, without --workdir."""
  proc = run_main("--config=configs/quickstart.py", *TINY, cwd=quickstart_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Workdir: runs/quickstart " in proc.stderr
  return os.path.join(quickstart_dir, "runs", "quickstart"), proc


def _best_step(records: list[dict]) -> int:
  """The step with the best validation Dice in metrics.jsonl (the first of equal ones)."""
  val_dice = {r["step"]: r["val_dice"] for r in records if "val_dice" in r}
  return max(val_dice, key=lambda k: (val_dice[k], -k))


def test_quickstart_writes_its_outputs(quickstart_run):
  workdir, _ = quickstart_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3]
  for r in records:
    assert {"loss", "learning_rate", "slices_per_sec"} <= r.keys()
  assert "val_dice" in records[1] and "val_dice" in records[2]
  assert records[0]["learning_rate"] == pytest.approx(2e-3 * 8)  # linear rule, k = 8 devices
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["train"]["num_steps"] == 3 and config["model"]["name"] == "unet"
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
  best = [str(_best_step(records))]
  # A step carries orbax's metrics (its Dice) only if its validation beat every earlier one.
  with_dice = sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints"))
                     if os.path.exists(os.path.join(workdir, "checkpoints", n, "metrics")))
  assert with_dice == (["2", "3"] if records[2]["val_dice"] > records[1]["val_dice"] else ["2"])
  montages = sorted(os.listdir(os.path.join(workdir, "eval", "montage")))
  assert montages == [f"test_step000000{best[0]}.png", "val_step0000002.png",
                      "val_step0000003.png"]
  with open(os.path.join(workdir, "eval", "montage", montages[0]), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_files_count_every_slice_of_the_split(quickstart_run, split):
  workdir, _ = quickstart_run
  with open(os.path.join(workdir, "eval", f"{split}_metrics.json")) as f:
    result = json.load(f)
  assert {"dice", "pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou", "per_class",
          "step", "num_examples"} <= result.keys()
  with open(os.path.join(workdir, "split.json")) as f:
    subjects = json.load(f)[split]
  depth = sum(nib.load(os.path.join(workdir, "data", "labelsTr", f"{s}.nii.gz")).shape[2]
              for s in subjects)
  assert result["num_examples"] == depth
  assert sum(c["support"] for c in result["per_class"]) == depth * 32 * 32
  with open(os.path.join(workdir, "eval", f"{split}_per_volume.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["volume"] for r in rows] == subjects
  assert result["per_volume"]["dice_1"]["count"] <= len(subjects)


def test_restart_resumes_where_the_checkpoint_left_off(quickstart_run, quickstart_dir):
  """Losing the last checkpoint costs one step; the same command (default workdir)
  reproduces it exactly."""
  workdir, _ = quickstart_run
  with open(os.path.join(workdir, "eval", "val_metrics.json")) as f:
    before = json.load(f)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  proc = run_main("--config=configs/quickstart.py", *TINY, cwd=quickstart_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resuming from checkpoint at step 2" in proc.stderr
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]  # nothing logged twice
  with open(os.path.join(workdir, "eval", "val_metrics.json")) as f:
    after = json.load(f)
  assert after["step"] == before["step"] == 3
  assert after["per_class"] == before["per_class"]  # same batches, same rng, same result
  helpers.evaluate(helpers.config(*TINY), workdir, "best")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    best = _best_step([json.loads(line) for line in f])
  with open(os.path.join(workdir, "eval", "test_metrics.json")) as f:
    assert json.load(f)["step"] == best


def _one_error_line(proc):
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_misspelt_override_key_is_one_line_exit_2(tmp_path):
  proc = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path}",
                  "--config.train.num_stepz=3")
  assert "num_stepz" in _one_error_line(proc)
  assert not os.listdir(tmp_path)


def test_wrong_type_is_one_line_exit_2(tmp_path):
  proc = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path}",
                  "--config.train.num_steps=many")
  assert "num_steps" in _one_error_line(proc)


def test_missing_config_file_is_one_line_exit_2(tmp_path):
  proc = run_main("--config=configs/nope.py", f"--workdir={tmp_path}")
  assert "configs/nope.py" in _one_error_line(proc)


@pytest.mark.parametrize("override,existing", [("train.loss=focal", False),
                                               ("parallel.strategy=horovod", True)])
def test_bad_config_value_is_one_line_exit_2_before_any_data_work(tmp_path, override,
                                                                  existing):
  """The whole config is checked first: no dataset, slice store or workdir file appears."""
  workdir = tmp_path / "run"
  if existing:
    workdir.mkdir()
  proc = run_main("--config=configs/quickstart.py", f"--workdir={workdir}", *TINY,
                  f"--config.{override}")
  assert _one_error_line(proc).startswith(f"error: {override.split('=')[0]}=")
  assert (os.listdir(workdir) == []) if existing else not workdir.exists()


def test_misspelt_data_root_is_not_found_even_with_synthetic_data(tmp_path):
  """The quickstart sets data.synthetic=True; a data.root that does not exist is an error,
  not a place to write a synthetic dataset."""
  root = tmp_path / "Task01_BrainTumor"
  proc = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path / 'run'}", *TINY,
                  f"--config.data.root={root}")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"error: {root}/dataset.json: not found")
  assert os.listdir(tmp_path) == []


def test_predict_writes_label_maps_in_the_input_space(quickstart_run, tmp_path):
  workdir, _ = quickstart_run
  images = os.path.join(workdir, "data", "imagesTs")
  out = str(tmp_path / "pred")
  helpers.predict(helpers.config(*TINY), workdir, images, out)
  names = sorted(os.listdir(images))
  assert sorted(os.listdir(out)) == names
  for name in names:
    src, dst = nib.load(os.path.join(images, name)), nib.load(os.path.join(out, name))
    assert dst.shape == src.shape and dst.get_data_dtype() == "uint8"
    assert (dst.affine == src.affine).all()
    assert set(map(int, dst.get_fdata().ravel())) <= {0, 1}
  with pytest.raises(MedsegError, match="--overwrite") as error:
    helpers.predict(helpers.config(*TINY), workdir, images, out)
  assert error.value.exit_code == 1


def test_predict_without_a_checkpoint_is_one_line(tmp_path):
  proc = run_main("--config=configs/quickstart.py", f"--workdir={tmp_path / 'none'}",
                  "--mode=predict", f"--input={tmp_path}", f"--output={tmp_path / 'o'}")
  assert proc.returncode == 1 and "no checkpoint" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "o")


def test_cpu_devices_launcher_trains_on_n_devices(tmp_path):
  env = helpers.env_with_devices(None)
  proc = subprocess.run(["bash", "launch/cpu_devices.sh", "2", "--config=configs/quickstart.py",
                         f"--workdir={tmp_path}", *TINY, "--config.train.num_steps=1"],
                        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "metrics.jsonl") as f:
    record = json.loads(f.readline())
  assert record["learning_rate"] == pytest.approx(2e-3 * 2)  # linear rule with k = 2 devices
