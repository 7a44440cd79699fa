"""The scaling study on tiny data, and the LR-policy command, through real processes."""

import csv
import json
import os
import subprocess
import sys

import pytest
from scipy import stats

from helpers import REPO, TINY as TINY_RUN, env_with_devices
from medseg_jax.tuning import study

TINY = TINY_RUN[1:] + ["--config.train.num_epochs=1", "--config.train.eval_every_steps=0"]


def run(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=env_with_devices(None))


def _guideline_dir(tmp_path, source="configs/quickstart.py"):
  """A guideline tuner's chosen config as it writes it: the quickstart with its changes
  (optim.lr lowered, and the TINY overrides it was tuned with)."""
  directory = tmp_path / "tuned"
  directory.mkdir()
  changes = {"parallel.num_devices": 8, "lr.policy": "grescale", "optim.lr": 0.001, "seed": 0,
             "data.split_seed": 0, "train.num_epochs": 1}
  (directory / "guideline_config.py").write_text(
      "import importlib.util\nimport os\n\n"
      f"SOURCE = {os.path.relpath(os.path.join(REPO, source), directory)!r}\n"
      f"VARIANT = None\nCHANGES = {changes!r}\n\n\n"
      "def get_config():\n"
      "  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), SOURCE)\n"
      "  spec = importlib.util.spec_from_file_location('source', path)\n"
      "  module = importlib.util.module_from_spec(spec)\n"
      "  spec.loader.exec_module(module)\n"
      "  c = module.get_config()\n"
      "  for key, value in CHANGES.items():\n"
      "    *parents, leaf = key.split('.')\n"
      "    node = c\n"
      "    for part in parents:\n"
      "      node = node[part]\n"
      "    node[leaf] = value\n"
      "  return c\n")
  return directory


def test_two_device_counts_two_policies_and_the_guideline_study(tmp_path):
  """The baseline on 1 and 2 devices, GreScale and the guideline's choice on 2 only."""
  args = ["--config=configs/quickstart.py", "--devices=1,2",
          "--policies=linear,grescale,guideline", f"--guideline={_guideline_dir(tmp_path)}",
          "--baseline_only_on_fewest", "--seeds=1", f"--workdir={tmp_path}", *TINY]
  proc = run("medseg_jax.tuning.study", *args)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  with open(tmp_path / "study.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted((r["policy"], r["devices"]) for r in rows) == [
      ("grescale", "2"), ("guideline", "2"), ("linear", "1"), ("linear", "2")]
  base = None
  for r in rows:
    with open(tmp_path / "runs" / f"{r['policy']}_dev{r['devices']}_seed0" / "eval" /
              "test_metrics.json") as f:
      test = json.load(f)
    assert float(r["dice"]) == pytest.approx(test["dice"])
    if (r["policy"], r["devices"]) == ("linear", "1"):
      base = test["dice"]
  for r in rows:  # one seed: the paired difference is that seed's, with no interval
    if (r["policy"], r["devices"]) == ("linear", "1"):
      assert r["verdict"] == "baseline" and r["dice_diff"] == ""
    else:
      assert float(r["dice_diff"]) == pytest.approx(float(r["dice"]) - base)
      assert r["pairs"] == "1" and r["dice_diff_low"] == r["verdict"] == ""
    name = f"{r['policy']}_dev{r['devices']}_seed0"
    with open(tmp_path / "runs" / name / "manifest.json") as f:
      assert json.load(f)["runs"] == {"count": 1, "seeds": [0], "tool": "medseg_jax.tuning.study",
                                      "group": f"{r['policy']} on {r['devices']} devices"}
  with open(tmp_path / "runs" / "grescale_dev2_seed0" / "config.json") as f:
    config = json.load(f)
  assert config["lr"]["policy"] == "grescale" and config["parallel"]["num_devices"] == 2
  with open(tmp_path / "runs" / "guideline_dev2_seed0" / "config.json") as f:
    config = json.load(f)
  assert config["lr"]["policy"] == "grescale" and config["optim"]["lr"] == 0.001
  assert config["parallel"]["num_devices"] == 2 and config["seed"] == 0  # the study's own
  assert config["data"]["image_size"] == 32  # the study's overrides of unchanged keys
  assert f"--config={tmp_path / 'tuned' / 'guideline_config.py'}" in proc.stdout
  summary, by_seed = (tmp_path / "study.md").read_text().split("Test Dice per seed:")
  assert summary.count("\n| ") == 5 and by_seed.count("\n| ") == 5  # header + 4 rows each
  assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
  again = run("medseg_jax.tuning.study", *args)  # complete runs skipped, the table rebuilt
  assert again.returncode == 0 and "[study] grescale" not in again.stdout


