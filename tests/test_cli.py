"""The command line every command shares: the flag forms absl reads, and the interpreter
the launchers start."""

import glob
import os
import stat
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from helpers import REPO, env_with_devices
from medseg_jax import cli

# Every module of the package that runs as a command.
COMMANDS = sorted(
    os.path.relpath(p, REPO)[:-3].replace(os.sep, ".")
    for p in glob.glob(os.path.join(REPO, "medseg_jax", "**", "*.py"), recursive=True)
    if 'if __name__ == "__main__":' in open(p).read())
def run(module, *args, env=None):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=env or dict(os.environ, PYTHONPATH=REPO))


def one_error_line(proc, code=2):
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == code and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error: "), lines[0]
  return lines[0]


def test_the_commands_are_found():
  assert {"medseg_jax.main", "medseg_jax.tuning.study", "medseg_jax.tuning.guideline",
          "medseg_jax.data.validate"} <= set(COMMANDS)


@pytest.mark.parametrize("args", [
    ["--config", "configs/quickstart.py", "--config.train.loss", "focal"],
    ["-config=configs/quickstart.py", "-config.train.loss=focal"],
    ["-config", "configs/quickstart.py", "--config.train.loss=focal"],
    ["--flagfile=FLAGFILE"],
], ids=["space", "one_dash", "one_dash_space", "flagfile"])
def test_main_reads_every_flag_form(tmp_path, args):
  """The config file and its override are read in each form: the config check rejects the
  overridden loss (the quickstart's own loss passes)."""
  flagfile = tmp_path / "flags"
  flagfile.write_text("--config=configs/quickstart.py\n--config.train.loss=focal\n")
  args = [a.replace("FLAGFILE", str(flagfile)) for a in args]
  proc = run("medseg_jax.main", *args, f"--workdir={tmp_path / 'run'}")
  assert one_error_line(proc).startswith("error: train.loss='focal'")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_reads_config_with_a_space(module):
  """`--config FILE --config.KEY VALUE`: the file is loaded and the override's key is looked
  up in it."""
  proc = run(module, "--config", "configs/quickstart.py", "--config.train.num_stepz", "3")
  assert "configs/quickstart.py has no config key 'train.num_stepz'" in one_error_line(proc)


@pytest.mark.parametrize("module", COMMANDS)
def test_a_missing_config_file_given_with_a_space_is_named(module):
  proc = run(module, "--config", "configs/nope.py", "--config.seed", "1")
  assert one_error_line(proc) == "error: --config: config file 'configs/nope.py' not found"


def test_config_args_pass_on_in_one_form():
  """What the tools pass on to their training runs, from a command line in mixed forms."""
  argv = ["tool", "-config", "configs/quickstart.py", "--workdir", "--config.seed=9",
          "--config.optim.lr", "1e-3", "--noconfig.data.synthetic", "--config.data.label_map=()",
          "-config.model.init_from", "a b", "positional", "--config.seed", "3", "--",
          "--config.seed=4"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(argv)
  assert values.workdir == "--config.seed=9" and values.config.seed == 3
  assert cli.config_args(argv, values) == [
      "--config=configs/quickstart.py", "--config.optim.lr=1e-3", "--noconfig.data.synthetic",
      "--config.data.label_map=()", "--config.model.init_from=a b", "--config.seed=3"]


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
