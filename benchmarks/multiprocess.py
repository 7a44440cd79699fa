"""Cross-process all-reduce overhead: 1 process x 4 devices versus 2 processes x 2 devices.

    python benchmarks/multiprocess.py [--steps=30]

Both settings train the same U-Net (depth 4, base 16, 128x128, global batch 16) through
`medseg_jax.main` on simulated CPU devices; the median step time comes from the run's
metrics.jsonl (first 5 steps, which include compilation, left out). Also prints the
bytes all-reduced per step (float32 gradients) for the thesis-size U-Net and FCN.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/quickstart.py", "--config.model.depth=4",
        "--config.model.base_features=16", "--config.data.image_size=128",
        "--config.data.synthetic_volumes=8", "--config.train.per_device_batch_size=4",
        "--config.train.eval_every_steps=0", "--config.checkpoint.every_steps=0",
        "--config.monitor.log_every_steps=1", "--config.data.val_fraction=0.15",
        "--config.data.test_fraction=0.15"]


def median_step(workdir: str) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    times = [json.loads(line)["step_time"] for line in f][5:]
  return float(np.median(times))


def run(processes: int, steps: int, workdir: str) -> float:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHON"] = sys.executable  # the launcher runs this interpreter
  args = ARGS + [f"--config.train.num_steps={steps}", f"--workdir={workdir}"]
  if processes == 1:
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    cmd = [sys.executable, "-m", "medseg_jax.main", *args]
  else:
    env["CPU_DEVICES_PER_PROCESS"] = str(4 // processes)
    cmd = ["bash", "launch/local.sh", str(processes), *args]
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=3600)
  return median_step(workdir)


def gradient_bytes() -> dict[str, int]:
  sys.path.insert(0, REPO)
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from medseg_jax.models import FCN, UNet  # pylint: disable=import-outside-toplevel
  out = {}
  for name, model, size in (("U-Net (base 64, depth 4)", UNet(num_classes=2), 240),
                            ("FCN-8s (VGG-16, fc 4096)", FCN(num_classes=2), 224)):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 1)))
    out[name] = sum(x.size for x in jax.tree.leaves(shapes["params"])) * 4
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=30)
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    one = run(1, args.steps, os.path.join(tmp, "one"))
    two = run(2, args.steps, os.path.join(tmp, "two"))
  print(f"1 process  x 4 devices: median step {one:.3f} s")
  print(f"2 processes x 2 devices: median step {two:.3f} s  (ratio {two / one:.2f})")
  for name, size in gradient_bytes().items():
    print(f"all-reduced per step, {name}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
  main()
