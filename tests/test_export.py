"""--mode=export and --mode=predict --model through the real command line: the model file
read back with zipfile, json, hashlib and Flax's msgpack against the run's orbax
checkpoint; predicting from it against predicting from the run (byte for byte), with
ONNX Runtime against JAX; a user's network carried in the file; a run trained by two
processes; and every kind of damaged file or wrong input refused with one line."""

import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import flax.serialization
import jax
import nibabel as nib
import numpy as np
import pytest

import helpers
from helpers import REPO, TINY as TINY_RUN
from medseg_jax import config_schema
from medseg_jax.export import from_file, onnx_graph
from medseg_jax.training import checkpoint

# Checkpoints at steps 2 and 3, both validated: one of them is the best, tested at the end.
TINY = TINY_RUN + ["--config.train.num_steps=3", "--config.train.eval_every_steps=2",
                   "--config.checkpoint.every_steps=2"]
# Probabilities of ONNX Runtime and JAX agree within this (docs/export_and_zoo.md, "Share a model").
ENGINE_TOLERANCE = 1e-5


def run_main(*args, cwd=REPO, env=None, timeout=300):
  env = dict(env or os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "medseg_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _files(directory) -> dict[str, bytes]:
  return {name: open(os.path.join(directory, name), "rb").read()
          for name in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run trained in this process; its test volumes predicted from its best
  checkpoint through the command line (the reference); the best checkpoint exported."""
  base = tmp_path_factory.mktemp("export")
  workdir = base / "run"
  helpers.train(helpers.config(*TINY[1:]), workdir)
  _ok(run_main(*TINY, f"--workdir={workdir}", "--mode=predict", "--checkpoint=best",
               f"--input={workdir}/data/imagesTs", f"--output={base}/from_run",
               "--probabilities"))
  model = base / "exported" / "tiny.zip"
  _ok(run_main("--mode=export", f"--workdir={workdir}", "--checkpoint=best",
               f"--output={model}", "--name=tiny"))
  with open(workdir / "eval" / "test_metrics.json") as f:
    best = json.load(f)["step"]
  return workdir, model, base / "from_run", best


def test_predicting_from_the_model_file_writes_the_bytes_of_the_run(run, tmp_path):
  """From another directory, with neither the workdir, the dataset nor a config file."""
  workdir, model, from_run, _ = run
  moved = tmp_path / "elsewhere" / "model.zip"
  os.makedirs(moved.parent)
  shutil.copy(model, moved)
  _ok(run_main("--mode=predict", f"--model={moved}", f"--input={workdir}/data/imagesTs",
               "--output=out", "--probabilities", "--engine=jax", cwd=tmp_path))
  expected = _files(from_run)
  assert len(expected) == 4  # 2 volumes, labels and probabilities
  labels = np.asarray(nib.load(from_run / "phantom_006.nii.gz").dataobj)
  assert len(np.unique(labels)) > 1
  assert _files(tmp_path / "out") == expected


def _read_independently(path) -> tuple[dict, dict[str, bytes]]:
  """The index and the members of a model file, each checked against its SHA-256."""
  with zipfile.ZipFile(path) as archive:
    assert archive.namelist()[0] == "medseg_model.json"
    index = json.loads(archive.read("medseg_model.json"))
    members = {name: archive.read(name) for name in archive.namelist()[1:]}
  assert set(index["members"]) == set(members)
  for name, data in members.items():
    assert hashlib.sha256(data).hexdigest() == index["members"][name], name
  return index, members


def test_the_model_file_holds_the_checkpoint_read_back_independently(run):
  workdir, model, _, best = run
  index, members = _read_independently(model)
  assert (index["format"], index["version"]) == ("medseg_jax model", 1)
  step_dir = os.path.join(checkpoint.directory(workdir), str(best))
  state = checkpoint.read_state_tree(step_dir)
  variables = flax.serialization.msgpack_restore(members["params.msgpack"])
  saved, carried = jax.tree.leaves_with_path(state["params"]), jax.tree.leaves_with_path(
      variables["params"])
  assert [p for p, _ in saved] == [p for p, _ in carried] and len(saved) > 4
  for (_, a), (_, b) in zip(saved, carried):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  with open(workdir / "config.json") as f:
    assert json.loads(members["config.json"]) == json.load(f)
  with open(workdir / "eval" / "test_metrics.json") as f:
    test = json.load(f)
  assert json.loads(members["metrics.json"])["test"] == test
  info = json.loads(members["model.json"])
  assert info["step"] == best and info["classes"] == ["background", "oedema+tumour"]
  assert info["preprocessing"]["image_size"] == 32 and info["modalities"] == ["T1w"]
  assert set(index["summary"]) == {"name", "task", "classes", "labels", "modalities",
                                   "image_size", "channels", "test_dice", "exported", "step",
                                   "network"}
  assert index["summary"] == dict(
      index["summary"], name="tiny", step=best, classes=["background", "oedema+tumour"],
      labels=[0, 1], modalities=["T1w"], image_size=32, channels=1, network="unet",
      test_dice=test["dice_foreground"])
  card = members["MODEL.md"].decode()
  for text in ("## Metrics", f"{test['dice_foreground']:.4f}", "Global batch: 16",
               "Optimizer: adam", "--mode=predict --model="):
    assert text in card


def test_a_checkpoint_without_test_metrics_says_so(run, tmp_path):
  """The other kept step was never tested: no metrics are made up for it."""
  workdir, _, _, best = run
  other = 5 - best  # steps 2 and 3 are kept
  out = tmp_path / "other.zip"
  _ok(run_main("--mode=export", f"--workdir={workdir}", f"--checkpoint={other}",
               f"--output={out}"))
  _, members = _read_independently(out)
  metrics = json.loads(members["metrics.json"])
  assert metrics["test"] is None and f"no test metrics for step {other}" in metrics["test_note"]
  index = json.loads(zipfile.ZipFile(out).read("medseg_model.json"))
  assert index["summary"]["test_dice"] is None and index["summary"]["name"] == "run"
  assert "No test metrics" in members["MODEL.md"].decode()


def test_export_refuses_an_existing_output_unless_overwrite(run, tmp_path):
  workdir, _, _, _ = run
  out = tmp_path / "taken.zip"
  out.write_bytes(b"keep me")
  proc = run_main("--mode=export", f"--workdir={workdir}", f"--output={out}")
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
      f"error: {out}: exists (pass --overwrite to replace it)")
  assert out.read_bytes() == b"keep me"
  _ok(run_main("--mode=export", f"--workdir={workdir}", f"--output={out}", "--overwrite"))
  assert zipfile.is_zipfile(out)


def _onnx_extra() -> bool:
  return all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "jax2onnx"))


@pytest.mark.skipif(not _onnx_extra(), reason="the ONNX extra is not installed")
def test_onnx_runtime_predicts_what_jax_predicts(run, tmp_path):
  """The default engine, auto, runs ONNX Runtime here (one process on a CPU, a file with a
  graph). Probabilities within the stated tolerance; label maps equal except where the two
  largest probabilities are closer than it (both engines take the first of tied classes)."""
  workdir, model, from_run, _ = run
  proc = _ok(run_main("--mode=predict", f"--model={model}", f"--input={workdir}/data/imagesTs",
                      f"--output={tmp_path}", "--probabilities"))
  assert ("--engine=auto: onnxruntime (one process on a CPU, the file has an ONNX graph)"
          in proc.stderr)
  for name in ("phantom_006", "phantom_007"):
    jax_probs = nib.load(from_run / f"{name}_probs.nii.gz").get_fdata()
    ort_probs = nib.load(tmp_path / f"{name}_probs.nii.gz").get_fdata()
    np.testing.assert_allclose(ort_probs, jax_probs, rtol=0, atol=ENGINE_TOLERANCE)
    top2 = np.sort(jax_probs, axis=-1)[..., -2:]
    near_tie = top2[..., 1] - top2[..., 0] < 2 * ENGINE_TOLERANCE
    jax_labels = np.asarray(nib.load(from_run / f"{name}.nii.gz").dataobj)
    ort_labels = np.asarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj)
    assert np.array_equal(jax_labels[~near_tie], ort_labels[~near_tie])
    assert len(np.unique(jax_labels)) > 1


def test_the_auto_engine_picks_onnx_runtime_only_for_one_process_on_a_cpu(run, tmp_path):
  _, model, _, _ = run
  with_graph = from_file.load(str(model))
  without = from_file.load(str(_without_onnx(model, tmp_path / "no_graph.zip")))
  runs_graph = (with_graph.file.onnx is not None
                and importlib.util.find_spec("onnxruntime") is not None)
  assert from_file.choose_engine("auto", with_graph, 1, "cpu") == (
      "onnxruntime" if runs_graph else "jax")
  assert from_file.choose_engine("auto", with_graph, 2, "cpu") == "jax"
  assert from_file.choose_engine("auto", with_graph, 1, "gpu") == "jax"
  assert from_file.choose_engine("auto", without, 1, "cpu") == "jax"
  for engine in ("jax", "onnxruntime"):  # an engine asked for by name is the one used
    assert from_file.choose_engine(engine, without, 2, "gpu") == engine


def test_without_the_onnx_extra_the_file_has_no_graph_and_says_how_to_add_one(run, tmp_path):
  """The export in a Python where jax2onnx cannot be imported, as when the extra is not
  installed: one warning naming the install command, and a file without model.onnx."""
  workdir, _, _, _ = run
  out = tmp_path / "no_extra.zip"
  without = ("import runpy, sys; sys.modules['jax2onnx'] = None; "
             "runpy.run_module('medseg_jax.main', run_name='__main__', alter_sys=True)")
  proc = _ok(subprocess.run([sys.executable, "-c", without, "--mode=export",
                             f"--workdir={workdir}", f"--output={out}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300))
  warnings = [l for l in proc.stderr.splitlines() if "No ONNX graph" in l]
  assert len(warnings) == 1 and onnx_graph.EXTRA_INSTALL in warnings[0]
  _, members = _read_independently(out)
  assert "model.onnx" not in members and "params.msgpack" in members
  assert "carries no ONNX graph" in members["MODEL.md"].decode()
  why = json.loads(members["model.json"])["no_onnx_graph"]
  assert why == f"the ONNX extra was not installed at export ({onnx_graph.EXTRA_INSTALL})"
  proc = run_main("--mode=predict", f"--model={out}", "--engine=onnxruntime",
                  f"--input={workdir}/data/imagesTs", f"--output={tmp_path}/out")
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
      f"error: {out}: no ONNX graph (model.onnx) in the model file: {why}; use --engine=jax")


def _rewrite(source, target, change=None, drop=(), index_change=None):
  """A copy of the model file `source` at `target` with member contents replaced
  (`change`: name -> bytes), members dropped from the archive, and the index changed."""
  with zipfile.ZipFile(source) as archive:
    names = archive.namelist()
    members = {name: archive.read(name) for name in names}
  index = json.loads(members["medseg_model.json"])
  if index_change:
    index_change(index)
  members["medseg_model.json"] = json.dumps(index).encode()
  members.update(change or {})
  with zipfile.ZipFile(target, "w") as archive:
    for name in names:
      if name not in drop:
        archive.writestr(name, members[name])
  return target


def _without_onnx(source, target):
  def drop(index):
    index["members"].pop("model.onnx", None)
  return _rewrite(source, target, drop=("model.onnx",), index_change=drop)


def _flip_a_byte_of(source, target, member):
  """`source` with one byte of `member`'s stored data flipped, as a disk would damage it."""
  shutil.copy(source, target)
  with zipfile.ZipFile(source) as archive:
    info = archive.getinfo(member)
  with open(target, "r+b") as f:
    f.seek(info.header_offset + 26)
    name_length, extra_length = np.frombuffer(f.read(4), "<u2")
    f.seek(info.header_offset + 30 + int(name_length) + int(extra_length) + info.compress_size // 2)
    byte = f.read(1)[0]
    f.seek(-1, 1)
    f.write(bytes([byte ^ 0xFF]))
  return target


def _damaged(kind, model, tmp):
  """(--model value, the error line expected after `error: `) of one kind of bad file."""
  path = str(tmp / f"{kind}.zip")
  data = open(model, "rb").read()
  if kind == "truncated":
    open(path, "wb").write(data[:len(data) // 2])
    return path, f"{path}: not a medseg_jax model file, or a truncated one"
  if kind == "flipped_byte":
    return _flip_a_byte_of(model, path, "params.msgpack"), (
        f"{path}: member params.msgpack is unreadable (Bad CRC-32")
  if kind == "checksum":
    return _rewrite(model, path, change={"model.json": b'{"changed": true}'}), (
        f"{path}: member model.json does not match its SHA-256")
  if kind == "version":
    return _rewrite(model, path, index_change=lambda i: i.update(version=99)), (
        f"{path}: model file format version 99; this medseg_jax reads versions 1 to 2")
  if kind == "missing_member":
    return _rewrite(model, path, drop=("params.msgpack",)), (
        f"{path}: member params.msgpack is missing")
  if kind == "unlisted_member":
    return _rewrite(model, path, drop=("config.json",),
                    index_change=lambda i: i["members"].pop("config.json")), (
        f"{path}: member config.json is missing from the model file's index")
  return "no_such_model", f"--model=no_such_model: neither a file nor a model in the zoo {tmp}"


@pytest.mark.parametrize("kind", ["truncated", "flipped_byte", "checksum", "version",
                                  "missing_member", "unlisted_member", "unknown_name"])
def test_a_bad_model_file_is_one_line_and_nothing_is_written(run, tmp_path, kind):
  workdir, model, _, _ = run
  spec, expected = _damaged(kind, model, tmp_path)
  proc = run_main("--mode=predict", f"--model={spec}", f"--models_dir={tmp_path}",
                  f"--input={workdir}/data/imagesTs", f"--output={tmp_path}/out")
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1 and last.startswith(f"error: {expected}"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "out")


def test_an_input_with_other_modalities_is_refused_before_anything_is_written(run, tmp_path):
  workdir, model, _, _ = run
  good = f"{workdir}/data/imagesTs/phantom_006.nii.gz"
  image = nib.load(good)
  two = tmp_path / "inputs" / "two_modalities.nii.gz"
  os.makedirs(two.parent)
  nib.save(nib.Nifti1Image(np.stack([image.get_fdata()] * 2, -1), image.affine), two)
  shutil.copy(good, tmp_path / "inputs" / "a_good_one.nii.gz")
  proc = run_main("--mode=predict", f"--model={model}", f"--input={tmp_path}/inputs",
                  f"--output={tmp_path}/out")
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
      f"error: {two}: shape (32, 32, 8, 2) does not have the 1 modalities the model was "
      "trained on"), proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "out")


def test_onnx_runtime_on_a_file_without_a_graph_is_one_line(run, tmp_path):
  workdir, model, _, _ = run
  path = _without_onnx(model, tmp_path / "no_graph.zip")
  proc = run_main("--mode=predict", f"--model={path}", "--engine=onnxruntime",
                  f"--input={workdir}/data/imagesTs", f"--output={tmp_path}/out")
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
      f"error: {path}: no ONNX graph (model.onnx) in the model file"), proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "out")


def test_export_takes_the_train_command_line_and_names_what_differs_once(run, tmp_path):
  """With the run's own command line: no warning. With another optim.lr (and a setting of
  the exporting process itself): one warning naming optim.lr alone. The model file holds
  the checkpoint's config either way."""
  workdir, model, _, _ = run
  mark = "The model file uses the checkpoint's config"
  same = _ok(run_main(*TINY, "--mode=export", f"--workdir={workdir}", "--checkpoint=best",
                      f"--output={tmp_path}/same.zip"))
  assert mark not in same.stderr
  other = _ok(run_main(*TINY, "--config.optim.lr=0.5", "--config.parallel.gpu_memory_fraction=0.5",
                       "--mode=export", f"--workdir={workdir}", "--checkpoint=best",
                       f"--output={tmp_path}/other.zip"))
  warnings = [line for line in other.stderr.splitlines() if mark in line]
  assert len(warnings) == 1, other.stderr[-3000:]
  assert warnings[0].endswith("differs from it in 1 key: optim.lr 0.002 -> 0.5"), warnings[0]
  expected = zipfile.ZipFile(model).read("config.json")
  for name in ("same.zip", "other.zip"):
    assert zipfile.ZipFile(tmp_path / name).read("config.json") == expected


def test_export_writes_the_inference_settings_of_its_command_line(run, tmp_path):
  """Mirroring and post-processing given to the export (as tuning.crossval decides them
  after training) go into the model file, which then predicts the bytes that the run
  predicts with the same settings; the other keys stay the checkpoint's."""
  workdir, model, _, _ = run
  chosen = ["--config.evaluation.mirror=True",
            "--config.evaluation.largest_component_foreground=True"]
  proc = _ok(run_main(*TINY, *chosen, "--mode=export", f"--workdir={workdir}",
                      "--checkpoint=best", f"--output={tmp_path}/tuned.zip"))
  assert "The model file uses the checkpoint's config" not in proc.stderr
  assert "predicts with --config's evaluation.largest_component_foreground True" in proc.stderr
  saved = json.loads(zipfile.ZipFile(tmp_path / "tuned.zip").read("config.json"))
  trained = json.loads(zipfile.ZipFile(model).read("config.json"))
  assert saved["evaluation"]["mirror"] and saved["evaluation"]["largest_component_foreground"]
  assert {k: v for k, v in saved.items() if k != "evaluation"} == {
      k: v for k, v in trained.items() if k != "evaluation"}
  inputs = f"{workdir}/data/imagesTs"
  _ok(run_main(*TINY, *chosen, f"--workdir={workdir}", "--mode=predict", "--checkpoint=best",
               f"--input={inputs}", f"--output={tmp_path}/run"))
  _ok(run_main("--mode=predict", f"--model={tmp_path}/tuned.zip", "--engine=jax",
               f"--input={inputs}", f"--output={tmp_path}/file"))
  assert _files(tmp_path / "file") == _files(tmp_path / "run")


@pytest.mark.parametrize("args,line", [
    (["--mode=export", "--output=m.zip"], "--mode=export needs --workdir and --output"),
    (["--mode=predict", "--model=m.zip", "--input=i", "--output=o",
      "--config=configs/quickstart.py"],
     "--config: --mode=predict uses the model file's own config; drop --config"),
    (["--mode=predict", "--model=m.zip", "--input=i"], "--mode=predict needs --input and --output"),
    (["--mode=predict", "--input=i", "--output=o"], "--config is required"),
    (["--mode=predict", "--model=m.zip", "--workdir=w", "--input=i", "--output=o"],
     "--model: only with --mode=predict, and without --workdir"),
    (["--mode=predict", "--engine=onnxruntime", "--config=configs/quickstart.py",
      "--input=i", "--output=o"], "--engine=onnxruntime: only with --model"),
])
def test_export_and_predict_from_a_file_need_no_config_and_say_what_is_missing(args, line):
  proc = run_main(*args)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {line}"


def test_a_saved_config_loads_on_top_of_todays_defaults(caplog):
  """A key base.py no longer has is dropped with a warning, a key it added since keeps its
  default, and lists become tuples again."""
  saved = json.loads(json.dumps(helpers.config(*TINY[1:]).to_dict()))
  saved["model"]["retired_key"] = 1
  del saved["train"]["divergence_patience"]
  cfg = config_schema.config_from_saved(saved, "old.zip: config.json")
  assert "old.zip: config.json" in caplog.text and "model.retired_key" in caplog.text
  reference = helpers.config()  # configs/quickstart.py as it is
  assert cfg.train.divergence_patience == reference.train.divergence_patience
  assert cfg.data.synthetic_shape == (32, 32, 8) and cfg.data.label_map == (0, 1, 1)
  assert "retired_key" not in cfg.model and cfg.data.image_size == 32


def test_a_model_file_of_an_older_medseg_jax_still_predicts(run, tmp_path):
  """Its config.json has a key this version no longer has and lacks one added since."""
  workdir, model, from_run, _ = run
  config = json.loads(zipfile.ZipFile(model).read("config.json"))
  config["model"]["retired_key"] = 1
  del config["train"]["divergence_patience"]
  data = json.dumps(config).encode()
  def rehash(index):
    index["members"]["config.json"] = hashlib.sha256(data).hexdigest()
  old = _rewrite(model, tmp_path / "old.zip", change={"config.json": data},
                 index_change=rehash)
  proc = _ok(run_main("--mode=predict", f"--model={old}", f"--input={workdir}/data/imagesTs",
                      f"--output={tmp_path}/out", "--probabilities", "--engine=jax"))
  assert "model.retired_key" in proc.stderr
  assert _files(tmp_path / "out") == _files(from_run)


def test_a_users_network_travels_in_the_model_file(tmp_path):
  """The Attention U-Net example, trained from a copy that is deleted before predicting:
  the file's own copy of the source builds the network, in another directory, and writes
  the bytes that predicting from the run wrote."""
  net = tmp_path / "nets" / "attention_unet.py"
  os.makedirs(net.parent)
  shutil.copy(os.path.join(REPO, "examples", "attention_unet.py"), net)
  cfg = helpers.config(*TINY[1:], f"--config.model.name={net}:AttentionUNet")
  cfg.unlock()
  cfg.model.kwargs = {"base_features": 4, "depth": 1}
  cfg.lock()
  workdir = tmp_path / "run"
  helpers.train(cfg, workdir)
  helpers.predict(cfg, workdir, f"{workdir}/data/imagesTs", str(tmp_path / "from_run"), "best")
  model = tmp_path / "attention.zip"
  _ok(run_main("--mode=export", f"--workdir={workdir}", "--checkpoint=best",
               f"--output={model}"))
  _, members = _read_independently(model)
  source = members["network/attention_unet.py"]
  assert source == net.read_bytes()
  os.remove(net)
  other, cache = tmp_path / "other", tmp_path / "cache"
  os.makedirs(other)
  _ok(run_main("--mode=predict", f"--model={model}", f"--input={workdir}/data/imagesTs",
               "--output=out", "--engine=jax", cwd=other,
               env=dict(os.environ, XDG_CACHE_HOME=str(cache))))
  assert _files(other / "out") == _files(tmp_path / "from_run")
  cached = cache / "medseg_jax" / "networks" / hashlib.sha256(source).hexdigest()
  assert (cached / "attention_unet.py").read_bytes() == source


# A user's network with a step ONNX has no form for: a call back into Python.
HOST_CALLBACK_NET = """
import flax.linen as nn
import jax
import numpy as np


class HostTanh(nn.Module):
  num_classes: int
  dtype: object = None
  axis_name: object = None

  @nn.compact
  def __call__(self, x, train=False):
    x = jax.pure_callback(np.tanh, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)
"""


def test_a_network_without_an_onnx_form_records_why_and_onnx_runtime_says_it(tmp_path):
  from medseg_jax.errors import MedsegError  # pylint: disable=import-outside-toplevel
  from medseg_jax.export import from_file, write  # pylint: disable=import-outside-toplevel
  net = tmp_path / "host_tanh.py"
  net.write_text(HOST_CALLBACK_NET)
  cfg = helpers.config(*TINY[1:], f"--config.model.name={net}:HostTanh",
                       "--config.train.num_steps=1", "--config.train.eval_every_steps=0",
                       "--config.checkpoint.every_steps=1")
  workdir = tmp_path / "run"
  helpers.train(cfg, workdir)
  model = str(tmp_path / "host_tanh.zip")
  write.export_run(str(workdir), "latest", model)
  _, members = _read_independently(model)
  assert "model.onnx" not in members
  why = json.loads(members["model.json"])["no_onnx_graph"]
  assert why.startswith("the network did not convert to ONNX: ONNX export of the network")
  assert f"carries no ONNX graph ({why})" in members["MODEL.md"].decode()
  with pytest.raises(MedsegError) as error:
    from_file.load(model, engine="onnxruntime")
  assert str(error.value) == (f"{model}: no ONNX graph (model.onnx) in the model file: {why}; "
                              "use --engine=jax")


def test_two_processes_export_and_predict_from_the_file_what_the_checkpoint_predicts(run,
                                                                                   tmp_path):
  """Exported and predicted from the file by two processes of two devices each: the bytes
  of the one-process export, and the predictions of the run's checkpoint: the label maps'
  bytes, the probabilities within a float32 rounding (4 devices compute each slice in a
  batch of another size, which XLA:CPU may vectorise otherwise: on an AMD EPYC one voxel
  of 16,384 differed by 6e-8)."""
  workdir, model, from_run, _ = run
  two = tmp_path / "two.zip"
  env = dict(helpers.env_with_devices(), CPU_DEVICES_PER_PROCESS="2")
  def two_processes(*args):
    return _ok(subprocess.run(["bash", "launch/local.sh", "2", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300))
  two_processes("--mode=export", f"--workdir={workdir}", "--checkpoint=best",
                f"--output={two}", "--name=tiny")
  ours, theirs = _read_independently(two)[1], _read_independently(model)[1]
  for name in ("params.msgpack", "config.json", "metrics.json"):
    assert ours[name] == theirs[name], name
  two_processes("--mode=predict", f"--model={two}", f"--input={workdir}/data/imagesTs",
                f"--output={tmp_path}/from_file", "--probabilities")
  expected, got = _files(from_run), _files(tmp_path / "from_file")
  assert len(expected) == 4 and sorted(got) == sorted(expected)
  for name in expected:
    if "_probs" not in name:
      assert got[name] == expected[name], name
      continue
    ours, reference = (nib.load(os.path.join(d, name)) for d in (tmp_path / "from_file",
                                                                  from_run))
    assert ours.header == reference.header
    np.testing.assert_allclose(np.asarray(ours.dataobj), np.asarray(reference.dataobj),
                               rtol=0, atol=1e-6, err_msg=name)


def test_an_ensemble_of_one_model_twice_writes_the_bytes_of_the_model(run, tmp_path):
  workdir, model, from_run, _ = run
  _ok(run_main("--mode=predict", f"--model={model},{model}", "--engine=jax",
               f"--input={workdir}/data/imagesTs", f"--output={tmp_path}", "--probabilities"))
  assert _files(tmp_path) == _files(from_run)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
  """A second tiny run (seed 1), trained in this process, and its best checkpoint's model
  file."""
  base = tmp_path_factory.mktemp("other")
  helpers.train(helpers.config(*TINY[1:], "--config.seed=1"), base / "run")
  _ok(run_main("--mode=export", f"--workdir={base / 'run'}", "--checkpoint=best",
               f"--output={base / 'other.zip'}"))
  return base / "run", base / "other.zip"


def test_an_ensemble_averages_the_probabilities_of_its_models(run, other, tmp_path):
  """A second model (another seed) and the module's: the ensemble's probabilities are the
  mean of the two models' own, read back from their NIfTI files; its labels their argmax."""
  workdir, model, from_run, _ = run
  other = other[1]
  inputs = f"{workdir}/data/imagesTs"
  from_file.predict_files(from_file.load(str(other)), inputs, str(tmp_path / "alone"),
                          probabilities=True)
  models = [from_file.load(str(model)), from_file.load(str(other))]
  from_file.predict_files(models, inputs, str(tmp_path / "ensemble"), probabilities=True)
  for name in ("phantom_006", "phantom_007"):
    mean = (nib.load(from_run / f"{name}_probs.nii.gz").get_fdata()
            + nib.load(tmp_path / "alone" / f"{name}_probs.nii.gz").get_fdata()) / 2
    ensemble = nib.load(tmp_path / "ensemble" / f"{name}_probs.nii.gz").get_fdata()
    np.testing.assert_allclose(ensemble, mean, rtol=0, atol=1e-6)
    assert not np.allclose(ensemble, nib.load(from_run / f"{name}_probs.nii.gz").get_fdata(),
                           atol=1e-3)  # the second model changes them
    labels = np.asarray(nib.load(tmp_path / "ensemble" / f"{name}.nii.gz").dataobj)
    top2 = np.sort(mean, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-5
    np.testing.assert_array_equal(labels[clear], np.argmax(mean, -1)[clear])


def test_an_ensemble_of_models_of_other_classes_is_one_line(run, tmp_path):
  workdir, model, _, _ = run
  config = json.loads(zipfile.ZipFile(model).read("model.json"))
  config["classes"] = ["background", "something else"]
  data = json.dumps(config).encode()
  def rehash(index):
    index["members"]["model.json"] = hashlib.sha256(data).hexdigest()
  changed = _rewrite(model, tmp_path / "changed.zip", change={"model.json": data},
                     index_change=rehash)
  proc = run_main("--mode=predict", f"--model={model},{changed}", "--engine=jax",
                  f"--input={workdir}/data/imagesTs", f"--output={tmp_path}/out")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: {changed}: classes ['background', 'something else'] differ from {model}'s")
  assert not os.path.exists(tmp_path / "out")


def test_an_ensemble_file_predicts_what_its_runs_averaged_predict(run, other, tmp_path):
  """Two runs exported as one ensemble file (format version 2, each member a whole model
  file with its own checksums); it predicts the bytes of the two model files named
  together, and the zoo lists it as one model."""
  workdir, model, _, _ = run
  ensemble = tmp_path / "pair.zip"
  _ok(run_main("--mode=export", f"--workdir={workdir},{other[0]}", "--checkpoint=best",
               f"--output={ensemble}"))
  index, members = _read_independently(ensemble)
  assert index["version"] == 2 and index["kind"] == "ensemble"
  assert index["summary"]["members"] == 2 and index["summary"]["name"] == "pair"
  for k in (0, 1):
    inner = zipfile.ZipFile(io.BytesIO(members[f"members/{k}.zip"]))
    inner_index = json.loads(inner.read("medseg_model.json"))
    assert inner_index["version"] == 1
    for name, digest in inner_index["members"].items():
      assert hashlib.sha256(inner.read(name)).hexdigest() == digest
  assert "An ensemble of 2 models" in members["MODEL.md"].decode()
  inputs = f"{workdir}/data/imagesTs"
  _ok(run_main("--mode=predict", f"--model={ensemble}", "--engine=jax", f"--input={inputs}",
               f"--output={tmp_path}/from_file", "--probabilities"))
  _ok(run_main("--mode=predict", f"--model={model},{other[1]}", "--engine=jax",
               f"--input={inputs}", f"--output={tmp_path}/named", "--probabilities"))
  assert _files(tmp_path / "from_file") == _files(tmp_path / "named")
  if _onnx_extra():  # ONNX Runtime runs every member's graph
    _ok(run_main("--mode=predict", f"--model={ensemble}", "--engine=onnxruntime",
                 f"--input={inputs}", f"--output={tmp_path}/onnx", "--probabilities"))
    for name in ("phantom_006", "phantom_007"):
      np.testing.assert_allclose(
          nib.load(tmp_path / "onnx" / f"{name}_probs.nii.gz").get_fdata(),
          nib.load(tmp_path / "from_file" / f"{name}_probs.nii.gz").get_fdata(),
          rtol=0, atol=ENGINE_TOLERANCE)
  zoo_dir = tmp_path / "zoo"
  proc = subprocess.run([sys.executable, "-m", "medseg_jax.zoo", "install", str(ensemble),
                         f"--models_dir={zoo_dir}"], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  listed = subprocess.run([sys.executable, "-m", "medseg_jax.zoo", "list",
                           f"--models_dir={zoo_dir}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120).stdout
  assert len([line for line in listed.splitlines() if line.startswith("pair")]) == 1
