"""The package as a user installs it: a wheel built from the project's files, installed into
a virtualenv and used from a directory that is not the repository."""

import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO

# What a wheel is built from: the package and the files pyproject.toml reads.
SOURCES = ("pyproject.toml", "README.md", "requirements.txt", "requirements-onnx.txt",
           "requirements-dev.txt", os.path.join("benchmarks", "requirements.txt"))


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  """A virtualenv (the machine's packages visible, its own pip none) with only the wheel
  installed into it, without its dependencies: those come from the machine."""
  root = tmp_path_factory.mktemp("packaging")
  source = root / "source"
  for name in SOURCES:
    os.makedirs(os.path.dirname(source / name), exist_ok=True)
    shutil.copy(os.path.join(REPO, name), source / name)
  shutil.copytree(os.path.join(REPO, "medseg_jax"), source / "medseg_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(root / "wheels"), str(source)])
  wheel, = (root / "wheels").iterdir()
  env = root / "venv"
  _check([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env)])
  _check([str(env / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)])
  return env


def _check(cmd):
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _run(venv, tmp_path, *cmd):
  """`cmd` run with the virtualenv's programs, in `tmp_path`, with no path to the repository."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
  return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)


def test_the_wheel_is_what_runs_and_its_command_has_the_flags_and_help(venv, tmp_path):
  proc = _run(venv, tmp_path, "python", "-c", "import medseg_jax; print(medseg_jax.__file__)")
  assert proc.stdout.strip().startswith(str(venv)), proc.stdout + proc.stderr
  proc = _run(venv, tmp_path, "medseg-jax", "--help")  # absl's help exits 1
  assert "--config" in proc.stdout and "--mode: <train|evaluate|predict|export>" in proc.stdout
  assert "Entry point: medseg-jax" in proc.stdout


def test_a_config_file_outside_the_repository_is_checked_against_the_packaged_defaults(
    venv, tmp_path):
  (tmp_path / "mine.py").write_text(
      "from medseg_jax import defaults\n\n\ndef get_config():\n"
      "  c = defaults.get_config()\n  del c.train['eval_batch_size']\n  return c\n")
  proc = _run(venv, tmp_path, "medseg-jax", "--config=mine.py", "--workdir=run")
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and lines == [
      "error: mine.py: lacks config keys train.eval_batch_size (a config has exactly the keys "
      "of medseg_jax/defaults.py)"], proc.stderr[-3000:]
  assert not (tmp_path / "run").exists()


def test_the_wheel_requires_the_pinned_requirements(venv, tmp_path):
  proc = _run(venv, tmp_path, "python", "-c",
              "import importlib.metadata as m; print('\\n'.join(m.requires('medseg-jax')))")
  required = set(proc.stdout.split("\n")) - {""}
  pinned = {line.split("#")[0].strip() for line in open(os.path.join(REPO, "requirements.txt"))
            if line.split("#")[0].strip()}
  assert pinned and pinned <= required, pinned - required
  assert {"jax==0.10.2", "jaxlib==0.10.2", "onnxruntime==1.32.0; extra == \"onnx\""} <= required
