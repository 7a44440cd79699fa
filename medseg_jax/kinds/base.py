"""The interface of a kind of data, and the steps both kinds take the same way."""

import abc
import functools
import os
from types import ModuleType
from typing import Callable, Iterator

import jax
import ml_collections

from medseg_jax.data import decathlon, pipeline, split, targets
from medseg_jax.data.source import Source
from medseg_jax.evaluation import evaluate
from medseg_jax.parallel import strategies


class DataKind(abc.ABC):
  """What differs between training on slices and on volumes; one instance per run,
  holding its checked settings (frozen dataclasses in the implementations)."""

  dims: int            # spatial dimensions of an example (and of the network's input)
  unit: str            # what a training example is, for logs and throughput keys
  counted: str         # what the training set is counted in
  store: ModuleType    # the store module: `data.store` or `data.volume_store`
  loader: ModuleType   # the batches' module: `data.loader` or `data.volume_loader`
  augmenter: ModuleType  # the augmentation's module: `data.augment` or `data.augment3d`
  ranges: object       # the augmentation's ranges (the augmenter's `Ranges`), None if off

  @classmethod
  @abc.abstractmethod
  def from_config(cls, data: ml_collections.ConfigDict,
                  evaluation: ml_collections.ConfigDict) -> "DataKind":
    """The kind's settings read from the config's `data` and `evaluation` sections."""

  @property
  @abc.abstractmethod
  def store_settings(self):
    """Every setting that changes the stored examples (part of the store's key)."""

  @property
  @abc.abstractmethod
  def case_settings(self):
    """What each subject is read and checked against (`validate.check_dataset`)."""

  @abc.abstractmethod
  def split_set(self, opened, names: list[str]):
    """The examples of the subjects `names` of the opened store, in that order."""

  @abc.abstractmethod
  def store_info(self, opened, sets: dict) -> dict:
    """What data_info.json records of this kind's store and splits."""

  @abc.abstractmethod
  def input_shape(self, channels: int) -> tuple[int, ...]:
    """One training example's shape, channels last."""

  def evaluated_by(self, eval_fn: Callable) -> Callable:
    """The pure eval step this kind evaluates with: `eval_fn` (2D binds its mirroring)."""
    return eval_fn

  @abc.abstractmethod
  def predictor(self, par: strategies.Parallel, predict_fn: Callable,
                batch: int) -> dict:
    """The `evaluate.Evaluator` fields that predict a split: `predict`, and in 3D the
    windows and their run over the mesh of `par` (`predict_fn` is the pure predict step)."""

  @abc.abstractmethod
  def probabilities(self, info: dict, batch: int) -> Callable:
    """`(path, run) -> probabilities [X,Y,Z,classes]` of a new volume, prepared as the run
    whose data_info.json (or model.json) is `info` prepared its data."""

  @abc.abstractmethod
  def for_model(self, model_json: dict) -> "DataKind":
    """This kind with the preprocessing a model file's model.json records."""

  @abc.abstractmethod
  def model_preprocessing(self, info: dict) -> dict:
    """model.json's preprocessing block for a run whose data_info.json is `info`."""

  @abc.abstractmethod
  def zoo_fields(self) -> dict:
    """What the zoo's index shows of this kind beside the common fields."""

  @abc.abstractmethod
  def record(self, info: dict) -> dict:
    """The manifest's record of this kind's data settings."""

  @abc.abstractmethod
  def warn(self, samples_per_epoch: int, augment_enabled: bool) -> None:
    """Logs a setting that is valid but likely not meant."""

  @abc.abstractmethod
  def _rows(self, stored: dict) -> int:
    """The training examples one stored subject (its store meta entry) gives."""

  @abc.abstractmethod
  def _header_count(self, dataset: decathlon.Dataset, names: list[str]) -> int:
    """The training examples of the subjects `names`, from their files (no store)."""

  def load_splits(self, source: Source, workdir: str, barrier: pipeline.Barrier
                  ) -> tuple[dict, dict]:
    """Validates and preprocesses the dataset into its store (once), splits it by
    subject (recorded in WORKDIR/split.json) and returns the splits and data_info."""
    dataset = pipeline.read_dataset(source, workdir, barrier)
    opened = self._open(source, dataset, barrier)
    chosen = pipeline.splits(source, workdir, opened, dataset, record=jax.process_index() == 0)
    sets = {s: self.split_set(opened, chosen[s]) for s in split.SPLITS}
    return sets, dict(pipeline.common_info(dataset, opened, chosen),
                      **self.store_info(opened, sets))

  def train_count(self, source: Source, workdir: str, barrier: pipeline.Barrier) -> int:
    """The training examples (slices, or volumes to draw patches from) a run trains on,
    without training.

    With `data.skip_invalid=True`, or when the store for these settings exists, the
    count comes from the store (built if absent: only validation, which reads every
    volume, knows the subjects a run leaves out), split as `load_splits` splits it.
    Otherwise it comes from the file headers (and for slices chosen by foreground, the
    label volumes)."""
    dataset = pipeline.read_dataset(source, workdir, barrier)
    path = pipeline.store_path(source, dataset, self.store, self.store_settings)
    if source.skip_invalid or os.path.isdir(path):
      opened = self._open(source, dataset, barrier)
      rows = {v["name"]: self._rows(v) for v in opened.volumes}
      chosen = pipeline.splits(source, workdir, opened, dataset, False)
      return sum(rows[name] for name in chosen["train"])
    return self._header_count(dataset, pipeline.new_split(source, dataset)["train"])

  def train_batches(self, data, global_batch: int, seed: int, epoch: int,
                    process_index: int, process_count: int, offset: int,
                    draws: int) -> Iterator[dict]:
    """This process's part of each global batch of one epoch of `draws` draws (slices, or
    patches), from `offset` draws into the epoch."""
    return self.loader.train_batches(data, global_batch, seed, epoch, process_index,
                                     process_count, offset, draws=draws)

  def augmentation(self) -> Callable | None:
    """The train step's on-device augmentation (None when off)."""
    if self.ranges is None:
      return None
    return functools.partial(self.augmenter.augment_batch, ranges=self.ranges)

  def evaluator(self, par: strategies.Parallel, eval_fn: Callable, predict_fn: Callable,
                batch: int, outputs: targets.Classes | targets.Regions, class_names: list[str],
                workdir: str) -> evaluate.Evaluator:
    """The evaluator of a run on the devices of `par`: the pure eval and predict steps,
    compiled by `par`, a global batch of `batch` examples (3D: windows)."""
    compiled = par.eval_step(self.evaluated_by(eval_fn))
    return evaluate.Evaluator(eval_step=par.in_flight.wrap(compiled),
                              put_batch=par.put_batch,
                              global_batch=batch, outputs=outputs,
                              class_names=class_names, workdir=workdir,
                              **self.predictor(par, predict_fn, batch))

  def _open(self, source: Source, dataset: decathlon.Dataset, barrier: pipeline.Barrier):
    return pipeline.open_store(source, dataset, self.store, self.store_settings,
                               self.case_settings, barrier)
