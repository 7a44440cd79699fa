"""config_schema: dotted keys of a nested config, a saved config migrated onto today's
defaults, and the check of a checkpoint's saved config against the current one."""

import json
import logging

import ml_collections
import pytest

from medseg_jax import config_schema, defaults
from medseg_jax.errors import ConfigError


def _nested() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "seed": 1, "empty": {},
      "model": {"name": "unet", "kwargs": {"width": 4, "deep": {"x": 1}}},
      "train": {"plugin_kwargs": {}, "size": (2, 3)}})


def test_flatten_gives_dotted_keys_with_free_form_sections_whole():
  assert config_schema.flatten(_nested()) == {
      "seed": 1, "model.name": "unet", "model.kwargs": {"width": 4, "deep": {"x": 1}},
      "train.plugin_kwargs": {}, "train.size": (2, 3)}


def test_flatten_with_no_whole_section_goes_to_every_leaf():
  assert config_schema.flatten(_nested().to_dict(), whole=()) == {
      "seed": 1, "model.name": "unet", "model.kwargs.width": 4, "model.kwargs.deep.x": 1,
      "train.size": (2, 3)}


def test_lookup_and_assign_walk_dotted_keys():
  cfg = _nested()
  assert config_schema.lookup(cfg, "model.kwargs.deep.x") == 1
  assert config_schema.lookup(cfg.to_dict(), "seed") == 1
  for missing in ("model.nam", "seed.x", "nothing", "model.name.upper"):
    with pytest.raises(KeyError, match=missing):
      config_schema.lookup(cfg, missing)
  config_schema.assign(cfg, "model.kwargs.width", 8)
  config_schema.assign(cfg, "seed", 5)
  assert cfg.model.kwargs.width == 8 and cfg.seed == 5


def test_base_config_keys_are_the_flattened_keys_of_base_py():
  keys = set(config_schema.flatten(config_schema.base_config()))
  assert {"seed", "model.name", "model.kwargs", "lr.grescale.decay_coefficient",
          "train.plugin_kwargs", "data.augment.zoom"} <= keys
  assert "model.kwargs.width" not in keys and "lr.grescale" not in keys


def test_check_keys_names_missing_and_unknown_keys():
  cfg = defaults.get_config()
  config_schema.check_keys(cfg, "ok.py")
  del cfg.lr["poly_power"]
  cfg.optim.lrr = 1.0
  with pytest.raises(ConfigError, match=r"^x.py: lacks config keys lr.poly_power; has unknown "
                                        r"config keys optim.lrr "):
    config_schema.check_keys(cfg, "x.py")


def test_a_saved_config_is_migrated_key_by_key(caplog):
  saved = json.loads(json.dumps(defaults.get_config().to_dict()))
  saved["optim"]["lr"] = 0.25
  saved["data"]["patch_size"] = [8, 8, 8]            # JSON's list, a tuple in base.py
  saved["model"]["kwargs"] = {"width": 3}             # the user's keys, kept whole
  saved["model"]["retired"] = 1                       # base.py no longer has it
  saved["seed"] = {"was": "a section"}                # another kind than base.py's
  saved["lr"]["grescale"] = 0.5                       # a section saved as one value
  saved["train"]["num_steps"] = "many"                # another type than base.py's
  del saved["train"]["divergence_patience"]          # base.py added it since
  with caplog.at_level(logging.WARNING):
    cfg = config_schema.config_from_saved(saved, "WHERE")
  assert cfg.optim.lr == 0.25 and cfg.data.patch_size == (8, 8, 8)
  assert cfg.model.kwargs.to_dict() == {"width": 3}
  assert cfg.seed == 0 and cfg.lr.grescale.decay_coefficient == 0.1
  assert cfg.train.num_steps == 0 and cfg.train.divergence_patience == 50
  assert "retired" not in cfg.model and cfg.is_locked
  warning = caplog.text
  assert "WHERE" in warning
  for key in ("model.retired", "seed.was", "lr.grescale", "train.num_steps"):
    assert key in warning


def test_differences_compare_as_saved_and_name_free_form_keys_one_by_one():
  saved = json.loads(json.dumps(defaults.get_config().to_dict()))
  cfg = defaults.get_config()
  assert config_schema.differences(saved, cfg) == {}  # tuples against JSON's lists
  cfg.model.kwargs = ml_collections.ConfigDict({"width": 3})
  cfg.optim.lr = 0.5
  assert config_schema.differences(saved, cfg) == {"model.kwargs.width": (None, 3),
                                                   "optim.lr": (1e-5, 0.5)}
  assert config_schema.differences(saved, cfg, ignore=("optim.lr",)) == {
      "model.kwargs.width": (None, 3)}


def test_check_compatible_refuses_another_model_and_logs_other_changes(caplog):
  saved = defaults.get_config().to_dict()
  changed = defaults.get_config()
  changed.optim.lr = 0.5
  changed.model.init_from = "elsewhere"  # where weights came from, not what the model is
  with caplog.at_level(logging.WARNING):
    config_schema.check_compatible(saved, changed, "DIR")
    config_schema.check_compatible(None, changed, "DIR")  # a checkpoint without a config
  assert "model.init_from '' -> 'elsewhere'" in caplog.text
  assert "optim.lr 1e-05 -> 0.5" in caplog.text
  changed.model.kwargs = ml_collections.ConfigDict({"width": 3})
  with pytest.raises(ConfigError, match=r"^model.kwargs.width: 3 in the config but None in "
                                        r"the checkpoints in DIR"):
    config_schema.check_compatible(saved, changed, "DIR")


def test_a_checkpoint_from_before_a_model_key_existed_resumes_at_its_default():
  """A key added to the defaults later (the saved config lacks it) is the same model at its
  default value, and another model at any other."""
  saved = defaults.get_config().to_dict()
  del saved["model"]["max_features"], saved["model"]["pooling"]
  config_schema.check_compatible(saved, defaults.get_config(), "DIR")
  wider = defaults.get_config()
  wider.model.max_features = 320
  with pytest.raises(ConfigError, match=r"^model.max_features: 320 in the config but None"):
    config_schema.check_compatible(saved, wider, "DIR")


def test_check_checkpoint_names_a_changed_component_source_only_given_todays_records(caplog):
  meta = {"config": defaults.get_config().to_dict(),
          "components": {"model.name": {"source": "/x/net.py", "sha256": "aa"}}}
  cfg = defaults.get_config()
  with caplog.at_level(logging.WARNING):
    config_schema.check_checkpoint(meta, cfg, "DIR")
    assert "source file has changed" not in caplog.text
    config_schema.check_checkpoint(meta, cfg, "DIR", {"model.name": {"source": "/x/net.py",
                                                              "sha256": "aa"}})
    assert "source file has changed" not in caplog.text
    config_schema.check_checkpoint(meta, cfg, "DIR", {"model.name": {"source": "/x/net.py",
                                                              "sha256": "bb"}})
  assert "(its SHA-256 differs): model.name: /x/net.py" in caplog.text
