"""The recipe's stages on one synthetic dataset, each measured in test Dice and time: one
fold -> the k-fold ensemble -> + test-time mirroring -> + post-processing (the largest
foreground component), every stage a model file predicting the held-out test subjects.

    python3 benchmarks/recipe_chain.py --config=configs/quickstart.py --folds=5 \\
        --out=/tmp/chain2d [--config.KEY=VALUE ...]

Cross-validation (`medseg_jax.tuning.crossval`) trains the folds on the subjects outside
the test split; its out-of-fold decisions (mirroring, post-processing) are reported beside
the chain, which applies each stage whatever they decided, to measure its gain. The model
files are written with `--mode=export` (one fold; every fold as one ensemble file) and
predict with `--mode=predict --engine=jax`; the ensemble files without and with mirroring
are timed with `--engine=onnxruntime` too. Test Dice is the mean over the test subjects
of the foreground Dice (each foreground label, then their mean; `postprocess.dice_per_class`)
of the written label maps against the truth read back with nibabel. Resumable: complete folds,
exports and predictions are kept. Writes OUT/chain.json and OUT/chain.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np

from medseg_jax.evaluation import postprocess
from medseg_jax.tuning import crossval

STAGES = (  # name, what the model file holds, its inference overrides
    ("one fold", "fold 0", ["--config.evaluation.mirror=False"]),
    ("ensemble", "every fold", ["--config.evaluation.mirror=False"]),
    ("+ mirroring", "every fold", ["--config.evaluation.mirror=True"]),
    ("+ post-processing", "every fold", ["--config.evaluation.mirror=True",
                                         "--config.evaluation.largest_component_foreground=True"]),
)
TIMED_BOTH = ("ensemble", "+ mirroring")  # also timed with ONNX Runtime


def _run(args: list[str], log: str) -> float:
  """Seconds `python -m ARGS` took; its output appended to `log`; stops on a failure."""
  started = time.perf_counter()
  with open(log, "a") as out:
    code = subprocess.run([sys.executable, "-m", *args], stdout=out,
                          stderr=subprocess.STDOUT).returncode
  if code:
    sys.exit(f"error: {' '.join(args[:2])} failed ({code}); see {log}")
  return time.perf_counter() - started


def _test_cases(cv: str) -> tuple[list[str], dict[str, str], dict[str, np.ndarray]]:
  """The test subjects of the cross-validation, their images and label maps (label_map
  applied), from its first fold's split and dataset."""
  fold = os.path.join(cv, "fold_0")
  names = sorted(json.load(open(os.path.join(fold, "split.json")))["test"])
  images = {c.name: c.image for c in crossval.fold_dataset(fold).training if c.name in names}
  return names, images, crossval.labels_of(fold, names)


def _foreground_dice(pred: np.ndarray, truth: np.ndarray) -> float:
  """The mean Dice of the foreground labels present in either map (1 when none is)."""
  dice = postprocess.dice_per_class(pred, truth, int(max(pred.max(), truth.max())) + 1)
  return float(np.nanmean(dice)) if np.isfinite(dice).any() else 1.0


def _predict(model: str, inputs: str, out: str, engine: str, log: str) -> float | None:
  """Seconds the prediction took (None when it was already written)."""
  if os.path.isdir(out):
    return None
  return _run(["medseg_jax.main", "--mode=predict", f"--model={model}", f"--input={inputs}",
               f"--output={out}", f"--engine={engine}"], log)


