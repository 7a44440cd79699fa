"""Step time with monitoring on (TensorBoard events, system sampling) versus off.

    python benchmarks/monitor_overhead.py [--steps=150] [--repeats=2]

Runs the quickstart training for `--steps` steps through `medseg_jax.main`,
alternating on/off `--repeats` times, and compares the median logged step time
(records after the first, which includes compilation).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_times(workdir: str, steps: int, enabled: bool) -> list[float]:
  cmd = [sys.executable, "-m", "medseg_jax.main", "--config=configs/quickstart.py",
         f"--workdir={workdir}", f"--config.train.num_steps={steps}",
         "--config.train.eval_every_steps=0", "--config.checkpoint.every_steps=0",
         "--config.monitor.log_every_steps=10", f"--config.monitor.enabled={enabled}",
         "--config.monitor.system_interval_seconds=2"]
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=3600)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step_time"] for line in f if "step_time" in line][1:]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args()
  times = {True: [], False: []}
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "shared")
    for r in range(args.repeats):
      for enabled in (True, False):
        workdir = os.path.join(tmp, f"{enabled}_{r}")
        os.makedirs(workdir)
        if os.path.isdir(data):  # reuse the synthetic dataset written by the first run
          os.symlink(data, os.path.join(workdir, "data"))
        times[enabled] += step_times(workdir, args.steps, enabled)
        if not os.path.isdir(data):
          os.rename(os.path.join(workdir, "data"), data)
          os.symlink(data, os.path.join(workdir, "data"))
  on, off = float(np.median(times[True])), float(np.median(times[False]))
  print(f"monitoring on : median step {on:.4f} s ({len(times[True])} windows)")
  print(f"monitoring off: median step {off:.4f} s ({len(times[False])} windows)")
  print(f"overhead: {100 * (on / off - 1):+.2f}%")


if __name__ == "__main__":
  main()
