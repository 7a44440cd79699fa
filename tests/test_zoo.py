"""The local model zoo (`python -m medseg_jax.zoo`) and fine-tuning from a model file
(`model.init_from=FILE|NAME`), on a real run exported with `--mode=export`: the commands
run as a user runs them, files are read back with zipfile and json, and a fine-tuned run's
first weights are compared with the source run's orbax checkpoint."""

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

import helpers
from helpers import REPO, TINY
from medseg_jax import config, zoo
from medseg_jax.errors import ConfigError, MedsegError
from medseg_jax.training import checkpoint, loop

# A tiny U-Net trained 2 steps: its one checkpoint, step 2, is the best and the latest.
RUN = TINY[1:] + ["--config.train.num_steps=2", "--config.train.eval_every_steps=2",
                  "--config.checkpoint.every_steps=2", "--config.parallel.num_devices=2"]
STEP = 2
# The same run with batch norm: the model file carries its norm statistics.
BATCH_NORM = RUN + ["--config.model.norm=batch"]


def command(module, *args, env=None, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=dict(env or os.environ, PYTHONPATH=REPO))


def zoo_command(*args, env=None):
  return command("medseg_jax.zoo", *args, env=env)


def one_error_line(proc, code):
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == code and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr, lines[0]
  return lines[0]


def trained_and_exported(root, run):
  """(the workdir of a run of `run` trained in `root`, its model file exported from the
  best checkpoint)."""
  workdir, output = str(root / "run_a"), str(root / "exported" / "run_a.zip")
  helpers.train(helpers.config(*run), workdir)
  proc = command("medseg_jax.main", "--mode=export", f"--workdir={workdir}",
                 "--checkpoint=best", f"--output={output}", timeout=600)
  assert proc.returncode == 0 and os.path.isfile(output), proc.stderr[-3000:]
  return workdir, output


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  return trained_and_exported(tmp_path_factory.mktemp("source"), RUN)


def summary_of(path):
  """The summary a model file's index holds, read with zipfile and json alone."""
  with zipfile.ZipFile(path) as archive:
    return json.loads(archive.read("medseg_model.json"))["summary"]