# Hand-made per-seed test Dice: the baseline (linear on 1 device) and four 8-device policies.
HAND = {("linear", 1): [0.80, 0.82, 0.81, 0.79, 0.83],
        ("linear", 8): [0.78, 0.81, 0.78, 0.78, 0.80],          # differences -.02 -.01 -.03 -.01 -.03
        ("grescale", 8): [0.81, 0.81, 0.82, 0.80, 0.84],        # .01 -.01 .01 .01 .01
        ("linear_gradual", 8): [0.82, 0.84, 0.83, 0.81, 0.85],  # .02 every seed
        ("sqrt", 8): [0.79, 0.80, None]}                        # seed 2 diverged, no Dice
# By hand, mean d, sample std s, t(0.975, n - 1) from a printed table, d ± t s / sqrt(n):
# linear: d = -0.02, s = 0.01, t(4) = 2.776445: half 0.0124166.
# grescale: d = 0.006, s = sqrt(320e-6 / 4) = 0.0089443: half 0.0111058.
# sqrt: n = 2, d = -0.015, s = 0.0070711, t(1) = 12.706205: half 0.0635310.
EXPECTED = {("linear", 8): (5, -0.02, -0.0324166, -0.0075834, "loses"),
            ("grescale", 8): (5, 0.006, -0.0051058, 0.0171058, "matches"),
            ("linear_gradual", 8): (5, 0.02, 0.02, 0.02, "wins"),
            ("sqrt", 8): (2, -0.015, -0.0785310, 0.0485310, "matches")}


def _hand_rows():
  rows = []
  for (policy, devices), values in HAND.items():
    for seed, dice in enumerate(values):
      row = {"policy": policy, "devices": devices, "seed": seed, "train_seconds": 1.0,
             **{m: dice for m in study.METRICS}}
      rows.append(dict(row, diverged=True) if dice is None else row)
  return rows


def test_paired_interval_on_hand_made_results(tmp_path):
  study.write_reports(str(tmp_path), _hand_rows(), "linear")
  with open(tmp_path / "study.csv") as f:
    table = {(r["policy"], int(r["devices"])): r for r in csv.DictReader(f)}
  assert table[("linear", 1)]["verdict"] == "baseline"
  for key, (pairs, diff, low, high, verdict) in EXPECTED.items():
    r = table[key]
    assert int(r["pairs"]) == pairs and r["verdict"] == verdict, key
    assert float(r["dice_diff"]) == pytest.approx(diff, abs=1e-9)
    assert float(r["dice_diff_low"]) == pytest.approx(low, abs=2e-7)
    assert float(r["dice_diff_high"]) == pytest.approx(high, abs=2e-7)
    if low != high:  # and scipy's paired t-test agrees (it has no interval at std 0)
      a = [d for d in HAND[key] if d is not None]
      reference = stats.ttest_rel(a, HAND[("linear", 1)][:len(a)]).confidence_interval(0.95)
      assert (float(r["dice_diff_low"]), float(r["dice_diff_high"])) == pytest.approx(
          (reference.low, reference.high), abs=1e-9)
  sqrt = table[("sqrt", 8)]  # the diverged run without Dice: counted, outside the means
  assert (sqrt["runs"], sqrt["diverged"]) == ("3", "1")
  assert float(sqrt["dice"]) == pytest.approx(0.795)
  text = (tmp_path / "study.md").read_text()
  assert "95% t interval" in text and "Student's t" in text
  assert "| linear | 8 | 5 | 0 |" in text and "| — (diverged) |" in text


DIVERGING = ["--config.optim.name=sgd", "--config.optim.lr=1e8"]  # NaN at the second step


