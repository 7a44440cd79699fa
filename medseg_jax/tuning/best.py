"""The best configuration, chosen out of fold: each cross-validated configuration alone and
every pair of them as an ensemble, as nnU-Net's `find_best_configuration` chooses.

    python -m medseg_jax.tuning.best --crossval=runs/cv_2d,runs/cv_3d [--output=DIR]

Each `--crossval` directory is one configuration's `tuning.crossval` (a 2D and a 3D plan
of one dataset, say), with the same subjects out of fold (the same `data.split_seed` and
`data.num_folds`). A candidate's score is its mean foreground Dice on those subjects: per
class the mean over the subjects (a subject where the class is absent from both the
prediction and the truth is left out), then the mean over the classes; an ensemble's
label maps are the argmax of its members' mean probabilities (their out-of-fold
`*_probs.nii.gz`, mirrored where their cross-validation chose mirroring, each in the
subject's own grid). The best score wins; a tie (within 1e-9) goes to the
candidate with fewer members, then to the one named first. DIR/best.json (default: the
first directory's parent) holds every candidate's Dice per class and the choice.
"""

import itertools
import os

import nibabel as nib
import numpy as np
from absl import flags

from medseg_jax import cli, files
from medseg_jax.data import targets
from medseg_jax.errors import ConfigError, DataError
from medseg_jax.evaluation import postprocess
from medseg_jax.tuning import crossval

RESULT = "best.json"


def candidates(names: list[str]) -> list[tuple[str, ...]]:
  """Every configuration alone, then every pair."""
  return [(n,) for n in names] + list(itertools.combinations(names, 2))


def _probabilities(directory: str, subject: str) -> np.ndarray:
  """A subject's out-of-fold probabilities, mirrored where its cross-validation chose to."""
  return np.asarray(nib.load(os.path.join(directory, crossval.chosen_predictions(directory),
                                          f"{subject}_probs.nii.gz")).dataobj)


def score(members: tuple[str, ...], truths: dict[str, np.ndarray],
          outputs: targets.Classes | targets.Regions) -> dict:
  """The out-of-fold Dice per foreground class (with regions, per region) and their mean,
  of the labels of the members' mean probabilities (their argmax; with regions, rebuilt
  in the declared order)."""
  cases = [(outputs.labels(sum(_probabilities(d, subject) for d in members) / len(members)),
            truth) for subject, truth in sorted(truths.items())]
  per_class = postprocess.class_dice(cases, outputs.num_labels, outputs.regions)
  return {"members": list(members), "dice_per_class": per_class.tolist(),
          "dice": float(np.nanmean(per_class))}


def choose(directories: list[str]) -> dict:
  """Every candidate's score and the best one."""
  subjects = {d: crossval.out_of_fold_subjects(d) for d in directories}
  first = directories[0]
  for d in directories[1:]:
    if subjects[d] != subjects[first]:
      raise ConfigError(f"--crossval: {d} and {first} have other subjects out of fold; "
                        "cross-validate both with the same data.split_seed and "
                        "data.num_folds")
  if not subjects[first]:
    raise DataError(f"{first}: no fold evaluated yet; run tuning.crossval there first")
  truths = crossval.truth_labels(first)
  outputs = crossval.outputs(first)
  scored = [score(c, truths, outputs) for c in candidates(directories)]
  best = max(enumerate(scored),
             key=lambda item: (round(item[1]["dice"], 9), -len(item[1]["members"]), -item[0]))
  return {"subjects": subjects[first], "candidates": scored, "chosen": best[1]["members"],
          "dice": best[1]["dice"]}


def _cli() -> None:
  directories = flags.DEFINE_list("crossval", [], "The configurations' tuning.crossval "
                                  "directories, comma-separated.")
  output = flags.DEFINE_string("output", None, "Where best.json goes; default the first "
                               "directory's parent.")

  def check() -> None:
    if not directories.value:
      cli.fail("--crossval is required: one or more tuning.crossval directories", 2)
    missing = [d for d in directories.value if not os.path.isdir(d)]
    if missing:
      cli.fail(f"--crossval: {missing[0]} is not a directory", 2)

  def main() -> None:
    result = choose(directories.value)
    out = output.value or os.path.dirname(os.path.abspath(directories.value[0]))
    files.write_json(os.path.join(out, RESULT), result)
    for c in result["candidates"]:
      print(f"{' + '.join(c['members'])}: out-of-fold Dice {c['dice']:.4f}")
    print(f"best: {' + '.join(result['chosen'])} ({os.path.join(out, RESULT)})")

  cli.run(main, check)


if __name__ == "__main__":
  _cli()