def sha256(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def size_text(size):
  return f"{size} B" if size < 1000 else (f"{size / 1e3:.1f} kB" if size < 1e6
                                          else f"{size / 1e6:.1f} MB")


def listed(stdout):
  """The rows `zoo list` printed (columns are two or more spaces apart), by name."""
  rows = [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines()]
  assert rows[0] == ["name", "task", "classes", "modalities", "input", "test Dice",
                     "exported", "size"], stdout
  return {row[0]: row[1:] for row in rows[1:]}


def expected_row(path):
  summary = summary_of(path)
  dice = summary["test_dice"]
  size = summary["image_size"]
  task = summary["task"]  # a long task is cut to 40 characters
  return [task if len(task) <= 40 else task[:39] + "…", ",".join(summary["classes"]),
          ",".join(summary["modalities"]),
          f"{size}x{size}x{summary['channels']}", "-" if dice is None else f"{dice:.4f}",
          summary["exported"][:10], size_text(os.path.getsize(path))]


def test_install_list_show_and_remove_in_a_models_directory(source, tmp_path):
  _, model = source
  models = tmp_path / "models"
  flag = f"--models_dir={models}"
  name = summary_of(model)["name"]
  proc = zoo_command("install", model, flag)
  assert proc.returncode == 0, proc.stderr[-3000:]
  installed = models / f"{name}.zip"
  assert sha256(installed) == sha256(model) and os.listdir(models) == [f"{name}.zip"]
  proc = zoo_command("install", model, "--name=heart-v2", flag)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = zoo_command("list", flag)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert listed(proc.stdout) == {name: expected_row(installed),
                                 "heart-v2": expected_row(models / "heart-v2.zip")}
  with zipfile.ZipFile(model) as archive:
    card = archive.read("MODEL.md").decode()
  proc = zoo_command("show", "heart-v2", flag)
  assert proc.returncode == 0 and proc.stdout.rstrip("\n") == card.rstrip("\n")
  # An existing name stays unless --overwrite; a name that is no file name is refused.
  before = os.stat(installed).st_mtime_ns
  line = one_error_line(zoo_command("install", model, flag), 1)
  assert line == (f"error: {name}: already in the zoo {models} (--overwrite replaces it, "
                  "--name=NAME installs it under another name)")
  assert os.stat(installed).st_mtime_ns == before
  assert zoo_command("install", model, "--overwrite", flag).returncode == 0
  assert os.stat(installed).st_mtime_ns != before and sha256(installed) == sha256(model)
  for bad in ("../elsewhere", ".hidden", "two words", "x.zip"):
    assert one_error_line(zoo_command("install", model, f"--name={bad}", flag), 2).startswith(
        f"error: --name={bad!r}: not a model name")
  proc = zoo_command("remove", "heart-v2", flag)
  assert proc.returncode == 0 and os.listdir(models) == [f"{name}.zip"]
  assert one_error_line(zoo_command("remove", "heart-v2", flag), 1) == (
      f"error: heart-v2: no such model in the zoo {models}")
  assert one_error_line(zoo_command("show", "heart-v2", flag), 1).startswith(
      "error: show=heart-v2: neither a file nor a model in the zoo")
  assert one_error_line(zoo_command("frobnicate", flag), 2).startswith("error: usage: ")


def test_the_directory_comes_from_medseg_models_else_the_users_cache(source, tmp_path,
                                                                     monkeypatch):
  _, model = source
  name = summary_of(model)["name"]
  env = {k: v for k, v in os.environ.items() if k != zoo.ENV}
  by_env = dict(env, MEDSEG_MODELS=str(tmp_path / "shared"), XDG_CACHE_HOME=str(tmp_path / "c"))
  assert zoo_command("install", model, env=by_env).returncode == 0
  assert os.listdir(tmp_path / "shared") == [f"{name}.zip"] and not (tmp_path / "c").exists()
  proc = zoo_command("list", env=by_env)
  assert proc.returncode == 0 and list(listed(proc.stdout)) == [name]
  by_cache = dict(env, XDG_CACHE_HOME=str(tmp_path / "c"))
  assert zoo_command("install", model, "--name=cached", env=by_cache).returncode == 0
  assert os.listdir(tmp_path / "c" / "medseg_jax" / "models") == ["cached.zip"]
  # --model=NAME (and model.init_from=NAME) find an installed model there.
  monkeypatch.setenv(zoo.ENV, str(tmp_path / "shared"))
  assert zoo.resolve(name) == str(tmp_path / "shared" / f"{name}.zip")
  assert zoo.resolve("cached", str(tmp_path / "c" / "medseg_jax" / "models")) == str(
      tmp_path / "c" / "medseg_jax" / "models" / "cached.zip")
  assert zoo.resolve(model) == model
  with pytest.raises(MedsegError, match=r"^--model=cached: neither a file nor a model in the "
                                        f"zoo {tmp_path / 'shared'} "):
    zoo.resolve("cached")


def damaged_copies(model, directory):
  """Copies of the model file, each damaged in one way: {name: (path, what the error says)}."""
  with zipfile.ZipFile(model) as archive:
    members = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    params = archive.getinfo("params.msgpack")
  data = open(model, "rb").read()
  def rezip(name, changed):
    path = os.path.join(directory, name)
    with zipfile.ZipFile(path, "w") as archive:
      for member, content in changed.items():
        archive.writestr(member, content)
    return path
  index = json.loads(members["medseg_model.json"])
  flipped = bytearray(data)  # a byte of the stored parameters, as a bad disk would change it
  header = params.header_offset  # the local header: name and extra lengths at 26 and 28
  at = (header + 30 + int.from_bytes(data[header + 26:header + 28], "little")
        + int.from_bytes(data[header + 28:header + 30], "little") + 5)
  flipped[at] ^= 0xFF
  copies = {
      "truncated": (data[:len(data) // 2], "not a medseg_jax model file, or a truncated one"),
      "flipped": (bytes(flipped), "member params.msgpack is unreadable"),
  }
  found = {}
  for name, (content, message) in copies.items():
    path = os.path.join(directory, f"{name}.zip")
    open(path, "wb").write(content)
    found[name] = (path, message)
  changed = dict(members, **{"params.msgpack": members["params.msgpack"][:-1] + b"\0"})
  found["checksum"] = (rezip("checksum.zip", changed),
                       "member params.msgpack does not match its SHA-256")
  newer = dict(members, **{"medseg_model.json": json.dumps(dict(index, version=99))})
  found["version"] = (rezip("version.zip", newer), "model file format version 99")
  found["member"] = (rezip("member.zip", {k: v for k, v in members.items() if k != "MODEL.md"}),
                     "member MODEL.md is missing")
  return found


def test_a_damaged_file_is_not_installed_and_is_a_row_of_the_list(source, tmp_path):
  _, model = source
  (tmp_path / "bad").mkdir()
  models = tmp_path / "models"
  for name, (path, message) in damaged_copies(model, str(tmp_path / "bad")).items():
    line = one_error_line(zoo_command("install", path, f"--models_dir={models}"), 1)
    assert line.startswith(f"error: {path}: {message}"), (name, line)
    assert not models.exists() or os.listdir(models) == [], name
  # A file damaged in the directory does not stop the list: its row says what is wrong.
  assert zoo_command("install", model, "--name=good", f"--models_dir={models}").returncode == 0
  truncated = open(model, "rb").read()
  (models / "broken.zip").write_bytes(truncated[:len(truncated) // 2])
  proc = zoo_command("list", f"--models_dir={models}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = listed(proc.stdout)
  assert rows["good"] == expected_row(models / "good.zip")
  assert rows["broken"][0].startswith("damaged: not a medseg_jax model file, or a truncated one")


def start(cfg, workdir):
  """A run's first state as training would begin it (model.init_from applied)."""
  setup = loop.build(helpers.run_settings(cfg), str(workdir), helpers.parallel(cfg))
  ckpt = checkpoint.Checkpointer(str(workdir), cfg.checkpoint.max_to_keep)
  try:
    return setup, loop.resume(setup, ckpt)
  finally:
    ckpt.close()


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def saved_arrays(workdir, step=STEP):
  """A run's params and model state at `step`, read from its orbax checkpoint."""
  tree = checkpoint.read_state_tree(os.path.join(workdir, "checkpoints", str(step)))
  return flat(tree["params"]), flat(tree["model_state"])


def assert_same(ours, theirs):
  assert ours.keys() == theirs.keys() and ours
  for key, value in ours.items():
    np.testing.assert_array_equal(value, theirs[key], err_msg=key)


def test_fine_tuning_starts_from_the_model_file_then_trains(source, tmp_path):
  workdir, model = source
  assert summary_of(model)["step"] == STEP
  cfg = helpers.config(*RUN, f"--config.model.init_from={model}")
  config.check(cfg)
  setup, first = start(cfg, tmp_path / "run_b")
  params, _ = saved_arrays(workdir)
  assert int(first.step) == 0 and first.position.epoch == 0 and first.position.offset == 0
  assert_same(flat(first.state.params), params)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(first.state.opt_state))
  fresh = flat(setup.init_state.params)
  assert any(not np.array_equal(v, fresh[k]) for k, v in flat(first.state.params).items())
  # Run B trains from there and writes its own checkpoint.
  helpers.train(cfg, tmp_path / "run_b")
  trained = helpers.checkpoint_arrays(str(tmp_path / "run_b"), STEP, "params")
  assert any(not np.array_equal(a, b) for a, b in zip(trained, jax.tree.leaves(
      jax.device_get(first.state.params))))


def test_the_norm_statistics_come_with_the_parameters(tmp_path):
  workdir, model = trained_and_exported(tmp_path, BATCH_NORM)
  cfg = helpers.config(*BATCH_NORM, f"--config.model.init_from={model}")
  config.check(cfg)
  _, first = start(cfg, tmp_path / "run_b")
  params, model_state = saved_arrays(workdir)
  assert_same(flat(first.state.params), params)
  assert_same(flat(first.state.model_state), model_state)
  assert any(key.startswith("['batch_stats']") for key in model_state)


def test_another_class_count_renews_only_the_class_head(source, tmp_path, caplog):
  workdir, model = source
  caplog.set_level("INFO")
  cfg = helpers.config(*RUN, "--config.data.label_map=(0, 1, 2)",
                       f"--config.model.init_from={model}")
  config.check(cfg)
  setup, first = start(cfg, tmp_path / "run_c")
  params, _ = saved_arrays(workdir)
  ours, fresh = flat(first.state.params), flat(setup.init_state.params)
  head = sorted(k for k in ours if ours[k].shape != params[k].shape)
  assert head == ["['Conv_0']['bias']", "['Conv_0']['kernel']"]  # the 1x1 class conv
  for key, value in ours.items():
    np.testing.assert_array_equal(value, fresh[key] if key in head else params[key])
  assert "1 new (Conv_0)" in caplog.text


def test_a_zoo_model_by_name(source, tmp_path, monkeypatch):
  workdir, model = source
  models = tmp_path / "models"
  assert zoo_command("install", model, "--name=tumour", f"--models_dir={models}").returncode == 0
  monkeypatch.setenv(zoo.ENV, str(models))
  cfg = helpers.config(*RUN, "--config.model.init_from=tumour")
  config.check(cfg)
  _, first = start(cfg, tmp_path / "run_d")
  assert_same(flat(first.state.params), saved_arrays(workdir)[0])
  missing = helpers.config(*RUN, "--config.model.init_from=nosuchmodel")
  with pytest.raises(ConfigError, match=r"^model.init_from=nosuchmodel: neither a file nor a "
                                        f"model in the zoo {models} "):
    config.check(missing)


def test_another_network_or_a_damaged_file_is_refused_before_data_work(source, tmp_path):
  _, model = source
  workdir = tmp_path / "run"
  proc = command("medseg_jax.main", *TINY, "--config.model.name=fcn",
                 "--config.model.fc_features=8", f"--config.model.init_from={model}",
                 f"--workdir={workdir}")
  line = one_error_line(proc, 2)
  assert re.fullmatch(rf"error: model.init_from={re.escape(model)}: a model file of another "
                      r"model: it has no params/\S+", line), line
  assert not workdir.exists()
  wider = helpers.config(*RUN, "--config.model.base_features=8",
                         f"--config.model.init_from={model}")
  with pytest.raises(ConfigError, match=rf"^model.init_from={re.escape(model)}: params/"
                                        r"ConvBlock_0/Conv_0/bias has shape \[4\] in the "
                                        r"model file but \[8\] in the model$"):
    config.check(wider)
  # The same rule, by the same check, for a run's checkpoint.
  wider = helpers.config(*RUN, "--config.model.base_features=8",
                         f"--config.model.init_from={source[0]}")
  with pytest.raises(ConfigError, match=r"^model.init_from=\S+/checkpoints/2: params/ConvBlock_0/"
                                        r"Conv_0/bias has shape \[4\] in the checkpoint but "
                                        r"\[8\] in the model$"):
    config.check(wider)
  (tmp_path / "bad").mkdir()
  for path, message in damaged_copies(model, str(tmp_path / "bad")).values():
    cfg = helpers.config(*RUN, f"--config.model.init_from={path}")
    with pytest.raises(ConfigError, match=f"^model.init_from={re.escape(path)}: "
                                          f"{re.escape(message)}"):
      config.check(cfg)


def test_the_zoo_commands_start_without_jax():
  """They read a file's index and card: JAX (flax's import brings it) would add seconds."""
  proc = subprocess.run([sys.executable, "-c", "import sys, medseg_jax.zoo; "
                         "print(sorted(m for m in ('jax', 'flax') if m in sys.modules))"],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
