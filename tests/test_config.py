"""The whole-config check that runs before any data work, and where synthetic data may go."""

import json
import os

import pytest

from configs import quickstart
from medseg_jax import config
from medseg_jax.data import pipeline
from medseg_jax.errors import ConfigError, DataError
from medseg_jax.parallel import multihost
import helpers


def quickstart_with(**overrides):
  """The quickstart config with `key__sub=value` overrides (dots written as `__`)."""
  cfg = quickstart.get_config()
  for key, value in overrides.items():
    *path, last = key.split("__")
    node = cfg
    for part in path:
      node = node[part]
    node[last] = value
  return cfg


# (overrides, the key the one-line error must name); each is wrong on its own.
BAD = [
    ({"model__name": "resnet"}, "model.name"),
    ({"model__norm": "layer"}, "model.norm"),
    ({"model__compute_dtype": "float16"}, "model.compute_dtype"),
    ({"model__depth": 0}, "model.depth"),
    ({"model__base_features": 0}, "model.base_features"),
    ({"model__dropout": 1.5}, "model.dropout"),
    ({"data__image_size": 60}, "data.image_size"),  # not a multiple of 2**depth = 8
    ({"data__image_size": 0}, "data.image_size"),
    ({"data__normalisation": "minmax"}, "data.normalisation"),
    ({"data__slice_selection": "middle"}, "data.slice_selection"),
    ({"data__resize": "crop"}, "data.resize"),
    ({"data__slice_axis": 3}, "data.slice_axis"),
    ({"data__slices_per_volume": -1}, "data.slices_per_volume"),
    ({"data__empty_slice_fraction": 2.0}, "data.empty_slice_fraction"),
    ({"data__clip_percentiles": (99.0, 1.0)}, "data.clip_percentiles"),
    ({"data__label_map": (0, 1, 300)}, "data.label_map"),
    ({"data__val_fraction": 0.9}, "data.val_fraction"),
    ({"data__synthetic_volumes": 2}, "data.synthetic_volumes"),
    ({"data__synthetic_shape": (32, 32)}, "data.synthetic_shape"),
    ({"data__preprocess_workers": -1}, "data.preprocess_workers"),
    ({"data__augment__enabled": True, "data__augment__zoom": (1.2, 0.8)}, "data.augment.zoom"),
    ({"data__augment__enabled": True, "data__augment__flip_probability": 2.0},
     "data.augment.flip_probability"),
    ({"optim__name": "rmsprop"}, "optim.name"),
    ({"lr__policy": "cyclic"}, "lr.policy"),
    ({"lr__scaling": "cubic"}, "lr.scaling"),
    ({"lr__warmup": "slow"}, "lr.warmup"),
    ({"lr__decay": "exponential"}, "lr.decay"),
    ({"lr__reference_batch_size": -4}, "lr.reference_batch_size"),
    # GreScale's values, checked while the quickstart's policy is still standard.
    ({"lr__grescale__stabilisation_factor": 1.5}, "lr.grescale.stabilisation_factor"),
    ({"lr__grescale__decay_coefficient": -0.1}, "lr.grescale.decay_coefficient"),
    ({"train__loss": "focal"}, "train.loss"),
    ({"train__per_device_batch_size": 0}, "train.per_device_batch_size"),
    ({"train__num_steps": -1}, "train.num_steps"),
    ({"train__num_epochs": 0}, "train.num_epochs"),
    ({"train__eval_every_steps": -1}, "train.eval_every_steps"),
    ({"train__divergence_patience": 0}, "train.divergence_patience"),
    ({"checkpoint__max_to_keep": 0}, "checkpoint.max_to_keep"),
    ({"monitor__log_every_steps": 0}, "monitor.log_every_steps"),
    ({"parallel__strategy": "horovod"}, "parallel.strategy"),
    ({"parallel__num_devices": 9}, "parallel.num_devices"),  # the tests have 8
    ({"parallel__num_devices": -1}, "parallel.num_devices"),
    ({"data__augment__samples_per_epoch": -1}, "data.augment.samples_per_epoch"),
    ({"data__augment__samples_per_epoch": True}, "data.augment.samples_per_epoch"),
]


# 3D: the quickstart on volumes, with a 3D network of the user's (a file beside the tests).
VOLUMES = {"data__spatial_dims": 3, "data__patch_size": (16, 16, 16),
           "model__name": os.path.join(os.path.dirname(__file__), "tiny_net3d.py:Tiny3D")}
