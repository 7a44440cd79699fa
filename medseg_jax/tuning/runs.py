"""Training runs as subprocesses of `medseg_jax.main`, for the tools that drive many runs.

A run lives in its own directory and is complete once it has `eval/test_metrics.json`;
an incomplete one is started again with the same command and resumes from its newest
checkpoint. A run the divergence guard stopped is recorded as diverged and not started
again. Used by the scaling study and the GreScale guideline tuner.
"""

import json
import os
import subprocess
import sys
from typing import Callable

from absl import logging

from medseg_jax import files
from medseg_jax.errors import DataError, MedsegError
from medseg_jax.training import guard

METRICS = ("dice", "mean_accuracy", "mean_iou", "pixel_accuracy", "fw_iou")
DIVERGED = "diverged.json"


def override_args(overrides: dict) -> list[str]:
  """{"lr.policy": "grescale", "seed": 1} -> ["--config.lr.policy=grescale", "--config.seed=1"]."""
  return [f"--config.{key}={value!r}" if isinstance(value, float) else f"--config.{key}={value}"
          for key, value in overrides.items()]


def cpu_devices(requested: int, largest: int) -> int:
  """Simulated CPU devices per run: -1 = `largest` when the machine has no accelerator."""
  if requested >= 0:
    return requested
  import jax  # pylint: disable=import-outside-toplevel
  return largest if jax.devices()[0].platform == "cpu" else 0


def is_complete(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "eval", "test_metrics.json"))


def diverged(workdir: str) -> dict | None:
  """WORKDIR/diverged.json of a run the divergence guard stopped: its error line and
  whether its best checkpoint was evaluated; None for any other run."""
  path = os.path.join(workdir, DIVERGED)
  return files.read_json(path, "why the run stopped", missing_ok=True)


def run(args: list[str], workdir: str, simulated_devices: int, tool: str) -> str:
  """Trains with `medseg_jax.main ARGS --workdir=WORKDIR` unless the run is complete or
  diverged, its output appended to WORKDIR/<tool>_run.log; returns "complete" (it has its
  test metrics), "diverged" or "failed". A run the divergence guard stops is a result,
  never retried: WORKDIR/diverged.json records it, then its best-on-validation checkpoint
  (if it has one) is evaluated on the test split."""
  record = diverged(workdir)
  if record is not None:
    if record["evaluated"] is None:  # interrupted before its evaluation finished
      _evaluate_diverged(args, workdir, simulated_devices, tool, record["error"])
    return "diverged"
  if is_complete(workdir):
    logging.info("%s: complete, skipped", workdir)
    return "complete"
  code, error = _main(args, workdir, simulated_devices, tool)
  if code == 0 and is_complete(workdir):
    return "complete"
  if error.startswith(f"error: {guard.Diverged.PREFIX}"):
    print(f"[{tool}] {os.path.basename(workdir)} diverged: {error}", flush=True)
    _evaluate_diverged(args, workdir, simulated_devices, tool, error)
    return "diverged"
  print(f"[{tool}] {os.path.basename(workdir)} failed with exit code {code}; see "
        f"{os.path.join(workdir, f'{tool}_run.log')}", flush=True)
  return "failed"


def _evaluate_diverged(args: list[str], workdir: str, simulated_devices: int, tool: str,
                       error: str) -> None:
  """Records the divergence first (so the evaluation's test metrics never make the run
  look complete), then evaluates the best checkpoint; without one the run has no Dice."""
  path = os.path.join(workdir, DIVERGED)
  files.write_json(path, {"error": error, "evaluated": None})
  code, evaluation_error = evaluate(args, workdir, simulated_devices, tool, "best")
  files.write_json(path, {"error": error, "evaluated": code == 0,
                          "evaluation_error": evaluation_error or None})


def evaluate(args: list[str], workdir: str, simulated_devices: int, tool: str,
             which: str) -> tuple[int, str]:
  """`medseg_jax.main ARGS --mode=evaluate --checkpoint=WHICH` on the run in WORKDIR (its
  metrics go to WORKDIR/eval/); its exit code and its last `error:` line."""
  return _main([*args, "--mode=evaluate", f"--checkpoint={which}"], workdir,
               simulated_devices, tool)