def _every_fold_alone(config: list[str], folds: list[str], inputs: str, names: list[str],
                      truths: dict, out: str, log: str) -> list[float]:
  """The test Dice of each fold's file alone (fold 0's is the chain's first stage), so the
  first stage reads as one fold of several, not as fold 0's luck."""
  dice = []
  for k, workdir in enumerate(folds):
    model = os.path.join(out, "stage0.zip" if k == 0 else f"fold{k}.zip")
    if not os.path.exists(model):
      _run(["medseg_jax.main", "--mode=export", *config, f"--config.data.fold={k}",
            *STAGES[0][2], f"--workdir={workdir}", "--checkpoint=latest", f"--output={model}"],
           log)
    predicted = os.path.join(out, "pred0_jax" if k == 0 else f"pred_fold{k}_jax")
    _predict(model, inputs, predicted, "jax", log)
    dice.append(float(np.mean([_foreground_dice(np.asarray(nib.load(
        os.path.join(predicted, f"{n}.nii.gz")).dataobj), truths[n]) for n in names])))
  return dice


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--folds", type=int, default=5)
  p.add_argument("--out", required=True)
  args, overrides = p.parse_known_args()
  config = [f"--config={args.config}", f"--config.data.num_folds={args.folds}", *overrides]
  os.makedirs(args.out, exist_ok=True)
  log, cv = os.path.join(args.out, "chain.log"), os.path.join(args.out, "cv")
  state_path = os.path.join(args.out, "chain.json")
  state = json.load(open(state_path)) if os.path.exists(state_path) else {"seconds": {}}
  if "crossval" not in state["seconds"]:
    state["seconds"]["crossval"] = _run(["medseg_jax.tuning.crossval", *config,
                                         f"--workdir={cv}"], log)
  folds = [os.path.join(cv, f"fold_{k}") for k in range(args.folds)]
  names, images, truths = _test_cases(cv)
  inputs = os.path.join(args.out, "test_images")
  os.makedirs(inputs, exist_ok=True)
  for name, path in images.items():
    if not os.path.lexists(os.path.join(inputs, f"{name}.nii.gz")):
      os.symlink(os.path.abspath(path), os.path.join(inputs, f"{name}.nii.gz"))
  rows = []
  for k, (stage, holds, inference) in enumerate(STAGES):
    model = os.path.join(args.out, f"stage{k}.zip")
    workdirs = folds[:1] if holds == "fold 0" else folds
    if not os.path.exists(model):
      extra = ["--config.data.fold=0"] if holds == "fold 0" else []
      state["seconds"][f"export {stage}"] = _run(
          ["medseg_jax.main", "--mode=export", *config, *extra, *inference,
           f"--workdir={','.join(workdirs)}", "--checkpoint=latest", f"--output={model}"], log)
    row = {"stage": stage, "model": holds, "inference": inference,
           "file_mb": os.path.getsize(model) / 2**20}
    for engine in ("jax", "onnxruntime") if stage in TIMED_BOTH else ("jax",):
      out = os.path.join(args.out, f"pred{k}_{engine}")
      seconds = _predict(model, inputs, out, engine, log)
      if seconds is not None:
        state["seconds"][f"predict {stage} {engine}"] = seconds
      row[f"s_per_volume_{engine}"] = state["seconds"][f"predict {stage} {engine}"] / len(names)
      dice = [_foreground_dice(np.asarray(nib.load(os.path.join(out, f"{n}.nii.gz")).dataobj),
                               truths[n]) for n in names]
      row[f"test_dice_{engine}"] = float(np.mean(dice))
      row[f"test_dice_per_subject_{engine}"] = dice
    rows.append(row)
    json.dump(state, open(state_path, "w"), indent=1)
  rows[0]["test_dice_each_fold_jax"] = _every_fold_alone(config, folds, inputs, names, truths,
                                                         args.out, log)
  decided = json.load(open(os.path.join(cv, "crossval.json")))
  state.update(rows=rows, test_subjects=names, crossval_mean=decided["mean"],
               mirroring=decided["mirroring"], postprocessing=decided["postprocessing"])
  json.dump(state, open(state_path, "w"), indent=1)
  lines = [f"# Recipe chain: {args.config} {' '.join(overrides)}, {args.folds} folds, "
           f"{len(names)} test subjects", "",
           "| stage | model file | MB | test Dice (JAX) | s/volume JAX | s/volume ONNX Runtime |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    onnx = f"{r['s_per_volume_onnxruntime']:.1f}" if "s_per_volume_onnxruntime" in r else "-"
    lines.append(f"| {r['stage']} | {r['model']} | {r['file_mb']:.1f} | {r['test_dice_jax']:.4f} "
                 f"| {r['s_per_volume_jax']:.1f} | {onnx} |")
  each = rows[0]["test_dice_each_fold_jax"]
  lines += ["", f"Each fold alone (JAX): {', '.join(f'{d:.4f}' for d in each)}; mean "
            f"{np.mean(each):.4f}."]
  lines += ["", f"Out-of-fold decisions: mirroring {decided['mirroring']['mirror']} "
            f"({decided['mirroring']['mean_dice']}); largest foreground component "
            f"{decided['postprocessing']['foreground']} "
            f"({decided['postprocessing']['mean_dice']}).",
            f"Seconds: {json.dumps({k: round(v, 1) for k, v in state['seconds'].items()})}"]
  open(os.path.join(args.out, "chain.md"), "w").write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
