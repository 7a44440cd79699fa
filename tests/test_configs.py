"""Every config file resolves: required keys, a registered model, optimizer, loss, strategy."""

import glob
import importlib.util
import os

import pytest

from medseg_jax import config, defaults, optim
from medseg_jax.errors import ConfigError
from medseg_jax.training import losses
from medseg_jax.data import augment, preprocess
from medseg_jax.models import MODELS, build_model
from medseg_jax.parallel import strategies

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Config files define get_config; configs/thesis.py holds settings several of them share.
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if "def get_config" in open(p).read())
REQUIRED = ["seed", "model.name", "data.root", "data.image_size", "train.per_device_batch_size",
            "train.num_epochs", "train.num_steps", "parallel.strategy", "parallel.num_devices",
            "checkpoint.every_steps"]
SECTIONS = ["model", "data", "optim", "lr", "train", "evaluation", "parallel", "checkpoint",
            "monitor"]


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_expected_configs_exist():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {"unet_brats.py", "fcn_brats.py", "unet_heart.py", "fcn_heart.py",
          "quickstart.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_resolves(path, devices8):
  cfg = load(path)
  if cfg.model.init_from and not os.path.exists(cfg.model.init_from):
    # The FCN configs start from a VGG-16 file the user downloads: without it the check
    # says which file and how to train from scratch instead.
    with pytest.raises(ConfigError, match=r"^model\.init_from=.*imagenet-vgg-verydeep-16"
                       r"\.mat.*model\.init_from=\"\""):
      config.check(cfg)
    cfg.unlock()
    cfg.model.init_from = ""
  config.check(cfg)  # the check main runs before any data work accepts every shipped config
  for section in SECTIONS:
    assert section in cfg
  for key in REQUIRED:
    node = cfg
    for part in key.split("."):
      node = node[part]
  assert cfg.model.name in MODELS
  build_model(cfg.model, num_classes=2, image_size=cfg.data.image_size)
  lr = optim.resolve_schedule(cfg, 8 * cfg.train.per_device_batch_size, steps_per_epoch=50,
                              num_steps=50 * cfg.train.num_epochs)
  optim.make_optimizer(cfg, lr.schedule)
  assert lr.phases[-1].end == 50 * cfg.train.num_epochs
  losses.get_loss(cfg.train.loss)
  assert cfg.parallel.strategy in strategies.STRATEGIES
  preprocess.settings_from_config(cfg.data)
  augment.ranges_from_config(cfg.data.augment)


@pytest.mark.parametrize("name,batch,epochs,lr,model", [
    ("unet_brats", 7, 100, 1e-5, "unet"), ("fcn_brats", 10, 120, 1e-5, "fcn"),
    ("unet_heart", 7, 100, 2e-5, "unet"), ("fcn_heart", 10, 120, 3e-5, "fcn")])
def test_thesis_settings(name, batch, epochs, lr, model):
  cfg = load(os.path.join(REPO, "configs", f"{name}.py"))
  assert (cfg.train.per_device_batch_size, cfg.train.num_epochs) == (batch, epochs)
  assert cfg.optim.lr == lr and cfg.optim.name == "sgd" and cfg.model.name == model
  assert cfg.data.slices_per_volume == 70
  assert cfg.data.augment.enabled == ("heart" in name)  # the thesis augmented the left atrium
  # ... offline to 35,000 slices: its epochs are that long
  assert cfg.data.augment.samples_per_epoch == (35000 if "heart" in name else 0)
  # The FCN started from ImageNet VGG-16 (MatConvNet's file)
  assert cfg.model.init_from.endswith("imagenet-vgg-verydeep-16.mat") == (model == "fcn")


THESIS_CONFIGS = ["unet_brats", "fcn_brats", "unet_heart", "fcn_heart", "unet3d_brats",
                  "unet3d_heart"]


@pytest.mark.parametrize("name", THESIS_CONFIGS)
def test_thesis_config_says_where_each_value_comes_from(name):
  """Every value a thesis config sets, in its file or in the configs/thesis.py functions
  it calls, carries a comment, on its line or in the comment lines just above or below
  it, saying "thesis" (from the thesis) or "ours" (our choice); so does every call."""
  lines = _lines(f"{name}.py")
  shared = _functions(_lines("thesis.py"))
  called = [f for f in shared if any(f"thesis.{f}(c" in line for line in lines)]
  assert called, "a thesis config builds on configs/thesis.py"
  settings = [(i, lines) for i, line in enumerate(lines)
              if line.strip().startswith(("c.", "thesis.training("))]
  settings += [(i, shared[f]) for f in called for i, line in enumerate(shared[f])
               if line.strip().startswith("c.")]
  unexplained = [body[i].strip() for i, body in settings if not _explained(body, i)]
  assert not unexplained, unexplained
  base = defaults.get_config()
  cfg = load(os.path.join(REPO, "configs", f"{name}.py"))
  set_here = {body[i].strip().split(" = ")[0][2:] for i, body in settings
              if body[i].strip().startswith("c.")}
  differing = {key for key in _leaves(cfg) if _leaves(cfg)[key] != _leaves(base)[key]}
  assert differing <= set_here, differing - set_here


def _lines(filename):
  with open(os.path.join(REPO, "configs", filename)) as f:
    return f.read().splitlines()


def _functions(lines):
  """The body lines of each top-level function of a module's `lines`, by name."""
  bodies, name = {}, None
  for line in lines:
    if line.startswith("def "):
      name = line[4:line.index("(")]
      bodies[name] = []
    elif line and not line[0].isspace():
      name = None
    elif name:
      bodies[name].append(line)
  return bodies


def _explained(lines, i):
  """The comment on line i, continued below it or in a block just above, says where the
  value comes from."""
  comments = [lines[i].partition("#")[2]]
  j = i + 1
  while j < len(lines) and lines[j].strip().startswith("#") and "=" not in lines[j]:
    comments.append(lines[j]); j += 1
  j = i - 1
  while j >= 0 and lines[j].strip().startswith("#"):
    comments.append(lines[j]); j -= 1
  return any(word in " ".join(comments) for word in ("thesis", "ours"))


def _leaves(cfg, prefix=""):
  out = {}
  for key, value in cfg.items():
    if hasattr(value, "items"):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_configs_hold_training_sections_only(path):
  # The tools' settings (the guideline tuner's) are their own flags, not config sections.
  assert set(load(path)) == set(SECTIONS) | {"seed"}


def test_configs_base_names_the_packages_defaults():
  """Config files written as `from configs import base` keep loading."""
  assert load(os.path.join(REPO, "configs", "base.py")) == defaults.get_config()
