"""Training runs as subprocesses of `medseg_jax.main`, for the tools that drive many runs.

A run lives in its own directory and is complete once it has `eval/test_metrics.json`;
an incomplete one is started again with the same command and resumes from its newest
checkpoint. Used by the scaling study and the GreScale guideline tuner.
"""

import json
import os
import subprocess
import sys
from typing import Callable

from absl import logging

from medseg_jax.errors import DataError, MedsegError

METRICS = ("dice", "mean_accuracy", "mean_iou", "pixel_accuracy", "fw_iou")


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


def train(args: list[str], workdir: str, simulated_devices: int, tool: str) -> bool:
  """Runs `medseg_jax.main ARGS --workdir=WORKDIR` unless the run is complete, its output
  appended to WORKDIR/<tool>_run.log; True if the run has its test metrics."""
  if is_complete(workdir):
    logging.info("%s: complete, skipped", workdir)
    return True
  env = dict(os.environ)
  if simulated_devices:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} " \
                       f"--xla_force_host_platform_device_count={simulated_devices}".strip()
  cmd = [sys.executable, "-m", "medseg_jax.main", *args, f"--workdir={workdir}"]
  print(f"[{tool}] {os.path.basename(workdir)}: {' '.join(cmd[1:])}", flush=True)
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, f"{tool}_run.log")
  with open(log_path, "a") as log:
    code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
  if code:
    print(f"[{tool}] {os.path.basename(workdir)} failed with exit code {code}; see {log_path}",
          flush=True)
  return code == 0 and is_complete(workdir)


def trainer(config_args: list[str], runs_dir: str, simulated_devices: int,
            tool: str) -> Callable[[str, dict], dict]:
  """A trainer for the guideline tuner: (name, config overrides) -> {"val": metrics or None,
  "test": metrics} of the run in RUNS_DIR/<name>, trained unless complete."""
  def train_run(name: str, overrides: dict) -> dict:
    workdir = os.path.join(runs_dir, name)
    if not train(config_args + override_args(overrides), workdir, simulated_devices, tool):
      raise MedsegError(f"run {name} failed; see {workdir}/{tool}_run.log")
    try:
      val = metrics_on_val(workdir)
    except DataError:
      val = None  # no validation split; the tuner says so if it needs one
    return {"val": val, "test": metrics_on_test(workdir)}
  return train_run


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot read ({e})") from e


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
