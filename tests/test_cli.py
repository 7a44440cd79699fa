"""The command line every command shares: the flag forms absl reads, a config file's keys
against the package's defaults, and the interpreter the launchers start."""

import glob
import os
import stat
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from helpers import REPO, env_with_devices
from medseg_jax import cli, config_schema
from medseg_jax.errors import ConfigError

# Every module of the package that runs as a command.
COMMANDS = sorted(
    os.path.relpath(p, REPO)[:-3].replace(os.sep, ".")
    for p in glob.glob(os.path.join(REPO, "medseg_jax", "**", "*.py"), recursive=True)
    if 'if __name__ == "__main__":' in open(p).read())
# Those that read a config file (`--config`); the model zoo's command has none.
CONFIG_COMMANDS = [m for m in COMMANDS
                   if "cli.config_flag()" in open(os.path.join(REPO, *m.split(".")) + ".py").read()]
# A complete config written before data.augment.samples_per_epoch (and model.init_from,
# model.init_checkpoint) existed.
OLD_CONFIG = "tests/old_config.py"


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


@pytest.mark.parametrize("module", CONFIG_COMMANDS)
def test_every_command_reads_config_with_a_space(module):
  """`--config FILE --config.KEY VALUE`: the file is loaded and the override's key is looked
  up in it."""
  proc = run(module, "--config", "configs/quickstart.py", "--config.train.num_stepz", "3")
  assert "configs/quickstart.py has no config key 'train.num_stepz'" in one_error_line(proc)


@pytest.mark.parametrize("module", CONFIG_COMMANDS)
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


@pytest.mark.parametrize("module", CONFIG_COMMANDS)
def test_a_config_lacking_keys_of_base_is_one_line_naming_them(tmp_path, module):
  workdir = [f"--workdir={tmp_path / 'run'}"] if module == "medseg_jax.main" else []
  proc = run(module, f"--config={OLD_CONFIG}", *workdir)
  line = one_error_line(proc)
  prefix, suffix = f"error: {OLD_CONFIG}: lacks config keys ", (
      " (a config has exactly the keys of medseg_jax/defaults.py)")
  assert line.startswith(prefix) and line.endswith(suffix), line
  # Keys added to the defaults since, by when they came: the file has none of them.
  named = line[len(prefix):-len(suffix)].split(", ")
  assert {"data.augment.samples_per_epoch", "model.init_checkpoint",
          "model.init_from"} <= set(named) and named == sorted(named)
  assert not (tmp_path / "run").exists()


def _config_file(tmp_path, *lines):
  path = tmp_path / "mine.py"
  path.write_text("from medseg_jax import defaults\n\n\ndef get_config():\n  c = defaults.get_config()\n"
                  + "".join(f"  {line}\n" for line in lines) + "  return c\n")
  return str(path)


def test_every_missing_and_unknown_key_is_named(tmp_path):
  path = _config_file(tmp_path, 'del c.train["eval_batch_size"]', 'del c.data.augment["zoom"]',
                      "c.optim.learning_rate = 0.1")
  proc = run("medseg_jax.main", f"--config={path}", f"--workdir={tmp_path / 'run'}",
             "--config.train.num_steps", "1")
  assert one_error_line(proc) == (
      f"error: {path}: lacks config keys data.augment.zoom, train.eval_batch_size; has "
      "unknown config keys optim.learning_rate (a config has exactly the keys of "
      "medseg_jax/defaults.py)")
  assert not (tmp_path / "run").exists()


def test_the_keys_are_checked_from_any_directory(tmp_path):
  """The reference keys come with the package, not from the current directory."""
  path = tmp_path / "scratch.py"
  path.write_text("import ml_collections\n\n\ndef get_config():\n"
                  "  return ml_collections.ConfigDict({'seed': 0})\n")
  proc = subprocess.run([sys.executable, "-m", "medseg_jax.main", f"--config={path}"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=REPO))
  assert "lacks config keys checkpoint.every_steps, " in one_error_line(proc)
  assert os.listdir(tmp_path) == ["scratch.py"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))),
                         ids=os.path.basename)
def test_shipped_configs_have_the_keys_of_base(path):
  if "def get_config" in open(path).read():
    config_schema.check_keys(config_schema.load_config(path), path)


def test_a_config_that_is_not_a_config_dict_is_named(tmp_path):
  with pytest.raises(ConfigError, match=r"^x\.py: get_config\(\) returned dict"):
    config_schema.check_keys({"seed": 0}, "x.py")


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
