"""Repeated two-process trainings where checkpoints and validations land on the same steps.

    python benchmarks/multiprocess_stress.py [--runs=10] [--steps=8] [--timeout=300]

Each run is `launch/local.sh 2` with 2 simulated CPU devices per process on the tiny
test config, validating and checkpointing at every step: a step whose validation Dice
is the best so far (step 1 at least) is saved with its Dice, the others without, all
through one checkpoint manager while training goes on. A run is clean when both
processes exit 0 within the timeout, the last step is checkpointed, the best is kept and
no write is left unfinished. Prints one line per run, then how many finished cleanly.
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

ARGS = TINY + ["--config.checkpoint.every_steps=1", "--config.train.eval_every_steps=1"]
# The first of these lines in a failed run's output says why it failed.
CAUSES = ("is already ongoing", "Timed out", "Error:", "error:", "Fatal")


def run_once(workdir: str, steps: int, timeout: float) -> tuple[str, float, str]:
  """One two-process training: ("clean" | "exit N" | "hang" | ..., seconds, its cause)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHON"] = sys.executable  # the launcher runs this interpreter
  env["CPU_DEVICES_PER_PROCESS"] = "2"
  start = time.time()
  # A session of its own, so that a hang is ended with both training processes.
  proc = subprocess.Popen(["bash", "launch/local.sh", "2", *ARGS, f"--workdir={workdir}",
                           f"--config.train.num_steps={steps}"],
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    _, err = proc.communicate(timeout=timeout)
    outcome = "clean" if proc.returncode == 0 else f"exit {proc.returncode}"
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    outcome = "hang"
  if outcome == "clean" and not _complete(workdir, steps):
    outcome = "exit 0 with checkpoints missing or unfinished"
  causes = [line for cause in CAUSES for line in err.splitlines() if cause in line]
  return outcome, time.time() - start, (causes[0][:160] if causes else "")


def _complete(workdir: str, steps: int) -> bool:
  """The last step is checkpointed, a step with a Dice (the best) is kept, and no write
  was left unfinished."""
  directory = os.path.join(workdir, "checkpoints")
  kept = os.listdir(directory) if os.path.isdir(directory) else []
  with_dice = [n for n in kept if os.path.isdir(os.path.join(directory, n, "metrics"))]
  return str(steps) in kept and bool(with_dice) and all(n.isdigit() for n in kept)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--timeout", type=float, default=300)
  args = p.parse_args()
  clean = 0
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.runs):
      outcome, seconds, error = run_once(os.path.join(tmp, str(i)), args.steps,
                                         args.timeout)
      clean += outcome == "clean"
      print(f"run {i + 1}/{args.runs}: {outcome} in {seconds:.0f} s"
            + (f"  ({error})" if error and outcome != "clean" else ""), flush=True)
  print(f"{clean} of {args.runs} two-process trainings finished cleanly")


if __name__ == "__main__":
  main()