BAD_3D = [
    ({"data__spatial_dims": 4}, "data.spatial_dims"),
    ({"model__name": "unet"}, "model.name"),  # a 2D network on volumes
    ({"data__patch_size": (16, 16)}, "data.patch_size"),
    ({"data__patch_size": (16, 16, 0)}, "data.patch_size"),
    ({"data__foreground_fraction": 1.5}, "data.foreground_fraction"),
    ({"data__target_spacing": (1.0, 0.0, 1.0)}, "data.target_spacing"),
    ({"data__target_spacing": ("a", 1, 1)}, "data.target_spacing"),
    ({"data__volume_normalisation": "minmax"}, "data.volume_normalisation"),
    ({"data__ct_clip_percentiles": (99.5, 0.5)}, "data.ct_clip_percentiles"),
    ({"data__foreground_samples": 0}, "data.foreground_samples"),
    ({"evaluation__window_overlap": 1.0}, "evaluation.window_overlap"),
    ({"evaluation__gaussian_sigma": 0.0}, "evaluation.gaussian_sigma"),
    ({"data__augment__enabled": True, "data__augment__zoom": (1.2, 0.8)}, "data.augment.zoom"),
    ({"data__augment__enabled": True, "data__augment__rotation_degrees": -5.0},
     "data.augment.rotation_degrees"),
]
BAD += [(dict(VOLUMES, **overrides), key) for overrides, key in BAD_3D]
BAD += [({"data__spatial_dims": 2, "model__name": "unet3d"}, "model.name")]  # a 3D one on slices


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
def test_a_bad_value_is_a_config_error_naming_its_key(overrides, key, devices8):
  cfg = quickstart_with(**overrides)
  with pytest.raises(ConfigError) as e:
    config.check(cfg)
  message = str(e.value)
  assert message.startswith(key) and "\n" not in message, message


def test_good_edges_pass(devices8):
  """Values at the edge of what is allowed are not rejected."""
  cfg = quickstart_with(data__image_size=8, model__dropout=0.0, train__num_epochs=0,
                        train__num_steps=1, parallel__num_devices=8, parallel__strategy="pmap",
                        model__norm="batch", data__augment__enabled=True, optim__name="lars",
                        lr__policy="grescale", lr__decay="poly", lr__warmup="gradual")
  config.check(cfg)


def test_a_3d_config_passes_and_its_network_is_checked_on_a_patch(devices8):
  """The check builds the network on x [1,*data.patch_size,C] (Tiny3D refuses any other
  rank) and the loss on 3D logits."""
  config.check(quickstart_with(**VOLUMES))
  with pytest.raises(ConfigError, match=r"^model\.name=.*fails on x \[1,16,16,16,1\]"):
    config.check(quickstart_with(**dict(VOLUMES, model__kwargs__features="four")))


def test_samples_per_epoch_without_augmentation_only_warns(devices8, caplog):
  """Allowed (an ablation may keep an augmented run's epoch length), but it repeats the
  slices unchanged, which the run says."""
  cfg = quickstart_with(data__augment__samples_per_epoch=35000)
  config.check(cfg)
  assert "data.augment.samples_per_epoch=35000 with data.augment.enabled=False" in caplog.text
  caplog.clear()
  config.check(quickstart_with(data__augment__samples_per_epoch=35000,
                               data__augment__enabled=True))
  assert "samples_per_epoch" not in caplog.text


# -- where the synthetic dataset may be written ----------------------------------------


def synthetic_cfg(root):
  return quickstart_with(data__root=str(root), data__synthetic_volumes=3,
                         data__synthetic_shape=(8, 8, 2))


def test_misspelt_root_is_not_found_and_writes_nothing(tmp_path):
  root = tmp_path / "Task01_BrainTumor"  # the real one would be ...Tumour
  with pytest.raises(DataError, match="Task01_BrainTumor/dataset.json: not found"):
    pipeline.prepare_dataset_root(helpers.data_source(synthetic_cfg(root)), str(tmp_path / "run"), multihost.barrier)
  assert os.listdir(tmp_path) == []


def test_a_non_empty_root_without_dataset_json_is_not_written_into(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(DataError, match="dataset.json: not found"):
    pipeline.prepare_dataset_root(helpers.data_source(synthetic_cfg(tmp_path)), str(tmp_path / "run"), multihost.barrier)
  assert os.listdir(tmp_path) == ["notes.txt"]


def test_synthetic_data_goes_into_an_empty_root_the_user_made(tmp_path):
  root = tmp_path / "synthetic"
  root.mkdir()
  assert pipeline.prepare_dataset_root(helpers.data_source(synthetic_cfg(root)), str(tmp_path / "run"), multihost.barrier) == str(root)
  with open(root / "dataset.json") as f:
    assert len(json.load(f)["training"]) == 3
  assert not (tmp_path / "run").exists()
  # The next run finds it and writes nothing.
  assert pipeline.dataset_root(helpers.data_source(synthetic_cfg(root)), str(tmp_path / "run")) == (str(root), False)


def test_synthetic_data_without_root_goes_into_the_workdir(tmp_path):
  cfg = synthetic_cfg("")
  root = pipeline.prepare_dataset_root(helpers.data_source(cfg), str(tmp_path), multihost.barrier)
  assert root == str(tmp_path / "data") and os.path.isfile(tmp_path / "data" / "dataset.json")


def test_no_root_and_no_synthetic_is_a_config_error(tmp_path):
  cfg = quickstart_with(data__synthetic=False)
  with pytest.raises(ConfigError, match="^data.root"):
    pipeline.dataset_root(helpers.data_source(cfg), str(tmp_path))