def predict(args: list[str], workdir: str, simulated_devices: int, tool: str, which: str,
            input_path: str, output: str) -> tuple[int, str]:
  """`medseg_jax.main ARGS --mode=predict --probabilities` of the run in WORKDIR's
  checkpoint WHICH, from `input_path` into `output` (replacing what is there); its exit
  code and last `error:` line."""
  return _main([*args, "--mode=predict", f"--checkpoint={which}", f"--input={input_path}",
                f"--output={output}", "--overwrite", "--probabilities"], workdir,
               simulated_devices, tool)


def _main(args: list[str], workdir: str, simulated_devices: int, tool: str) -> tuple[int, str]:
  """Runs `medseg_jax.main ARGS --workdir=WORKDIR`, its output appended to
  WORKDIR/<tool>_run.log; its exit code and its last `error:` line ("" if none)."""
  env = dict(os.environ)
  if simulated_devices:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} " \
                       f"--xla_force_host_platform_device_count={simulated_devices}".strip()
  cmd = [sys.executable, "-m", "medseg_jax.main", *args, f"--workdir={workdir}"]
  print(f"[{tool}] {os.path.basename(workdir)}: {' '.join(cmd[1:])}", flush=True)
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, f"{tool}_run.log")
  with open(log_path, "a") as log:
    start = log.tell()
    code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
  with open(log_path) as log:
    log.seek(start)
    errors = [line.strip() for line in log if line.startswith("error: ")]
  return code, errors[-1] if code and errors else ""


def trainer(config_args: list[str], runs_dir: str, simulated_devices: int,
            tool: str) -> Callable[[str, dict], dict]:
  """A trainer for the guideline tuner: (name, config overrides) -> {"val": metrics or None,
  "test": metrics} of the run in RUNS_DIR/<name>, trained unless complete; a run the
  divergence guard stopped has no metrics and its error line under "diverged"."""
  def train_run(name: str, overrides: dict) -> dict:
    workdir = os.path.join(runs_dir, name)
    outcome = run(config_args + override_args(overrides), workdir, simulated_devices, tool)
    if outcome == "diverged":
      return {"val": dict.fromkeys(METRICS), "test": dict.fromkeys(METRICS),
              "diverged": diverged(workdir)["error"]}
    if outcome != "complete":
      raise MedsegError(f"run {name} {outcome}; see {workdir}/{tool}_run.log")
    try:
      val = metrics_on_val(workdir)
    except DataError:
      val = None  # no validation split; the tuner says so if it needs one
    return {"val": val, "test": metrics_on_test(workdir)}
  return train_run


def _read_json(path: str) -> dict:
  return files.read_json(path, "a run's record")


def _log_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def metrics_on_test(workdir: str) -> dict:
  """The five segmentation metrics of a complete run on the test split."""
  result = _read_json(os.path.join(workdir, "eval", "test_metrics.json"))
  return {m: result[m] for m in METRICS}


def metrics_on_val(workdir: str) -> dict:
  """Validation metrics of the checkpoint the test split was evaluated with (the best on
  validation), from the run's metrics.jsonl."""
  step = _read_json(os.path.join(workdir, "eval", "test_metrics.json"))["step"]
  for record in _log_records(workdir):
    if record.get("step") == step and "val_dice" in record:
      return {m: record[f"val_{m}"] for m in METRICS}
  val = os.path.join(workdir, "eval", "val_metrics.json")
  if os.path.exists(val) and _read_json(val).get("step") == step:
    return {m: _read_json(val)[m] for m in METRICS}
  raise DataError(f"{workdir}: no validation metrics at the tested step {step} "
                  "(no validation split?)")


def train_seconds(workdir: str) -> float:
  """Training time: the sum of the logged step times."""
  seconds, last = 0.0, 0
  for record in _log_records(workdir):
    if "step_time" in record:
      seconds += record["step_time"] * (record["step"] - last)
      last = record["step"]
  return seconds
