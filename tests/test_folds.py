"""Cross-validation folds (`data.fold`, `data.num_folds`): the test split held out, the
rest in disjoint folds that cover it, the same in every run of one split seed."""

import json

import numpy as np
import pytest

import helpers
from helpers import TINY, config
from medseg_jax import config as config_check
from medseg_jax.data import split
from medseg_jax.errors import ConfigError

NAMES = [f"case_{i:02d}" for i in range(10)]


def hand_folds(seed, num_folds):
  """By hand: numpy's permutation for `seed`; 20% of 10 validate (2) and 20% test (2) in
  the split without folds; the test two stay, the other eight in shuffled order are cut
  into `num_folds` consecutive blocks, the first ones a subject larger."""
  chosen = [NAMES[i] for i in np.random.default_rng(seed).permutation(10)]
  test, pool = chosen[2:4], chosen[:2] + chosen[4:]
  sizes = [8 // num_folds + (1 if f < 8 % num_folds else 0) for f in range(num_folds)]
  starts = np.cumsum([0] + sizes)
  return test, [pool[starts[f]:starts[f + 1]] for f in range(num_folds)]


@pytest.mark.parametrize("num_folds", [2, 3, 4, 8])
def test_folds_are_disjoint_cover_the_pool_and_keep_the_test_split(num_folds):
  test, blocks = hand_folds(7, num_folds)
  seen = []
  for fold in range(num_folds):
    s = split.split_cases(NAMES, 0.2, 0.2, 7, fold, num_folds)
    assert s["test"] == test and s["val"] == blocks[fold]
    assert sorted(s["train"] + s["val"] + s["test"]) == NAMES
    assert not set(s["train"]) & set(s["val"])
    seen += s["val"]
  assert sorted(seen + test) == NAMES and len(seen) == len(set(seen))


def test_fold_0_of_folds_the_size_of_the_validation_split_is_the_split_without_folds():
  plain = split.split_cases(NAMES, 0.2, 0.2, 3)
  assert split.split_cases(NAMES, 0.2, 0.2, 3, 0, 4) == plain


@pytest.mark.parametrize("fold,num_folds,message", [
    (5, 5, r"^data\.fold=5: must be in 0\.\.4"), (-1, 5, r"^data\.fold=-1"),
    (0, 1, r"^data\.num_folds=1: need at least 2 folds"),
    (0, 9, r"^data\.num_folds=9: the 8 subjects outside the test split are too few")])
def test_bad_folds_are_one_line(fold, num_folds, message):
  with pytest.raises(ConfigError, match=message):
    split.split_cases(NAMES, 0.2, 0.2, 0, fold, num_folds)


def test_a_bad_fold_in_a_config_is_a_config_error(devices8):
  with pytest.raises(ConfigError, match=r"^data\.fold=3: must be in 0\.\.2"):
    config_check.check(config(*TINY[1:], "--config.data.fold=3", "--config.data.num_folds=3"))


def test_a_run_records_its_fold_split_and_keeps_it(tmp_path):
  """TINY's six volumes: one tests; the other five form three folds of 2, 2 and 1."""
  overrides = ("--config.data.fold=2", "--config.data.num_folds=3")
  sets, _ = helpers.load_splits(config(*TINY[1:], *overrides), tmp_path)
  recorded = json.loads((tmp_path / "split.json").read_text())
  names = [f"phantom_{i:03d}" for i in range(6)]
  chosen = [names[i] for i in np.random.default_rng(0).permutation(6)]
  pool = chosen[:1] + chosen[2:]
  assert recorded == {"val": pool[4:], "test": chosen[1:2], "train": pool[:4]}
  assert {s: sets[s].names for s in split.SPLITS} == recorded
