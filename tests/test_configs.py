"""Every config file resolves: required keys, a registered model, optimizer, loss, strategy."""

import glob
import importlib.util
import os

import pytest

from medseg_jax import config, optim
from medseg_jax.training import losses
from medseg_jax.data import augment, preprocess
from medseg_jax.models import MODELS, build_model
from medseg_jax.parallel import strategies

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("__init__.py"))
REQUIRED = ["seed", "model.name", "data.root", "data.image_size", "train.per_device_batch_size",
            "train.num_epochs", "train.num_steps", "parallel.strategy", "parallel.num_devices",
            "checkpoint.every_steps"]
SECTIONS = ["model", "data", "optim", "lr", "train", "parallel", "checkpoint", "monitor"]


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_expected_configs_exist():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {"base.py", "unet_brats.py", "fcn_brats.py", "unet_heart.py", "fcn_heart.py",
          "quickstart.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_resolves(path, devices8):
  cfg = load(path)
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
  augment.from_config(cfg.data.augment)


@pytest.mark.parametrize("name,batch,epochs,lr,model", [
    ("unet_brats", 7, 100, 1e-5, "unet"), ("fcn_brats", 10, 120, 1e-5, "fcn"),
    ("unet_heart", 7, 100, 2e-5, "unet"), ("fcn_heart", 10, 120, 3e-5, "fcn")])
def test_thesis_settings(name, batch, epochs, lr, model):
  cfg = load(os.path.join(REPO, "configs", f"{name}.py"))
  assert (cfg.train.per_device_batch_size, cfg.train.num_epochs) == (batch, epochs)
  assert cfg.optim.lr == lr and cfg.optim.name == "sgd" and cfg.model.name == model
  assert cfg.data.slices_per_volume == 70
  assert cfg.data.augment.enabled == ("heart" in name)  # the thesis augmented the left atrium


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_configs_hold_training_sections_only(path):
  # The tools' settings (the guideline tuner's) are their own flags, not config sections.
  assert set(load(path)) == set(SECTIONS) | {"seed"}
