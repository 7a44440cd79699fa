"""Repeated two-process trainings where a checkpoint and a validation land on the same step.

    python benchmarks/multiprocess_stress.py [--runs=10] [--timeout=300]

Each run is `launch/local.sh 2` with 2 simulated CPU devices per process on the tiny
test config, checkpointing every step and validating at its last step (step 2), so the
latest and the best checkpoint of step 2 are written at the same time. A run is clean
when both processes exit 0 within the timeout and both checkpoints are on disk; it
prints one line per run and then how many finished cleanly.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from helpers import TINY  # pylint: disable=wrong-import-position

ARGS = TINY + ["--config.checkpoint.every_steps=1", "--config.train.eval_every_steps=0",
               "--config.train.num_steps=2"]


def run_once(workdir: str, timeout: float) -> tuple[str, float, str]:
  """One two-process training: ("clean" | "exit N" | "hang", seconds, last error line)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["CPU_DEVICES_PER_PROCESS"] = "2"
  start = time.time()
  # A session of its own, so that a hang is ended with both training processes.
  proc = subprocess.Popen(["bash", "launch/local.sh", "2", *ARGS, f"--workdir={workdir}"],
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    _, err = proc.communicate(timeout=timeout)
    outcome = "clean" if proc.returncode == 0 else f"exit {proc.returncode}"
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    outcome = "hang"
  both = all(os.path.isdir(os.path.join(workdir, d, "2"))
             for d in ("checkpoints", "checkpoints_best"))
  if outcome == "clean" and not both:
    outcome = "exit 0 without both checkpoints of step 2"
  errors = [line for line in err.splitlines() if "Error" in line or "error:" in line]
  return outcome, time.time() - start, (errors[-1][:160] if errors else "")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--timeout", type=float, default=300)
  args = p.parse_args()
  clean = 0
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.runs):
      outcome, seconds, error = run_once(os.path.join(tmp, str(i)), args.timeout)
      clean += outcome == "clean"
      print(f"run {i + 1}/{args.runs}: {outcome} in {seconds:.0f} s"
            + (f"  ({error})" if error and outcome != "clean" else ""), flush=True)
  print(f"{clean} of {args.runs} two-process trainings finished cleanly")


if __name__ == "__main__":
  main()