def test_diverged_runs_are_rows_with_the_dice_of_their_best_checkpoint(tmp_path):
  """Validating every step, each run keeps a best checkpoint (step 1) before the guard
  stops it at step 2: a row marked diverged, with that checkpoint's test Dice. Both seeds
  have the same split."""
  args = ["--config=configs/quickstart.py", "--devices=1", "--policies=linear", "--seeds=2",
          f"--workdir={tmp_path}", *TINY, "--config.train.eval_every_steps=1", *DIVERGING]
  proc = run("medseg_jax.tuning.study", *args)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  rows = json.loads((tmp_path / "study_runs.json").read_text())
  assert [(r["seed"], r["diverged"]) for r in rows] == [(0, True), (1, True)]
  for r in rows:
    workdir = tmp_path / "runs" / f"linear_dev1_seed{r['seed']}"
    test = json.loads((workdir / "eval" / "test_metrics.json").read_text())
    assert test["step"] == 1 and r["dice"] == pytest.approx(test["dice"])
    assert r["error"].startswith("error: training diverged at step 2")
    assert json.loads((workdir / "manifest.json").read_text())["runs"]["count"] == 2
  splits = [(tmp_path / "runs" / f"linear_dev1_seed{s}" / "split.json").read_text()
            for s in (0, 1)]
  assert splits[0] == splits[1]
  with open(tmp_path / "study.csv") as f:
    (entry,) = csv.DictReader(f)
  assert (entry["runs"], entry["diverged"]) == ("2", "2")
  assert float(entry["dice"]) == pytest.approx(sum(r["dice"] for r in rows) / 2)
  assert "(diverged)" in (tmp_path / "study.md").read_text()
  again = run("medseg_jax.tuning.study", *args)  # a diverged run is a result: not retried
  assert again.returncode == 0 and "[study]" not in again.stdout
  assert json.loads((tmp_path / "study_runs.json").read_text()) == rows


def test_a_run_diverged_before_any_validation_is_a_row_without_dice(tmp_path):
  proc = run("medseg_jax.tuning.study", "--config=configs/quickstart.py", "--devices=1",
             "--policies=linear", "--seeds=1", f"--workdir={tmp_path}", *TINY, *DIVERGING)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  (row,) = json.loads((tmp_path / "study_runs.json").read_text())
  assert row["diverged"] and row["dice"] is None
  assert not (tmp_path / "runs" / "linear_dev1_seed0" / "eval" / "test_metrics.json").exists()
  with open(tmp_path / "study.csv") as f:
    (entry,) = csv.DictReader(f)
  assert (entry["runs"], entry["diverged"], entry["dice"]) == ("1", "1", "")
  assert "| — (diverged) |" in (tmp_path / "study.md").read_text()


def test_guideline_policy_without_its_directory_is_one_line(tmp_path):
  proc = run("medseg_jax.tuning.study", "--config=configs/quickstart.py",
             "--policies=linear,guideline", f"--workdir={tmp_path}")
  assert proc.returncode == 2 and "--guideline=DIR" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  proc = run("medseg_jax.tuning.study", "--config=configs/quickstart.py",
             "--policies=linear,guideline", f"--guideline={tmp_path / 'none'}",
             f"--workdir={tmp_path}", *TINY)
  assert proc.returncode == 1 and "guideline_config.py: cannot read" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
  proc = run("medseg_jax.tuning.study", "--config=configs/large_batch_study.py",
             "--policies=linear,guideline", f"--guideline={_guideline_dir(tmp_path)}",
             f"--workdir={tmp_path}", *TINY)
  assert proc.returncode == 2 and "builds on" in proc.stderr and "quickstart.py" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_unknown_policy_is_one_line(tmp_path):
  proc = run("medseg_jax.tuning.study", "--config=configs/quickstart.py",
             "--policies=linear,fancy", f"--workdir={tmp_path}")
  assert proc.returncode == 2 and "fancy" in proc.stderr.strip()
  assert len(proc.stderr.strip().splitlines()) == 1


def test_help_lists_the_flags():
  proc = run("medseg_jax.tuning.study", "--help", timeout=120)
  assert "error:" not in proc.stderr
  for name in ("config", "workdir", "devices", "policies", "seeds", "baseline_policy",
               "guideline", "[no]baseline_only_on_fewest"):
    assert f"--{name}:" in proc.stdout, name


