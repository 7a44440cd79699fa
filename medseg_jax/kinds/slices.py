"""2D: a run trains on slices of the slice store, evaluates them in global batches of the
compiled eval step and predicts a new volume slice by slice."""

import dataclasses
import functools
from typing import Callable

import ml_collections
import numpy as np
from absl import logging

from medseg_jax.data import augment, decathlon, loader, preprocess, store
from medseg_jax.evaluation import evaluate, mirroring, predict
from medseg_jax.kinds.base import DataKind
from medseg_jax.parallel import strategies

SLICE_AXES = (1, 2)  # the rows and columns of a batch of slices [N,H,W,C]
NORMALISATION = {"zscore_nonzero":
                 "z-score over the non-zero voxels of each volume and channel",
                 "percentile": "clipped to the {} percentiles of each volume and channel, "
                               "rescaled to [0, 1]"}


@dataclasses.dataclass(frozen=True)
class Slices(DataKind):
  """Slices: `settings` make the stored slices; `ranges` bound the augmentation of the
  training slices."""

  settings: preprocess.Settings
  ranges: augment.Ranges | None = None   # None: no augmentation
  mirror: bool = False                   # evaluation.mirror: each slice also flipped

  dims = 2
  unit = "slices"
  counted = "slices"
  store = store
  loader = loader
  augmenter = augment

  @classmethod
  def from_config(cls, data: ml_collections.ConfigDict,
                  evaluation: ml_collections.ConfigDict) -> "Slices":
    return cls(settings=preprocess.settings_from_config(data),
               ranges=augment.ranges_from_config(data.augment),
               mirror=bool(evaluation.mirror))

  @property
  def flips(self) -> tuple[tuple[int, ...], ...]:
    """The flips of each slice mirroring averages over (4 with `mirror`, else none)."""
    return tuple(mirroring.flips(self.mirror, SLICE_AXES))

  def evaluated_by(self, eval_fn: Callable) -> Callable:
    return functools.partial(eval_fn, flips=self.flips) if self.mirror else eval_fn

  @property
  def store_settings(self) -> preprocess.Settings:
    return self.settings

  @property
  def case_settings(self) -> preprocess.Settings:
    return self.settings

  def split_set(self, opened: store.Store, names: list[str]) -> loader.SliceSet:
    return loader.from_store(opened, names)

  def store_info(self, opened: store.Store, sets: dict) -> dict:
    return {"slices": {s: len(v) for s, v in sets.items()}}

  def input_shape(self, channels: int) -> tuple[int, ...]:
    return (self.settings.image_size, self.settings.image_size, channels)

  def predictor(self, par: strategies.Parallel, predict_fn: Callable, batch: int) -> dict:
    return {"predict": evaluate.predict_slices}

  def probabilities(self, info: dict, batch: int) -> Callable:
    volume = functools.partial(predict.predict_volume, self.settings, tuple(info["modalities"]))
    if not self.mirror:
      return volume
    return lambda path, run: volume(path, lambda slices: mirroring.mean_over_flips(
        run, slices, self.flips, np.flip))

  def for_model(self, model_json: dict) -> "Slices":
    fields = {f.name for f in dataclasses.fields(preprocess.Settings)}
    saved = {k: tuple(v) if isinstance(v, list) else v
             for k, v in model_json["preprocessing"].items() if k in fields}
    return dataclasses.replace(self, settings=preprocess.Settings(**saved))

  def model_preprocessing(self, info: dict) -> dict:
    return self.settings.to_dict()

  def zoo_fields(self) -> dict:
    return {}

  def record(self, info: dict) -> dict:
    s = self.settings
    return {"spatial_dims": self.dims, "image_size": s.image_size,
            "slice_axis": s.slice_axis, "slices_per_volume": s.slices_per_volume,
            "slice_selection": s.slice_selection,
            "empty_slice_fraction": s.empty_slice_fraction, "resize": s.resize,
            "slice_store": info.get("store"), "slices": info["slices"],
            "normalisation": NORMALISATION[s.normalisation].format(
                list(s.clip_percentiles)),
            "inference": {"mirror": self.mirror}}

  def warn(self, samples_per_epoch: int, augment_enabled: bool) -> None:
    # Longer epochs without augmentation are allowed (an ablation may keep an augmented
    # run's schedule in steps), but they only repeat the same slices: say so. (A 3D epoch
    # of repeated draws still draws new patches.)
    if samples_per_epoch and not augment_enabled:
      logging.warning("data.augment.samples_per_epoch=%d with data.augment.enabled=False: "
                      "each epoch repeats the training slices unchanged", samples_per_epoch)

  def _rows(self, stored: dict) -> int:
    return stored["stop"] - stored["start"]

  def _header_count(self, dataset: decathlon.Dataset, names: list[str]) -> int:
    by_name = {c.name: c for c in dataset.training}
    return sum(_header_slice_count(by_name[name], self.settings) for name in names)


def _header_slice_count(case: decathlon.Case, settings: preprocess.Settings) -> int:
  if settings.slice_selection == "foreground":
    label = preprocess.map_labels(decathlon.load_nifti(case.label).data,
                                  settings.label_map, case.label)
    return len(preprocess.select_slices(label, settings))
  depth = decathlon.canonical_shape(case.image)[settings.slice_axis]
  if settings.slice_selection == "all":
    return depth
  return len(preprocess.central_slices(depth, settings.slices_per_volume))
