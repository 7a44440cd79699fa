"""What the dashboard costs a training run, and how soon its Stop button ends one.

    python benchmarks/dashboard.py [--steps=150] [--repeats=2] [--stops=3]

1. The quickstart training (`configs/quickstart.py`, one process) for `--steps` steps,
   alternately with no dashboard and with the dashboard serving its run page to a
   headless Chromium (the page's own refresh, every 2 s): the median logged step time
   of each, over windows after the first (which includes compilation).
2. The time from a click on Stop (confirmed) to the exit of the training: of the one
   process of the quickstart, and of both processes of `launch/local.sh 2` (one CPU
   device each), `--stops` times each; the median.

Needs Playwright (requirements-dev.txt) and Chromium (Debian's package `chromium`).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from playwright.sync_api import sync_playwright

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
QUICKSTART = ["--config=configs/quickstart.py", "--config.train.eval_every_steps=0",
              "--config.checkpoint.every_steps=0", "--config.monitor.log_every_steps=10",
              "--config.monitor.system_interval_seconds=2"]


def serve(runs: str) -> tuple[subprocess.Popen, str]:
  proc = subprocess.Popen([sys.executable, "-m", "medseg_jax.dashboard", runs], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  return proc, re.search(r"(http://\S+)", proc.stdout.readline()).group(1)


def train(workdir: str, steps: int, processes: int = 1) -> subprocess.Popen:
  args = [f"--workdir={workdir}", *QUICKSTART, f"--config.train.num_steps={steps}"]
  if processes == 1:
    command = [sys.executable, "-m", "medseg_jax.main", *args]
  else:
    command = ["bash", "launch/local.sh", str(processes), *args]
  env = dict(os.environ, CPU_DEVICES_PER_PROCESS="1", PYTHON=sys.executable)
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)


def wait_for(path: str, proc: subprocess.Popen, timeout: float = 600) -> None:
  deadline = time.time() + timeout
  while not os.path.exists(path):
    if proc.poll() is not None or time.time() > deadline:
      raise RuntimeError(f"training ended before {path} appeared")
    time.sleep(0.05)


def step_times(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step_time"] for line in f if "step_time" in line][1:]


def overhead(tmp: str, browser, steps: int, repeats: int) -> dict[bool, list[float]]:
  times = {True: [], False: []}
  for r in range(repeats):
    for watched in (False, True):
      runs = os.path.join(tmp, f"overhead_{watched}_{r}")
      workdir = os.path.join(runs, "run")
      os.makedirs(workdir)
      _share_data(tmp, workdir)
      server = page = None
      if watched:
        server, url = serve(runs)
      proc = train(workdir, steps)
      if watched:
        wait_for(os.path.join(workdir, "manifest.json"), proc)
        page = browser.new_page()
        page.goto(url + "run/run")
      proc.wait()
      if page is not None:
        page.close()
        server.terminate()
        server.wait()
      times[watched] += step_times(workdir)
      _keep_data(tmp, workdir)
  return times


def _share_data(tmp: str, workdir: str) -> None:
  """The synthetic dataset written by the first run, reused by the others."""
  if os.path.isdir(os.path.join(tmp, "data")):
    os.symlink(os.path.join(tmp, "data"), os.path.join(workdir, "data"))


def _keep_data(tmp: str, workdir: str) -> None:
  if not os.path.isdir(os.path.join(tmp, "data")):
    os.rename(os.path.join(workdir, "data"), os.path.join(tmp, "data"))


def stop_latency(tmp: str, browser, processes: int, repeat: int) -> float:
  runs = os.path.join(tmp, f"stop_{processes}_{repeat}")
  workdir = os.path.join(runs, "run")
  os.makedirs(workdir)
  _share_data(tmp, workdir)
  server, url = serve(runs)
  proc = train(workdir, 100_000, processes)
  try:
    wait_for(os.path.join(workdir, "metrics.jsonl"), proc)
    page = browser.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(url + "run/run")
    page.wait_for_selector("#stop:not([hidden])")
    clicked = time.perf_counter()
    page.click("#stop")
    code = proc.wait(600)
    seconds = time.perf_counter() - clicked
    page.close()
  finally:
    proc.kill()
    server.terminate()
    server.wait()
  if code != 0:
    raise RuntimeError(f"the stopped run exited with {code}")
  return seconds


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--stops", type=int, default=3)
  args = p.parse_args()
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
    times = overhead(tmp, browser, args.steps, args.repeats)
    stops = {n: [stop_latency(tmp, browser, n, r) for r in range(args.stops)] for n in (1, 2)}
    browser.close()
  on, off = float(np.median(times[True])), float(np.median(times[False]))
  print(f"no dashboard      : median step {off:.4f} s ({len(times[False])} windows)")
  print(f"run page open     : median step {on:.4f} s ({len(times[True])} windows)")
  print(f"overhead: {100 * (on / off - 1):+.2f}%")
  for n, seconds in stops.items():
    print(f"Stop click to exit, {n} process(es): median {np.median(seconds):.2f} s "
          f"({', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
  main()
