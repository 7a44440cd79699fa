"""`data.split_seed`: the split (and the synthetic data) held fixed while `seed` varies."""

import json
import subprocess
import sys

import numpy as np
import pytest

import helpers
from helpers import REPO, TINY, config, env_with_devices
from medseg_jax import config as config_check
from medseg_jax.data import split
from medseg_jax.errors import ConfigError
from medseg_jax.tuning import guideline
from medseg_jax.tuning.guideline_settings import Settings

NAMES = [f"phantom_{i:03d}" for i in range(6)]  # TINY's six synthetic volumes


def hand_split(seed):
  """By hand: the six subjects in numpy's permutation for `seed`; val 15% and test 15% of
  six round to one subject each, the rest train."""
  order = np.random.default_rng(seed).permutation(6)
  chosen = [NAMES[i] for i in order]
  return {"val": chosen[:1], "test": chosen[1:2], "train": chosen[2:]}


def load(tmp_path, name, *overrides):
  """The split and one image file's bytes of a run of TINY in tmp_path/name."""
  workdir = tmp_path / name
  sets, info = helpers.load_splits(config(*TINY[1:], *overrides), workdir)
  recorded = json.loads((workdir / "split.json").read_text())
  assert {s: sets[s].names for s in split.SPLITS} == recorded
  image = (workdir / "data" / "imagesTr" / "phantom_000.nii.gz").read_bytes()
  return recorded, image, info


def test_split_follows_seed_unless_split_seed_is_set(tmp_path):
  assert hand_split(0) != hand_split(1)  # else the test could not tell the cases apart
  plain = {s: load(tmp_path, f"seed{s}", f"--config.seed={s}") for s in (0, 1)}
  for s in (0, 1):  # unset: the split follows `seed`, as it did before the key existed
    assert plain[s][0] == hand_split(s)
  assert plain[0][1] != plain[1][1]  # ... and so does the synthetic data
  fixed = {s: load(tmp_path, f"fixed{s}", f"--config.seed={s}", "--config.data.split_seed=1")
           for s in (0, 3)}
  for s in (0, 3):
    assert fixed[s][0] == hand_split(1)
    assert fixed[s][1] == plain[1][1]  # the data of seed 1, whatever `seed` is


def test_split_seed_is_recorded_in_the_manifest(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "medseg_jax.main", *TINY, "--config.train.num_steps=2",
       "--config.train.eval_every_steps=0", "--config.seed=3", "--config.data.split_seed=1",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=env_with_devices(1))
  assert proc.returncode == 0, proc.stderr[-2000:]
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  assert manifest["seeds"]["seed"] == 3 and manifest["seeds"]["split_seed"] == 1
  assert "data.split_seed (1)" in manifest["seeds"]["derived"]
  assert manifest["dataset"]["split"]["seed"] == 1
  assert manifest["config"]["data"]["split_seed"] == 1
  assert json.loads((tmp_path / "split.json").read_text()) == hand_split(1)


def test_a_negative_split_seed_is_a_config_error(devices8):
  with pytest.raises(ConfigError, match=r"^data\.split_seed=-1: must be at least 0"):
    config_check.check(config(*TINY[1:], "--config.data.split_seed=-1"))


class Recorder:
  """A trainer for the guideline that reaches the baseline at once; records the calls."""

  def __init__(self):
    self.calls = []

  def __call__(self, name, overrides):
    self.calls.append((name, overrides))
    m = {"dice": 0.9, "mean_accuracy": 0.9, "mean_iou": 0.9, "pixel_accuracy": 0.9,
         "fw_iou": 0.9}
    return {"val": m, "test": m}


@pytest.mark.parametrize("overrides,split_seed", [
    (["--config.seed=3"], 3), (["--config.seed=3", "--config.data.split_seed=5"], 5)])
def test_the_guideline_holds_the_split_while_its_draws_and_confirming_seeds_change(
    tmp_path, overrides, split_seed):
  """Every run has the config's split seed (so the same test split); each setting trains
  on folds 0-2, the deciding runs with seeds 100-102 and the confirming ones with 103-105,
  none of them the study's 0, 1, ..."""
  trainer = Recorder()
  tuner = guideline.Tuner(config(*overrides), 8, trainer, str(tmp_path),
                          Settings(threshold=8, budget=10, tolerance=0.0))
  # GreScale at once ties the baseline: the confirming runs follow.
  assert tuner.run() == "confirmed"
  assert [name for name, _ in trainer.calls] == [
      f"{setting}_fold{d}" for setting in ("00_baseline", "01_grescale", "02_confirm")
      for d in range(3)]
  assert [o["seed"] for _, o in trainer.calls] == [100, 101, 102] * 2 + [103, 104, 105]
  assert [o["data.fold"] for _, o in trainer.calls] == [0, 1, 2] * 3
  # the quickstart's 15% validation and 15% test: folds of 15% of 85%, round(85 / 15) = 6
  assert {o["data.num_folds"] for _, o in trainer.calls} == {6}
  assert [o["data.split_seed"] for _, o in trainer.calls] == [split_seed] * 9
  assert tuner.history[-1]["changed"] == "seed: 100-102 → 103-105"