def test_lr_policy_command_prints_phases_and_plots(tmp_path):
  png = tmp_path / "lr.png"
  proc = run("medseg_jax.tuning.schedule", "--config=configs/unet_brats.py", "--num_devices=8",
             "--train_slices=5600", "--config.lr.policy=grescale", f"--plot={png}")
  assert proc.returncode == 0, proc.stderr
  # 5600 slices / (7 x 8) = 100 steps per epoch; 100 epochs; decay 3/7 of 95 epochs.
  phases = {line.split()[0]: line.split()[2] for line in proc.stdout.splitlines()
            if line.startswith("  ")}
  assert phases == {"warmup": "0-500", "stabilisation": "500-5929", "decay": "5929-10000"}
  assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("action,after", [
    # 100 steps/epoch as above; one more warmup epoch takes 100 steps from the stabilisation;
    # 8e-5 held at half, decay to 4e-5 / (1 + 0.1 x 40.7 epochs).
    ("increase_warmup", {"warmup": ("0-600", "1e-05", "8e-05"),
                         "stabilisation": ("600-5929", "4e-05", "4e-05"),
                         "decay": ("5929-10000", "4e-05", "7.89e-06")}),
    # optim.lr 1e-5 -> 5e-6: the same phases at half the LR (decay end 2e-5 / (1 + 0.1 x 40.7)).
    ("decrease_initial_lr", {"warmup": ("0-500", "5e-06", "4e-05"),
                             "stabilisation": ("500-5929", "2e-05", "2e-05"),
                             "decay": ("5929-10000", "2e-05", "3.945e-06")}),
])
def test_lr_plot_before_and_after_a_guideline_action(tmp_path, action, after):
  png = tmp_path / "lr.png"
  proc = run("medseg_jax.tuning.schedule", "--config=configs/unet_brats.py", "--num_devices=8",
             "--train_slices=5600", "--config.lr.policy=grescale", f"--plot={png}",
             f"--after_action={action}")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(f"after {action} ("))
  phases = {line.split()[0]: (line.split()[2], line.split()[6], line.split()[8])
            for line in lines[start:] if line.startswith("  ")}
  assert phases == after
  assert png.read_bytes()[:4] == b"\x89PNG"


def test_lr_plot_after_an_action_needs_grescale(tmp_path):
  proc = run("medseg_jax.tuning.schedule", "--config=configs/unet_brats.py", "--num_devices=8",
             "--train_slices=5600", "--after_action=increase_warmup", f"--plot={tmp_path}/a.png")
  assert proc.returncode == 2 and "lr.policy" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "a.png").exists()


def test_lr_plot_of_a_constant_schedule(tmp_path):
  png = tmp_path / "lr.png"
  proc = run("medseg_jax.tuning.schedule", "--config=configs/unet_brats.py", "--num_devices=8",
             "--train_slices=33880", f"--plot={png}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "605 steps/epoch" in proc.stdout  # 33880 / (7 x 8)
  assert png.read_bytes()[:4] == b"\x89PNG"


def test_lr_plan_without_the_dataset_names_train_slices(tmp_path):
  proc = run("medseg_jax.tuning.schedule", "--config=configs/unet_brats.py", "--num_devices=8",
             f"--config.data.root={tmp_path / 'absent'}")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
  assert "dataset.json: not found" in lines[0] and "--train_slices" in lines[0]


def test_lr_plan_counts_the_slices_training_uses(tmp_path):
  from test_data import _four_subjects_one_without_label  # pylint: disable=import-outside-toplevel
  root = _four_subjects_one_without_label(tmp_path)
  proc = run("medseg_jax.tuning.schedule", "--config=configs/unet_brats.py", "--num_devices=1",
             f"--config.data.root={root}", f"--config.data.cache_dir={tmp_path / 'cache'}",
             "--config.data.skip_invalid=True", "--config.data.label_map=(0, 1, 1)",
             "--config.data.slices_per_volume=0", "--config.data.image_size=16",
             "--config.data.val_fraction=0.25", "--config.data.test_fraction=0.0",
             "--config.data.preprocess_workers=1", "--config.train.per_device_batch_size=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  # By hand: s2 has no label and is skipped; one of the other three is validation.
  assert "12 training slices" in proc.stdout and "6 steps/epoch" in proc.stdout
