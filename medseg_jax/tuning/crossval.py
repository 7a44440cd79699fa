"""Cross-validation: every fold of a config trained, then measured out of fold.

    python -m medseg_jax.tuning.crossval --config=configs/NAME.py --workdir=DIR \\
        [--folds=0,1,...] [--config.KEY=VALUE ...]

Fold f is a normal run of `medseg_jax.main` in DIR/fold_<f> with `data.fold=f`: the
subjects outside the test split, in `data.num_folds` folds drawn from `data.split_seed`,
fold f validating. Each is trained unless complete (an interrupted one resumes from its
newest checkpoint), then its final checkpoint is evaluated (`--mode=evaluate
--checkpoint=latest`): the out-of-fold estimate comes from the state training ended with,
since choosing a checkpoint on the same cases would inflate it. That evaluation also
rewrites the fold's test metrics for its final checkpoint. The folds run one after
another, each on the config's devices.

DIR/crossval.json holds each fold's Dice per class, foreground Dice and mean HD95 per
class on its validation fold, and their means over the folds; DIR/crossval_per_volume.csv
every out-of-fold volume's row (each subject outside the test split once, when every fold
ran). Rerunning the command skips what is done.
"""

import csv
import os
import sys

import nibabel as nib
import numpy as np
from absl import flags

from medseg_jax import cli, files
from medseg_jax.data import decathlon, targets
from medseg_jax.evaluation import postprocess
from medseg_jax.errors import ConfigError, DataError, MedsegError
from medseg_jax.tuning import runs

RESULT, PER_VOLUME = "crossval.json", "crossval_per_volume.csv"
OOF, OOF_MIRRORED = "oof", "oof_mirrored"  # out-of-fold predictions without, with mirroring
EVALUATED = "crossval_evaluated.json"  # in a fold's run: its final checkpoint was evaluated


def fold_dir(workdir: str, fold: int) -> str:
  return os.path.join(workdir, f"fold_{fold}")


def run_fold(config_args: list[str], workdir: str, fold: int, simulated_devices: int) -> None:
  """Trains fold `fold` unless complete, then evaluates its final checkpoint once."""
  run_dir = fold_dir(workdir, fold)
  args = [*config_args, f"--config.data.fold={fold}"]
  outcome = runs.run(args, run_dir, simulated_devices, "crossval")
  if outcome != "complete":
    raise MedsegError(f"fold {fold} {outcome}; see {run_dir}/crossval_run.log")
  if os.path.exists(os.path.join(run_dir, EVALUATED)):
    return
  code, error = runs.evaluate(args, run_dir, simulated_devices, "crossval", "latest")
  if code:
    raise MedsegError(f"fold {fold}: evaluating its final checkpoint failed ({error or code}); "
                      f"see {run_dir}/crossval_run.log")
  step = files.read_json(os.path.join(run_dir, "eval", "val_metrics.json"), "fold metrics")["step"]
  files.write_json(os.path.join(run_dir, EVALUATED), {"step": step})


def predict_out_of_fold(config_args: list[str], workdir: str, fold: int,
                        simulated_devices: int, mirror: bool) -> None:
  """The label maps (and probabilities) of fold `fold`'s validation subjects from its final
  checkpoint, without post-processing, with test-time mirroring or without, in
  DIR/oof_mirrored/ or DIR/oof/ as <subject>.nii.gz and _probs.nii.gz (once)."""
  run_dir = fold_dir(workdir, fold)
  out = os.path.join(workdir, OOF_MIRRORED if mirror else OOF)
  names = _volumes(workdir, fold)
  if all(os.path.exists(os.path.join(out, f"{n}_probs.nii.gz")) for n in names):
    return
  inputs = os.path.join(run_dir, "oof_inputs")  # the subjects' images, linked by name
  os.makedirs(inputs, exist_ok=True)
  images = {c.name: c.image for c in fold_dataset(run_dir).training}
  for name in names:
    link = os.path.join(inputs, f"{name}.nii.gz")
    if not os.path.lexists(link):
      os.symlink(os.path.abspath(images[name]), link)
  args = [*config_args, f"--config.data.fold={fold}", f"--config.evaluation.mirror={mirror}",
          "--config.evaluation.largest_component_foreground=False",
          "--config.evaluation.largest_component_classes=()"]
  code, error = runs.predict(args, run_dir, simulated_devices, "crossval", "latest", inputs, out)
  if code:
    raise MedsegError(f"fold {fold}: predicting its validation subjects failed "
                      f"({error or code}); see {run_dir}/crossval_run.log")


def out_of_fold_subjects(workdir: str) -> list[str]:
  """The subjects of every evaluated fold's validation split, sorted."""
  return sorted(n for f in evaluated_folds(workdir) for n in _volumes(workdir, f))


