"""The seam between 2D and 3D: `data.spatial_dims` chooses the kind of data once, and each
kind answers from its own settings what the stages used to branch on."""

import dataclasses

import pytest

import helpers
from medseg_jax import kinds
from medseg_jax.data import loader, store, targets, volume_loader, volume_store
from medseg_jax.errors import ConfigError
from medseg_jax.evaluation import evaluate

VOLUMES = ("--config.data.spatial_dims=3", "--config.data.patch_size=(16, 24, 8)",
           "--config.model.name=unet3d", "--config.evaluation.window_overlap=0.25",
           "--config.evaluation.mirror=True")


def test_slices_for_2_and_volumes_for_3():
  slices = kinds.from_config(helpers.config("--config.data.image_size=48"))
  volumes = kinds.from_config(helpers.config(*VOLUMES))
  assert isinstance(slices, kinds.Slices) and isinstance(volumes, kinds.Volumes)
  assert (slices.dims, slices.unit, slices.counted) == (2, "slices", "slices")
  assert (volumes.dims, volumes.unit, volumes.counted) == (3, "patches", "volumes")
  assert (slices.store, slices.loader) == (store, loader)
  assert (volumes.store, volumes.loader) == (volume_store, volume_loader)


@pytest.mark.parametrize("value", [1, 4, True])
def test_any_other_spatial_dims_is_one_config_error(value):
  cfg = helpers.config()
  cfg.data.spatial_dims = value
  with pytest.raises(ConfigError, match=r"^data\.spatial_dims=.*: must be 2 \(slices\) or 3 "
                                        r"\(volumes\)$"):
    kinds.from_config(cfg)


def test_an_example_is_a_slice_or_a_patch_of_the_configured_size():
  assert kinds.from_config(helpers.config("--config.data.image_size=48")).input_shape(4) == (
      48, 48, 4)
  assert kinds.from_config(helpers.config(*VOLUMES)).input_shape(2) == (16, 24, 8, 2)


def test_the_settings_are_frozen():
  kind = kinds.from_config(helpers.config(*VOLUMES))
  with pytest.raises(dataclasses.FrozenInstanceError):
    kind.patch = (8, 8, 8)


def test_the_evaluator_predicts_slices_or_slides_windows(devices8):
  """Each kind hands the evaluator its way of predicting a split; the 3D windows carry
  the patch and the evaluation settings, a global batch of windows at a time."""
  cfg = helpers.config(*VOLUMES)
  par = helpers.parallel(cfg)
  volumes = kinds.from_config(cfg).evaluator(par, lambda *a: None, lambda *a: None, 8,
                                             targets.Classes(2), ["background", "tumour"],
                                             "/nowhere")
  assert volumes.predict is evaluate.predict_volumes
  w = volumes.windows
  assert (w.patch, w.overlap, w.mirror, w.batch) == ((16, 24, 8), 0.25, True, 8)
  slices = kinds.from_config(helpers.config()).evaluator(
      par, lambda *a: None, lambda *a: None, 8, targets.Classes(2), ["background", "tumour"],
      "/nowhere")
  assert slices.predict is evaluate.predict_slices and slices.windows is None


def test_the_model_file_block_records_what_prediction_repeats():
  info = {"target_spacing": [1.0, 1.5, 2.0], "channel_names": ["CT"], "normalisation": ["ct"]}
  block = kinds.from_config(helpers.config(*VOLUMES)).model_preprocessing(info)
  assert block["spatial_dims"] == 3 and block["patch_size"] == [16, 24, 8]
  assert block["target_spacing"] == [1.0, 1.5, 2.0]
  assert block["channel_normalisation"] == {"CT": "ct"}
  assert (block["window_overlap"], block["mirror"]) == (0.25, True)
  slices = kinds.from_config(helpers.config("--config.data.image_size=48"))
  assert slices.model_preprocessing({})["image_size"] == 48
  assert slices.for_model({"preprocessing": slices.model_preprocessing({})}) == slices
