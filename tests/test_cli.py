"""The command line every command shares: the interpreter the launchers start."""

import glob
import os
import stat
import subprocess

import pytest

from helpers import REPO, env_with_devices


@pytest.fixture
def wrong_python3(tmp_path):
  """A PATH whose first `python3` is not this interpreter: it exits 97."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "python3"
  fake.write_text("#!/bin/sh\nexit 97\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  return dict(env_with_devices(None), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("launcher", ["launch/local.sh", "launch/cpu_devices.sh"])
def test_launchers_run_the_interpreter_named_by_python(wrong_python3, launcher):
  args = ["bash", launcher, "1", "--config=configs/nope.py"]
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=wrong_python3)
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --config: config file 'configs/nope.py' not found"), proc.stderr
  assert proc.returncode == 2
  del wrong_python3["PYTHON"]  # without it, the first python3 on PATH runs
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=wrong_python3)
  assert proc.returncode == 97, proc.stderr


def test_no_launcher_names_python3_but_as_the_default():
  """The launchers that need a cluster (ssh, Open MPI, SLURM) as well."""
  scripts = glob.glob(os.path.join(REPO, "launch", "*"))
  assert len(scripts) >= 5
  for script in scripts:
    for line in open(script):
      code = line.split("#", 1)[0] if not line.startswith("#!") else ""
      assert "python3" not in code.replace("${PYTHON:-python3}", ""), (script, line)
