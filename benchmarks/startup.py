"""Start-up of the commands: wall time from launch to exit of a command that does almost
nothing, so the time is the imports and the flag parsing.

    python benchmarks/startup.py [--repeats=7]

Medians of `--repeats` runs each, after one unmeasured run (the OS's file cache).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_seconds(args: list[str], repeats: int) -> float:
  times = []
  for i in range(repeats + 1):
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True)  # absl: --help exits 1
    if i:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as models:
    commands = {"python -c pass": ["-c", "pass"],
                "python -c 'import jax'": ["-c", "import jax"],
                "medseg_jax.zoo list": ["-m", "medseg_jax.zoo", "list", f"--models_dir={models}"],
                "medseg_jax.main --help": ["-m", "medseg_jax.main", "--help"],
                "medseg_jax.main, a mistyped config key": [
                    "-m", "medseg_jax.main", "--config=configs/quickstart.py",
                    "--config.train.num_epoch=1"],
                "python -c 'import medseg_jax.commands'": ["-c", "import medseg_jax.commands"],
                "python -c 'import tensorboardX'": ["-c", "import tensorboardX"],
                "... without PyTorch (events.summary_writer's way)": [
                    "-c", "import sys; sys.modules['torch'] = None; import tensorboardX"]}
    print("| command | median start to exit |")
    print("|---|---|")
    for name, command in commands.items():
      print(f"| `{name}` | {median_seconds(command, args.repeats):.2f} s |")


if __name__ == "__main__":
  main()
