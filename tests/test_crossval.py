"""Cross-validation through its command: every fold trained and measured out of fold on
its final checkpoint, resumable, with its errors one line each."""

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import REPO, TINY, env_with_devices

# TINY's six volumes: one tests, five are cut into two folds (3 and 2 validating).
ARGS = [*TINY, "--config.data.num_folds=2", "--config.train.num_steps=4",
        "--config.train.eval_every_steps=2", "--config.checkpoint.every_steps=2"]


def crossval(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "medseg_jax.tuning.crossval", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=env_with_devices(None))


def seed_args(seed: int) -> list[str]:
  return [*ARGS, "--cpu_devices=1", "--config.parallel.num_devices=1", f"--config.seed={seed}",
          "--config.data.split_seed=0"]


@pytest.fixture(scope="module")
def cv0(tmp_path_factory):
  """The cross-validation of seed 0, run once for the module."""
  workdir = tmp_path_factory.mktemp("cv") / "seed0"
  proc = crossval(*seed_args(0), f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  return workdir


def test_every_fold_is_trained_and_measured_out_of_fold_on_its_final_checkpoint(cv0):
  tmp_path = cv0
  splits = [json.loads((tmp_path / f"fold_{f}" / "split.json").read_text()) for f in (0, 1)]
  assert splits[0]["test"] == splits[1]["test"] and len(splits[0]["test"]) == 1
  pool = sorted(splits[0]["val"] + splits[1]["val"])
  assert sorted(splits[0]["val"] + splits[0]["train"]) == pool and len(pool) == 5
  assert {len(s["val"]) for s in splits} == {2, 3}
  result = json.loads((tmp_path / "crossval.json").read_text())
  folds = result["folds"]
  assert [f["fold"] for f in folds] == [0, 1]
  for f, split in zip(folds, splits):
    assert f["step"] == 4  # the final checkpoint, whichever validated best
    assert sorted(f["volumes"]) == sorted(split["val"])
    assert len(f["dice_per_class"]) == 2 and len(f["hd95_per_class"]) == 1
  for key in ("dice", "dice_foreground"):  # the means, by hand
    assert result["mean"][key] == pytest.approx(np.mean([f[key] for f in folds]))
  assert result["mean"]["dice_per_class"] == pytest.approx(
      [np.mean([f["dice_per_class"][c] for f in folds]) for c in (0, 1)])
  with open(tmp_path / "crossval_per_volume.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["volume"] for r in rows) == pool  # every pooled subject once, out of fold
  hd95 = [np.mean([float(r["hd95_1"]) for r in rows if r["fold"] == str(k)]) for k in (0, 1)]
  assert [f["hd95_per_class"][0] for f in folds] == pytest.approx(hd95)
  dice = {}  # the out-of-fold label maps, without and with mirroring, by hand
  for directory in ("oof", "oof_mirrored"):
    for name in pool:
      pred = np.asarray(nib.load(tmp_path / directory / f"{name}.nii.gz").dataobj)
      truth = np.asarray(nib.load(tmp_path / "fold_0" / "data" / "labelsTr" /
                                  f"{name}.nii.gz").dataobj) > 0  # label_map (0, 1, 1)
      assert pred.shape == truth.shape
      dice[directory, name] = 2 * ((pred == 1) & truth).sum() / ((pred == 1).sum() + truth.sum())
  by_hand = {d: np.mean([dice[d, n] for n in pool]) for d in ("oof", "oof_mirrored")}
  mirroring = result["mirroring"]
  assert mirroring["mean_dice"] == pytest.approx({"off": by_hand["oof"],
                                                   "on": by_hand["oof_mirrored"]})
  assert mirroring["mirror"] == (by_hand["oof_mirrored"] > by_hand["oof"])
  assert by_hand["oof_mirrored"] != by_hand["oof"]  # mirroring changes the label maps
  post = result["postprocessing"]
  assert post["mean_dice"]["none"] == pytest.approx(by_hand[mirroring["directory"]])
  assert post["overrides"][0] == f"--config.evaluation.largest_component_foreground={post['foreground']}"
  again = crossval(*seed_args(0), f"--workdir={tmp_path}")
  assert again.returncode == 0 and "-m medseg_jax.main" not in again.stdout
  assert json.loads((tmp_path / "crossval.json").read_text()) == result


@pytest.mark.parametrize("args,message", [
    (["--folds=2"], "error: --folds: [2] not in 0..1 (data.num_folds=2)"),
    (["--folds=a"], "error: --folds=a: fold numbers, comma-separated"),
    (["--config.data.fold=0"], "error: data.fold=0: crossval sets the fold of each run"),
])
def test_bad_folds_are_one_line_and_train_nothing(tmp_path, args, message):
  proc = crossval(*ARGS, f"--workdir={tmp_path}", *args, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(message)
  assert not list(tmp_path.iterdir())


def test_the_best_configuration_of_two_and_their_ensemble_is_chosen_out_of_fold(cv0):
  """Two configurations (seeds 0 and 1) cross-validated on the same subjects; each
  candidate's Dice recomputed by hand from the out-of-fold files, the best one chosen."""
  tmp_path = cv0.parent
  dirs = [cv0, tmp_path / "seed1"]
  proc = crossval(*seed_args(1), f"--workdir={dirs[1]}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  proc = subprocess.run([sys.executable, "-m", "medseg_jax.tuning.best",
                         f"--crossval={dirs[0]},{dirs[1]}"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  best = json.loads((tmp_path / "best.json").read_text())
  subjects = best["subjects"]
  assert len(subjects) == 5
  def hand_dice(members):
    scores = []
    for s in subjects:
      mean = sum(nib.load(d / json.loads((d / "crossval.json").read_text())["mirroring"][
          "directory"] / f"{s}_probs.nii.gz").get_fdata() for d in members)
      pred = np.argmax(mean, -1) == 1
      truth = np.asarray(nib.load(dirs[0] / "fold_0" / "data" / "labelsTr" /
                                  f"{s}.nii.gz").dataobj) > 0
      scores.append(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    return np.mean(scores)
  expected = {(str(dirs[0]),): hand_dice(dirs[:1]), (str(dirs[1]),): hand_dice(dirs[1:]),
              (str(dirs[0]), str(dirs[1])): hand_dice(dirs)}
  got = {tuple(c["members"]): c["dice"] for c in best["candidates"]}
  assert got.keys() == expected.keys()
  for key, value in expected.items():
    assert got[key] == pytest.approx(value)
  assert tuple(best["chosen"]) == max(expected, key=lambda k: (round(expected[k], 9), -len(k)))
  assert f"best: {' + '.join(best['chosen'])}" in proc.stdout
  other = subprocess.run([sys.executable, "-m", "medseg_jax.tuning.best",
                          f"--crossval={dirs[0]},{tmp_path / 'missing'}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
  assert other.returncode == 2 and other.stderr.strip().splitlines()[-1] == (
      f"error: --crossval: {tmp_path / 'missing'} is not a directory")
