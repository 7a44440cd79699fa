"""The dashboard in a real headless browser (Debian's Chromium, driven by Playwright): a
tiny run that trains is listed, its loss curve gains points, Stop ends it at a checkpoint
with exit 0, and Resume continues it to the end."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO, TINY, env_with_devices
from test_dashboard import _serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="needs Playwright (requirements-dev.txt)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")
# As root and on a machine without a network: no sandbox, and no background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PACE = '''
import time


class Pace:
  """Sleeps at every logged step, so that a person (or a test) can watch the run."""

  def __init__(self, context):
    del context

  def on_log(self, step, record):
    time.sleep(0.1)
'''


def _end(workdir, timeout=180):
  """Process 0's end record once it has one."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    try:
      end = json.loads((workdir / "processes" / "0.json").read_text())["end"]
    except (OSError, ValueError):
      end = None
    if end:
      return end
    time.sleep(0.1)
  pytest.fail(f"{workdir}: no end recorded in {timeout} s")


def test_a_run_is_watched_stopped_and_resumed_from_the_browser(tmp_path):
  runs, plugin = tmp_path / "runs", tmp_path / "pace.py"
  workdir = runs / "tiny"
  plugin.write_text(PACE)
  env, log = env_with_devices(1), open(tmp_path / "train.err", "w")
  train = subprocess.Popen(
      [sys.executable, "-m", "medseg_jax.main", *TINY, f"--workdir={workdir}",
       "--config.train.num_steps=120", "--config.monitor.log_every_steps=2",
       "--config.train.eval_every_steps=100", f"--config.train.plugins=('{plugin}:Pace',)"],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
  os.makedirs(runs, exist_ok=True)
  server, url = _serve(runs)
  try:
    with playwright.sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
      page = browser.new_page()
      page.on("dialog", lambda dialog: dialog.accept())  # the confirmations
      page.goto(url + "?refresh=300")
      page.wait_for_selector('tr[data-run="tiny"] .status.running', timeout=120_000)
      page.goto(url + "run/tiny?refresh=300")
      loss = '#chart-loss path[data-series="loss"]'
      page.wait_for_selector(loss, timeout=60_000)
      seen = int(page.get_attribute(loss, "data-points"))
      page.wait_for_function(f"document.querySelector('{loss}').dataset.points > {seen}",
                             timeout=60_000)
      page.click("#stop")
      assert train.wait(120) == 0, (tmp_path / "train.err").read_text()[-2000:]
      end = _end(workdir)
      assert end["reason"] == "stopped" and "the user's stop request" in end["message"]
      checkpoints = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
      stopped = checkpoints[-1]
      assert 0 < stopped < 120 and f"after step {stopped}" in end["message"]
      page.wait_for_selector("#status.stopped", timeout=30_000)
      page.wait_for_selector("#processes td:has-text('stopped (exit 0)')", timeout=30_000)
      assert socket.gethostname() in page.inner_text("#processes")
      page.click("#resume")
      page.wait_for_selector("#status.running", timeout=60_000)
      page.wait_for_selector("#status.finished", timeout=180_000)
      browser.close()
  finally:
    server.terminate()
    server.wait(10)
    train.kill()
    log.close()
  end = _end(workdir)
  assert (end["reason"], end["exit_code"]) == ("finished", 0)
  assert "trained to step 120" in end["message"]
  assert f"Resuming from checkpoint at step {stopped}" in (workdir / "train.log").read_text()