def evaluated_folds(workdir: str) -> list[int]:
  """The folds of DIR whose final checkpoint was evaluated, in order."""
  found = [int(d.removeprefix("fold_")) for d in os.listdir(workdir)
           if d.startswith("fold_") and d.removeprefix("fold_").isdigit()
           and os.path.exists(os.path.join(workdir, d, EVALUATED))]
  return sorted(found)


def outputs(workdir: str) -> targets.Classes | targets.Regions:
  """What the folds' networks output (classes or regions), as the first evaluated fold's
  data_info.json records it."""
  info = files.read_json(os.path.join(fold_dir(workdir, evaluated_folds(workdir)[0]),
                                      "data_info.json"), "a fold's data")
  return targets.from_info(info)


def truth_labels(workdir: str) -> dict[str, np.ndarray]:
  """Each out-of-fold subject's label map, with the folds' `data.label_map` applied."""
  truths = {}
  for fold in evaluated_folds(workdir):
    truths.update(labels_of(fold_dir(workdir, fold), _volumes(workdir, fold)))
  return truths


def labels_of(run_dir: str, names: list[str]) -> dict[str, np.ndarray]:
  """The label maps of the subjects `names` of the run in `run_dir`'s dataset, with its
  `data.label_map` applied."""
  label_map = files.read_json(os.path.join(run_dir, "config.json"), "a fold's config")[
      "data"]["label_map"]
  labels = {c.name: c.label for c in fold_dataset(run_dir).training}
  truths = {}
  for name in names:
    truth = np.asarray(nib.load(labels[name]).dataobj).astype(np.int64)
    truths[name] = np.asarray(label_map)[truth] if label_map else truth
  return truths


def fold_dataset(run_dir: str) -> decathlon.Dataset:
  """The dataset the run in `run_dir` read (its data_info.json's root)."""
  info = files.read_json(os.path.join(run_dir, "data_info.json"), "a fold's data_info.json")
  return decathlon.read_dataset(info["root"])


def _cases(workdir: str, directory: str, truths: dict) -> list[tuple[np.ndarray, np.ndarray]]:
  """(out-of-fold label map in DIR/`directory`, truth) of every subject, by name."""
  return [(np.asarray(nib.load(os.path.join(workdir, directory, f"{name}.nii.gz")).dataobj),
           truth) for name, truth in sorted(truths.items())]


def _num_classes(cases: list[tuple[np.ndarray, np.ndarray]]) -> int:
  return max(2, max(max(int(p.max()), int(t.max())) for p, t in cases) + 1)


def decide_mirroring(workdir: str, truths: dict, regions: tuple) -> dict:
  """Test-time mirroring (`evaluation.mirror`) where it raises the out-of-fold mean
  foreground Dice of the label maps (of `regions` when the folds trained on regions); the
  Dice behind it, the override and where the chosen predictions are."""
  dice = {}
  for name, directory in (("off", OOF), ("on", OOF_MIRRORED)):
    cases = _cases(workdir, directory, truths)
    dice[name] = float(np.nanmean(postprocess.class_dice(cases, _num_classes(cases), regions)))
  mirror = dice["on"] > dice["off"]
  return {"mirror": mirror, "directory": OOF_MIRRORED if mirror else OOF, "mean_dice": dice,
          "overrides": [f"--config.evaluation.mirror={mirror}"]}


def chosen_predictions(workdir: str) -> str:
  """The directory of the out-of-fold predictions crossval chose (mirrored or not)."""
  result = files.read_json(os.path.join(workdir, RESULT), "the cross-validation's result")
  return result["mirroring"]["directory"]


def decide_postprocessing(workdir: str, directory: str, truths: dict, regions: tuple) -> dict:
  """The largest-component post-processing that raises the out-of-fold Dice of the label
  maps in DIR/`directory` (of `regions` when the folds trained on regions;
  `postprocess.decide`), with the Dice behind it and the overrides that apply it."""
  cases = _cases(workdir, directory, truths)
  decision = postprocess.decide(cases, _num_classes(cases), regions)
  decision["overrides"] = [
      f"--config.evaluation.largest_component_foreground={decision['foreground']}",
      f"--config.evaluation.largest_component_classes={tuple(decision['classes'])}"]
  return decision


