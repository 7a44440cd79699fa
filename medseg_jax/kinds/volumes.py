"""3D: a run trains on patches drawn from whole volumes of the volume store (resampled
to one voxel spacing), evaluates and predicts whole volumes by sliding windows spread
over every device and host."""

import dataclasses
import functools
from typing import Callable

import ml_collections

from medseg_jax.data import (augment3d, decathlon, patches, pipeline, preprocess,
                             volume_loader, volume_store)
from medseg_jax.evaluation import evaluate, predict, sliding_window
from medseg_jax.kinds.base import DataKind
from medseg_jax.parallel import strategies


@dataclasses.dataclass(frozen=True)
class Volumes(DataKind):
  """Volumes and patches: `settings` make the stored volumes; training draws `patch`
  voxels, `foreground_fraction` of each global batch centred on foreground; validation
  and prediction slide windows of the patch's size (`window_overlap`, Gaussian weights
  of `gaussian_sigma`, optionally mirrored)."""

  settings: volume_store.Settings
  patch: tuple[int, int, int]
  foreground_fraction: float
  ranges: augment3d.Ranges | None = None  # None: no augmentation
  window_overlap: float = 0.5
  gaussian_sigma: float = 0.125
  mirror: bool = False

  dims = 3
  unit = "patches"
  counted = "volumes"
  store = volume_store
  loader = volume_loader
  augmenter = augment3d

  @classmethod
  def from_config(cls, data: ml_collections.ConfigDict,
                  evaluation: ml_collections.ConfigDict) -> "Volumes":
    patches.check_settings(tuple(data.patch_size), data.foreground_fraction)
    sliding_window.check_settings(evaluation.window_overlap, evaluation.gaussian_sigma)
    return cls(settings=_store_settings(data), patch=tuple(int(n) for n in data.patch_size),
               foreground_fraction=float(data.foreground_fraction),
               ranges=_ranges(data.augment), window_overlap=float(evaluation.window_overlap),
               gaussian_sigma=float(evaluation.gaussian_sigma),
               mirror=bool(evaluation.mirror))

  @property
  def store_settings(self) -> volume_store.Settings:
    return self.settings

  @property
  def case_settings(self) -> preprocess.Settings:
    return self.settings.case_settings()

  def split_set(self, opened: volume_store.VolumeStore,
                names: list[str]) -> volume_loader.VolumeSet:
    return volume_loader.from_store(opened, names, self.patch, self.foreground_fraction)

  def store_info(self, opened: volume_store.VolumeStore, sets: dict) -> dict:
    """What prediction repeats on a new volume: the target spacing, each channel's
    normalisation and the CT statistics."""
    meta = opened.meta
    return {"spatial_dims": self.dims, "target_spacing": meta["target_spacing"],
            "channel_names": meta["channels"], "normalisation": meta["normalisation"],
            "ct_statistics": meta["ct_statistics"], "patch_size": list(self.patch)}

  def input_shape(self, channels: int) -> tuple[int, ...]:
    return self.patch + (channels,)

  def windows(self, batch: int) -> sliding_window.Windows:
    """The sliding windows, `batch` (a global batch) at a time."""
    return sliding_window.Windows(patch=self.patch, overlap=self.window_overlap,
                                  gaussian_sigma=self.gaussian_sigma, mirror=self.mirror,
                                  batch=batch)

  def predictor(self, par: strategies.Parallel, predict_fn: Callable, batch: int) -> dict:
    compiled = par.predict_step(predict_fn)
    return {"predict": evaluate.predict_volumes, "windows": self.windows(batch),
            "window_run": lambda state: predict.mesh_run(par, compiled, state, batch)}

  def probabilities(self, info: dict, batch: int) -> Callable:
    settings = predict.volumetric(info, self.settings.modalities, self.windows(batch),
                                  self.settings.crop_nonzero)
    return functools.partial(predict.predict_volume_3d, settings, tuple(info["modalities"]))

  def for_model(self, model_json: dict) -> "Volumes":
    return self  # the model file's config holds the volume settings

  def model_preprocessing(self, info: dict) -> dict:
    """The volume settings with the target spacing, each channel's normalisation, the
    patch and the sliding windows."""
    return dict(self.settings.to_dict(), spatial_dims=self.dims,
                target_spacing=info["target_spacing"],
                channel_normalisation=dict(zip(info["channel_names"], info["normalisation"])),
                patch_size=list(self.patch), window_overlap=self.window_overlap,
                gaussian_sigma=self.gaussian_sigma, mirror=self.mirror)

  def zoo_fields(self) -> dict:
    return {"patch_size": list(self.patch)}  # a 3D network's input is a patch

  def record(self, info: dict) -> dict:
    """The 3D record: spacing, normalisation, patches and their sampling, inference."""
    return {"spatial_dims": self.dims, "volume_store": info.get("store"),
            "target_spacing": info["target_spacing"],
            "target_spacing_source": ("data.target_spacing" if self.settings.target_spacing
                                      else "median of the training images"),
            "normalisation": dict(zip(info["channel_names"], info["normalisation"])),
            "ct_statistics": info["ct_statistics"],
            "patch_size": list(self.patch),
            "sampling": {"foreground_fraction": self.foreground_fraction,
                         "foreground_samples": self.settings.foreground_samples,
                         "patches_per_epoch": info.get("samples_per_epoch"),
                         "rule": "volume from the epoch's order, position from (seed, epoch, "
                                 "index); the last ceil(fraction x global batch) draws of "
                                 "each global batch centred on a foreground voxel"},
            "inference": {"window_overlap": self.window_overlap,
                          "gaussian_sigma": self.gaussian_sigma, "mirror": self.mirror}}

  def warn(self, samples_per_epoch: int, augment_enabled: bool) -> None:
    pass  # a 3D epoch of repeated draws still draws new patches

  def _rows(self, stored: dict) -> int:
    return 1

  def _header_count(self, dataset: decathlon.Dataset, names: list[str]) -> int:
    return len(names)


def _store_settings(data: ml_collections.ConfigDict) -> volume_store.Settings:
  """The volume store's settings of a `data` config section; checked."""
  return volume_store.check_settings(volume_store.Settings(
      modalities=tuple(data.modalities), label_map=tuple(data.label_map),
      target_spacing=pipeline.numbers("data.target_spacing", data.target_spacing),
      normalisation=data.volume_normalisation, crop_nonzero=bool(data.crop_to_nonzero),
      ct_clip_percentiles=pipeline.numbers("data.ct_clip_percentiles",
                                           data.ct_clip_percentiles),
      foreground_samples=data.foreground_samples))


def _ranges(section: ml_collections.ConfigDict) -> augment3d.Ranges | None:
  """The checked 3D ranges of `data.augment` (None when off): `rotation_degrees` about
  each of the three axes; `translate_pixels` is not used, a patch's position being drawn
  already."""
  if not section.enabled:
    return None
  ranges = augment3d.Ranges(rotation_degrees=(float(section.rotation_degrees),) * 3,
                            zoom=tuple(float(z) for z in section.zoom),
                            flip_probability=float(section.flip_probability),
                            intensity_scale=float(section.intensity_scale),
                            intensity_shift=float(section.intensity_shift))
  augment3d.check(ranges)
  return ranges
