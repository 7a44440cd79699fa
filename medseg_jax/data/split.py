"""Splitting subjects into train, validation and test, and keeping a run's split."""

import os

import ml_collections
import numpy as np

from medseg_jax import files
from medseg_jax.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
    raise ConfigError("data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1")


def split_seed(cfg: ml_collections.ConfigDict) -> int:
  """The seed that draws the split (and a synthetic dataset): `data.split_seed`, or `seed`
  when it is unset, so a run without it splits as before."""
  return cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed


def split_cases(cases: list, val_fraction: float, test_fraction: float, seed: int,
                fold: int | None = None, num_folds: int = 5) -> dict[str, list]:
  """Shuffles subjects with `seed` and splits them; a subject is in exactly one split.

  Without `fold`, the first `val_fraction` of the shuffled subjects validate, the next
  `test_fraction` test and the rest train. With `fold`, the test subjects stay those, and
  the others (validation and training pooled, in shuffled order) form `num_folds` blocks
  of near-equal size: block `fold` validates and the rest train. The folds of one seed are
  disjoint and cover the pool; when the pool divides into folds of the validation split's
  size, fold 0 is the split without folds."""
  check_fractions(val_fraction, test_fraction)
  order = np.random.default_rng(seed).permutation(len(cases))
  n_val = max(1, round(val_fraction * len(cases))) if val_fraction else 0
  n_test = max(1, round(test_fraction * len(cases))) if test_fraction else 0
  if n_val + n_test >= len(cases):
    raise ConfigError(f"data: {len(cases)} subjects are too few for the val/test fractions")
  chosen = [cases[i] for i in order]
  test = chosen[n_val:n_val + n_test]
  if fold is None:
    return {"val": chosen[:n_val], "test": test, "train": chosen[n_val + n_test:]}
  check_fold(fold, num_folds)
  pool = chosen[:n_val] + chosen[n_val + n_test:]
  if len(pool) < num_folds:
    raise ConfigError(f"data.num_folds={num_folds}: the {len(pool)} subjects outside the test "
                      "split are too few for that many folds")
  blocks = np.array_split(np.arange(len(pool)), num_folds)
  val = set(blocks[fold].tolist())
  return {"val": [pool[i] for i in sorted(val)], "test": test,
          "train": [c for i, c in enumerate(pool) if i not in val]}


def check_fold(fold: int | None, num_folds: int) -> None:
  """Raises ConfigError unless `fold` is unset or one of `num_folds` (at least 2) folds."""
  if num_folds < 2:
    raise ConfigError(f"data.num_folds={num_folds}: need at least 2 folds")
  if fold is not None and not 0 <= fold < num_folds:
    raise ConfigError(f"data.fold={fold}: must be in 0..{num_folds - 1} "
                      f"(data.num_folds={num_folds}), or unset for the split without folds")


def recorded_split(path: str, names: list[str], val_fraction: float, test_fraction: float,
                   seed: int, record: bool, root: str, fold: int | None = None,
                   num_folds: int = 5) -> dict[str, list[str]]:
  """The split recorded at `path` (a resumed run keeps its split even if the seed changed),
  else a new one of the subjects `names`, written to `path` when `record`.

  `root` is the dataset the subjects come from, named when a recorded one is gone."""
  if not os.path.exists(path):
    splits = split_cases(names, val_fraction, test_fraction, seed, fold, num_folds)
    if record:
      files.write_json(path, splits)
    return splits
  splits = files.read_json(path, "the run's split of subjects")
  missing = [n for s in splits.values() for n in s if n not in names]
  if missing:
    raise DataError(f"{path}: subjects {missing[:3]} are not in the slice store of "
                    f"{root} (removed, or skipped as invalid)")
  return splits