def fold_result(workdir: str, fold: int) -> dict:
  """Fold `fold`'s out-of-fold metrics: its final checkpoint on its validation fold."""
  path = os.path.join(fold_dir(workdir, fold), "eval", "val_metrics.json")
  metrics = files.read_json(path, "a fold's validation metrics")
  per_volume = metrics.get("per_volume", {})
  classes = [c["class"] for c in metrics["per_class"]]
  return {"fold": fold, "step": metrics["step"], "volumes": _volumes(workdir, fold),
          "dice": metrics["dice"], "dice_foreground": metrics["dice_foreground"],
          "dice_per_class": [c["dice"] for c in metrics["per_class"]],
          "hd95_per_class": [per_volume.get(f"hd95_{c}", {}).get("mean") for c in classes[1:]]}


def _volumes(workdir: str, fold: int) -> list[str]:
  return files.read_json(os.path.join(fold_dir(workdir, fold), "split.json"), "a fold's split")["val"]


def summary(results: list[dict]) -> dict:
  """The folds' results and the mean over them of each figure (None where a fold lacks it)."""
  def mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
  keys = ("dice", "dice_foreground")
  per_class = ("dice_per_class", "hd95_per_class")
  return {"folds": results,
          "mean": {**{k: mean([r[k] for r in results]) for k in keys},
                   **{k: [mean(column) for column in zip(*(r[k] for r in results))]
                      for k in per_class}}}


def write(workdir: str, results: list[dict], mirroring: dict, post: dict) -> dict:
  """crossval.json and crossval_per_volume.csv from the folds' results and the mirroring
  and post-processing decisions."""
  result = {**summary(results), "mirroring": mirroring, "postprocessing": post}
  files.write_json(os.path.join(workdir, RESULT), result)
  rows = []
  for r in results:
    path = os.path.join(fold_dir(workdir, r["fold"]), "eval", "val_per_volume.csv")
    with open(path, newline="") as f:
      rows += [{"fold": r["fold"], **row} for row in csv.DictReader(f)]
  files.write_csv(os.path.join(workdir, PER_VOLUME), rows)
  return result


def folds_to_run(requested: list[str], num_folds: int) -> list[int]:
  """`--folds` as fold numbers: every fold when empty."""
  if not requested:
    return list(range(num_folds))
  try:
    folds = [int(f) for f in requested]
  except ValueError:
    raise ConfigError(f"--folds={','.join(requested)}: fold numbers, comma-separated") from None
  bad = [f for f in folds if not 0 <= f < num_folds]
  if bad:
    raise ConfigError(f"--folds: {bad} not in 0..{num_folds - 1} (data.num_folds={num_folds})")
  return folds


def _cli() -> None:
  config = cli.config_flag()
  workdir = flags.DEFINE_string("workdir", None, "Directory of the folds' runs and results.")
  folds = flags.DEFINE_list("folds", [], "Folds to run; empty = every fold.")
  cpu = flags.DEFINE_integer("cpu_devices", -1, "Simulated CPU devices per run: -1 = the "
                             "config's parallel.num_devices when the machine has no "
                             "accelerator, 0 = none (the real devices).")
  flags.adopt_module_key_flags(cli)

  def check() -> None:
    if not workdir.value:
      cli.fail("--workdir is required", 2)

  def main() -> None:
    cfg = config.value
    if cfg.data.fold is not None:
      raise ConfigError(f"data.fold={cfg.data.fold}: crossval sets the fold of each run; "
                        "leave it unset")
    chosen = folds_to_run(folds.value, cfg.data.num_folds)
    simulated = runs.cpu_devices(cpu.value, max(1, cfg.parallel.num_devices))
    args = cli.config_args(sys.argv)
    for fold in chosen:
      print(f"[crossval] fold {fold} of {cfg.data.num_folds}", flush=True)
      run_fold(args, workdir.value, fold, simulated)
      for mirror in (False, True):
        predict_out_of_fold(args, workdir.value, fold, simulated, mirror)
    done = evaluated_folds(workdir.value)
    if not done:
      raise DataError(f"{workdir.value}: no fold evaluated yet")
    truths, regions = truth_labels(workdir.value), outputs(workdir.value).regions
    mirroring = decide_mirroring(workdir.value, truths, regions)
    post = decide_postprocessing(workdir.value, mirroring["directory"], truths, regions)
    result = write(workdir.value, [fold_result(workdir.value, f) for f in done], mirroring, post)
    print(f"[crossval] {len(done)} of {cfg.data.num_folds} folds: mean Dice "
          f"{result['mean']['dice']:.4f}, foreground {result['mean']['dice_foreground']:.4f}; "
          f"{' '.join(mirroring['overrides'] + post['overrides'])} (out-of-fold foreground "
          f"Dice {mirroring['mean_dice']['off']:.4f}, mirrored {mirroring['mean_dice']['on']:.4f}, "
          f"post-processed {post['mean_dice']['chosen']:.4f}); "
          f"{os.path.join(workdir.value, RESULT)}")

  cli.run(main, check)


if __name__ == "__main__":
  _cli()
