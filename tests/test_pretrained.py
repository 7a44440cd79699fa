"""model.init_from: small VGG-16 files fabricated in both layouts (MatConvNet .mat, Keras
.h5) land in the FCN in the right place and orientation, checked against the files read
back with scipy/h5py; fine-tuning from a real run's orbax checkpoint; the errors."""

import os
import subprocess
import sys

import flax.linen as nn
import h5py
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import scipy.io

import helpers
from helpers import REPO, TINY
from medseg_jax import config, config_schema
from medseg_jax.errors import ConfigError
from medseg_jax.models.fcn import FCN
from medseg_jax.models import pretrained
from medseg_jax.training import checkpoint, loop, warm_start
from medseg_jax.training.state import init_state

BASE, FC = 4, 8
WIDTHS = (1, 2, 4, 8, 8)
CONVS = [f"conv{b + 1}_{i + 1}" for b, n in enumerate((2, 2, 3, 3, 3)) for i in range(n)]
KERAS = dict(zip(CONVS, [f"block{b + 1}_conv{i + 1}" for b, n in enumerate((2, 2, 3, 3, 3))
                         for i in range(n)]))
# ImageNet pixel mean and std, RGB order (0-255).
MEAN_RGB = np.array([123.68, 116.78, 103.94])
STD_RGB = np.array([58.395, 57.12, 57.375])


def vgg_arrays(base=BASE, fc=FC, seed=0):
  """A VGG-16 of widths base x (1, 2, 4, 8, 8): name -> (W [H, W, in, out], b), random."""
  rng = np.random.default_rng(seed)
  layers, cin = {}, 3
  for name in CONVS:
    cout = base * WIDTHS[int(name[4]) - 1]
    layers[name] = (rng.normal(size=(3, 3, cin, cout)), rng.normal(size=cout))
    cin = cout
  layers["fc6"] = (rng.normal(size=(7, 7, cin, fc)), rng.normal(size=fc))
  layers["fc7"] = (rng.normal(size=(1, 1, fc, fc)), rng.normal(size=fc))
  layers["fc8"] = (rng.normal(size=(1, 1, fc, 5)), rng.normal(size=5))
  return {k: (w.astype(np.float32), b.astype(np.float32)) for k, (w, b) in layers.items()}


def write_mat(path, layers):
  """MatConvNet simplenn: net.layers{i} = struct(name, type, weights={W, b}), with relu
  layers between, and net.meta.normalization.averageImage."""
  cells = []
  for name, (w, b) in layers.items():
    weights = np.empty((1, 2), dtype=object)
    weights[0, 0], weights[0, 1] = w, b.reshape(-1, 1)
    cells.append({"name": name, "type": "conv", "weights": weights, "stride": [1, 1]})
    cells.append({"name": "relu" + name[4:], "type": "relu", "weights": np.empty((0, 0), object)})
  cell_array = np.empty((1, len(cells)), dtype=object)
  for i, cell in enumerate(cells):
    cell_array[0, i] = cell
  scipy.io.savemat(path, {"layers": cell_array, "meta": {"normalization": {
      "averageImage": MEAN_RGB.reshape(1, 1, 3)}}})


def write_h5(path, layers, style="old", top=True):
  """Keras VGG16 weights: a group per layer; fc1 a Dense over the flattened 7x7xC map."""
  with h5py.File(path, "w") as f:
    names = [KERAS[n] for n in CONVS] + (["fc1", "fc2", "predictions"] if top else [])
    f.attrs["layer_names"] = [n.encode() for n in names]
    for ours, theirs in zip(CONVS + ["fc6", "fc7", "fc8"], names):
      w, b = layers[ours]
      if theirs.startswith("fc") or theirs == "predictions":
        w = w.reshape(-1, w.shape[-1])
      group = f.create_group(theirs)
      if style == "old":
        group[f"{theirs}_W_1:0"], group[f"{theirs}_b_1:0"] = w, b
      else:
        group[f"{theirs}/kernel:0"], group[f"{theirs}/bias:0"] = w, b


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("vgg")
  layers = vgg_arrays()
  paths = {"mat": str(root / "vgg.mat"), "h5_old": str(root / "vgg.h5"),
           "h5_new": str(root / "vgg_new.h5"), "h5_notop": str(root / "vgg_notop.h5")}
  write_mat(paths["mat"], layers)
  write_h5(paths["h5_old"], layers, "old")
  write_h5(paths["h5_new"], layers, "new")
  write_h5(paths["h5_notop"], layers, "new", top=False)
  return paths


def file_layer(path, name):
  """(W, b) of one layer read straight from the file, in the file's own layout."""
  if path.endswith(".mat"):
    mat = scipy.io.loadmat(path)
    for cell in mat["layers"][0]:
      if cell["name"][0, 0][0] == name:
        return cell["weights"][0, 0][0, 0], cell["weights"][0, 0][0, 1].ravel()
  with h5py.File(path, "r") as f:
    group = f[KERAS.get(name, {"fc6": "fc1", "fc7": "fc2"}.get(name))]
    arrays = {}
    group.visititems(lambda n, o: arrays.update({n: o[()]}) if hasattr(o, "shape") else None)
    kernel = next(v for k, v in arrays.items() if "_W" in k or "kernel" in k)
    return kernel, next(v for k, v in arrays.items() if "_b" in k or "bias" in k)


def fcn_params(channels=1, base=BASE, fc=FC, classes=3):
  model = FCN(num_classes=classes, base_features=base, fc_features=fc, dropout=0.0)
  x = np.zeros((1, 32, 32, channels), np.float32)
  return jax.device_get(helpers.init_variables(model, x)["params"])


@pytest.mark.parametrize("kind", ["mat", "h5_old", "h5_new"])
@pytest.mark.parametrize("channels", [1, 4])
def test_first_conv_sees_the_zscored_image_as_imagenet_pixels(files, kind, channels):
  path = files[kind]
  params, _, _ = pretrained.into_fcn(pretrained.read_vgg(path), fcn_params(channels), FC)
  x = np.random.default_rng(1).normal(size=(2, 12, 12, 1)).astype(np.float32)
  ours = nn.Conv(BASE, (3, 3), padding="SAME").apply({"params": params["Conv_0"]},
                                                      np.repeat(x, channels, axis=-1))
  # Reference: the file's own kernel on the colour image mean + std * x, in the file's
  # channel order (BGR for Keras), after the file's mean subtraction.
  mean, std = (MEAN_RGB, STD_RGB) if kind == "mat" else (MEAN_RGB[::-1], STD_RGB[::-1])
  image = (mean + std * x) - mean
  kernel, bias = file_layer(path, "conv1_1")
  reference = jax.lax.conv_general_dilated(image, kernel, (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["mat", "h5_old", "h5_new"])
def test_every_layer_lands_in_its_fcn_parameter(files, kind):
  path, fresh = files[kind], fcn_params()
  params, loaded, new = pretrained.into_fcn(pretrained.read_vgg(path), fresh, FC)
  for i, name in enumerate(CONVS[1:], start=1):
    kernel, bias = file_layer(path, name)
    np.testing.assert_array_equal(params[f"Conv_{i}"]["kernel"], kernel)
    np.testing.assert_array_equal(params[f"Conv_{i}"]["bias"], bias)
  # fc6 as a 7x7 convolution of a 7x7 map equals the file's fc6 (the Keras Dense fc1 on
  # the channels_last flattened map).
  x = np.random.default_rng(2).normal(size=(1, 7, 7, 8 * BASE)).astype(np.float32)
  ours = jax.lax.conv_general_dilated(x, params["fc6"]["kernel"], (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))[0, 0, 0]
  kernel, bias = file_layer(path, "fc6")
  reference = x.reshape(-1) @ kernel.reshape(-1, FC)
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(params["fc6"]["bias"], bias)
  np.testing.assert_array_equal(params["fc7"]["kernel"].reshape(FC, FC),
                                file_layer(path, "fc7")[0].reshape(FC, FC))
  assert loaded == [f"Conv_{i}" for i in range(13)] + ["fc6", "fc7"]
  assert sorted(new) == ["score_fr", "score_pool3", "score_pool4", "upscore2", "upscore8",
                         "upscore_pool4"]
  for name in new:
    np.testing.assert_array_equal(params[name]["kernel"], fresh[name]["kernel"])


def test_fc_layers_stay_new_without_them_or_at_another_width(files, caplog):
  caplog.set_level("INFO")
  fresh = fcn_params()
  params, loaded, _ = pretrained.into_fcn(pretrained.read_vgg(files["h5_notop"]), fresh, FC)
  assert "no fc layers" in caplog.text and loaded[-1] == "Conv_12"
  np.testing.assert_array_equal(params["Conv_12"]["kernel"],
                                file_layer(files["h5_notop"], "conv5_3")[0])
  wide = fcn_params(fc=16)
  params, loaded, _ = pretrained.into_fcn(pretrained.read_vgg(files["mat"]), wide, 16)
  assert "fc width 8, model.fc_features=16: fc6 and fc7 are new" in caplog.text
  assert "fc6" not in loaded
  np.testing.assert_array_equal(params["fc6"]["kernel"], wide["fc6"]["kernel"])


def test_a_layer_of_another_width_is_an_error_naming_it(files):
  with pytest.raises(ConfigError, match=r"layer conv1_1 has kernel \[3, 3, 3, 4\] in the "
                                        r"file but \[3, 3, 1, 8\] in the model"):
    pretrained.into_fcn(pretrained.read_vgg(files["mat"]), fcn_params(base=8), FC)
  # The config check, before any data work, maps the file onto the model's shapes.
  fcn = ["--config.model.name=fcn", "--config.data.image_size=32",
         f"--config.model.fc_features={FC}"]
  for kind in ("mat", "h5_new"):
    cfg = helpers.config(*TINY[1:], *fcn, "--config.model.base_features=8",
                         f"--config.model.init_from={files[kind]}")
    with pytest.raises(ConfigError, match=r"^model\.init_from=.*: layer conv1_1 has kernel"):
      config.check(cfg)
    config.check(cfg, starts_fresh=False)  # a resume does not read the file
    config.check(helpers.config(*TINY[1:], *fcn, f"--config.model.base_features={BASE}",
                                f"--config.model.init_from={files[kind]}"))


def test_files_of_neither_format_are_config_errors(tmp_path):
  fcn = ["--config.model.name=fcn", "--config.data.image_size=32"]
  cases = {"garbage.mat": (b"not a mat file", "not a MATLAB 5 MAT-file"),
           "garbage.h5": (b"MATLAB 5.0 MAT-file", "not an HDF5 file"),
           "weights.txt": (b"", "not a VGG-16 file")}
  for name, (content, message) in cases.items():
    (tmp_path / name).write_bytes(content)
    cfg = helpers.config(*TINY[1:], *fcn, f"--config.model.init_from={tmp_path / name}")
    with pytest.raises(ConfigError, match=f"^model.init_from={tmp_path / name}: {message}"):
      config.check(cfg)
  scipy.io.savemat(tmp_path / "other.mat", {"x": np.ones(3)})
  with pytest.raises(ConfigError, match="other.mat: no 'layers' variable"):
    pretrained.read_vgg(str(tmp_path / "other.mat"))
  unet = helpers.config(*TINY[1:], f"--config.model.init_from={tmp_path / 'other.mat'}")
  with pytest.raises(ConfigError, match="VGG-16 weights fit model.name=fcn, not 'unet'"):
    config.check(unet)
  bad = helpers.config(*TINY[1:], "--config.model.init_checkpoint=newest")
  with pytest.raises(ConfigError, match="^model.init_checkpoint='newest'"):
    config.check(bad)


def test_a_missing_file_is_one_error_line_with_exit_2(tmp_path):
  missing = tmp_path / "imagenet-vgg-verydeep-16.mat"
  proc = subprocess.run(
      [sys.executable, "-m", "medseg_jax.main", *TINY, "--config.model.name=fcn",
       f"--config.model.init_from={missing}", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr
  assert f"model.init_from={missing}: no such file" in errors[0]
  assert "imagenet-vgg-verydeep-16.mat" in errors[0] and 'model.init_from=""' in errors[0]
  assert not os.path.exists(tmp_path / "run")


# Fine-tuning one run from another: a tiny U-Net of 2 classes, then one of 3 classes.
RUN = TINY[1:] + ["--config.train.num_steps=2", "--config.train.eval_every_steps=2",
                  "--config.checkpoint.every_steps=2", "--config.parallel.num_devices=2"]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("source"))
  helpers.train(helpers.config(*RUN), workdir)
  return workdir


def saved_tree(workdir, step):
  """The params of a checkpoint, read with orbax alone, as {path: array}."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata)
  return flat(checkpointer.restore(path, abstract)["params"])


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def start(cfg, workdir):
  setup = loop.build(helpers.run_settings(cfg), workdir, helpers.parallel(cfg))
  ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint.max_to_keep)
  try:
    return setup, loop.resume(setup, ckpt)
  finally:
    ckpt.close()


def test_fine_tuning_loads_the_run_and_a_new_head_then_resumes_its_own(source_run, tmp_path,
                                                                       caplog):
  caplog.set_level("INFO")
  cfg = helpers.config(*RUN, "--config.data.label_map=(0, 1, 2)",
                       f"--config.model.init_from={source_run}")
  config.check(cfg)
  setup, first = start(cfg, str(tmp_path))
  assert int(first.step) == 0 and first.position.epoch == 0 and first.position.offset == 0
  saved, ours, fresh = (saved_tree(source_run, 2), flat(first.state.params),
                        flat(setup.init_state.params))
  head = sorted(k for k in ours if ours[k].shape != saved[k].shape)
  assert head == ["['Conv_0']['bias']", "['Conv_0']['kernel']"]  # the 1x1 class conv
  for key, value in ours.items():
    np.testing.assert_array_equal(value, fresh[key] if key in head else saved[key])
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(first.state.opt_state))
  assert "layers loaded" in caplog.text and "1 new (Conv_0)" in caplog.text
  # The fine-tuned run trains, then resumes from its own checkpoint, bit for bit.
  helpers.train(cfg, str(tmp_path))
  _, resumed = start(cfg, str(tmp_path))
  assert resumed.step == 2
  own = helpers.checkpoint_arrays(str(tmp_path), 2, "params")
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state.params)), own):
    np.testing.assert_array_equal(a, b)


def test_another_model_or_a_missing_step_is_refused(source_run):
  model = FCN(num_classes=2, base_features=4, fc_features=8)
  state = init_state(model, optax.sgd(0.1), jax.random.key(0), (32, 32, 1))
  cfg = helpers.config(*RUN, "--config.model.name=fcn", f"--config.model.init_from={source_run}")
  another = r"checkpoints/2: a checkpoint of another model: it has no params/Conv_1/bias$"
  with pytest.raises(ConfigError, match=another):
    warm_start.apply(cfg, state, 2)
  with pytest.raises(ConfigError, match=another):  # seen by the check, before any data work
    config.check(cfg)
  for which, message in (("'7'", r"model.init_checkpoint=7\): \S*/checkpoints: no checkpoint "
                                 r"at step 7 \(have \[2\]\)"),
                         ("latest", None), ("best", None)):
    cfg = helpers.config(*RUN, f"--config.model.init_from={source_run}/checkpoints",
                         f"--config.model.init_checkpoint={which}")
    if message:
      with pytest.raises(ConfigError, match=message):
        config.check(cfg)
    else:
      config.check(cfg)


def test_a_checkpoint_saved_before_or_with_another_init_from_still_resumes(caplog):
  cfg = helpers.config(*RUN)
  saved = cfg.to_dict()
  del saved["model"]["init_from"], saved["model"]["init_checkpoint"]  # an older checkpoint
  changed = helpers.config(*RUN, "--config.model.init_from=runs/elsewhere")
  config_schema.check_checkpoint({"config": saved}, changed, "DIR")
  assert "model.init_from None -> 'runs/elsewhere'" in caplog.text
