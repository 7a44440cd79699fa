"""`model.init_from`: a fresh run's parameters from VGG-16 weights or from another run.

Applied once, to the fresh state of a run that starts from scratch (a resume restores the
run's own checkpoint instead). From a run (its directory, its checkpoints directory, or
one step's directory) only the parameters and norm statistics are taken, matched by path:
the optimizer, step and loader position start fresh. A class head whose class count
changed is initialised anew; any other difference means another model and is refused.
Every process reads the source itself.
"""

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from medseg_jax.errors import ConfigError, MedsegError
from medseg_jax.models import pretrained
from medseg_jax.training import checkpoint
from medseg_jax.training.state import TrainState

KEY = "model.init_from"


def check(model: ml_collections.ConfigDict, params, starts_fresh: bool = True) -> None:
  """Checks `model.init_checkpoint`, and `model.init_from` when a run `starts_fresh` (only
  then is it read), against the model's parameter shapes `params`: a VGG-16 file is
  mapped onto them (a layer of another width is a ConfigError); a run's checkpoint must
  hold the same parameters (its shapes are matched when the run starts: the class head
  depends on the dataset)."""
  which = checkpoint.parse_which(model.init_checkpoint, "model.init_checkpoint")
  if not model.init_from or not starts_fresh:
    return
  if not os.path.isdir(model.init_from):
    pretrained.check_fits(model.init_from, model.name)
    pretrained.into_fcn(pretrained.read_vgg(model.init_from), params, model.fc_features,
                        log=False)
    return
  directory = step_directory(model.init_from, which)
  saved = {path for path in _flat(_read_tree(directory, arrays=False)) if path[0] == "params"}
  _check_same_paths(directory, saved, set(_flat({"params": params})))


def _check_same_paths(directory: str, saved: set, ours: set) -> None:
  for missing, where in ((sorted(ours - saved), "it has no"),
                         (sorted(saved - ours), "the model has no")):
    if missing:
      raise ConfigError(f"{KEY}={directory}: a checkpoint of another model: {where} "
                        f"{'/'.join(missing[0])}")


def step_directory(path: str, which: str | int) -> str:
  """The checkpoint step directory of `path` (a run, its checkpoints directory or a step)
  that `which` ('best', 'latest' or a step) names."""
  try:
    return checkpoint.step_directory(path, which)
  except MedsegError as e:
    raise ConfigError(f"{KEY}={path} (model.init_checkpoint={which}): {e}") from e


def apply(cfg: ml_collections.ConfigDict, state: TrainState, num_classes: int) -> TrainState:
  """`state` (fresh, on the host) with its parameters from `model.init_from`, if set, and
  a fresh optimizer state for them."""
  source = cfg.model.init_from
  if not source:
    return state
  if os.path.isdir(source):
    directory = step_directory(source, checkpoint.parse_which(cfg.model.init_checkpoint,
                                                              "model.init_checkpoint"))
    params, model_state, loaded, new = from_checkpoint(directory, state, num_classes)
  else:
    vgg = pretrained.read_vgg(source)
    params, loaded, new = pretrained.into_fcn(vgg, jax.device_get(state.params),
                                              cfg.model.fc_features)
    model_state = state.model_state
  logging.info("%s=%s: %d layers loaded (%s), %d new (%s)", KEY, source, len(loaded),
               ", ".join(loaded), len(new), ", ".join(new) or "none")
  return state.replace(params=params, model_state=model_state,
                       opt_state=state.tx.init(params))


def from_checkpoint(directory: str, state: TrainState, num_classes: int):
  """Params and model state of `state` with the checkpoint's arrays at matching paths;
  also the layers loaded and those new (class heads of another class count)."""
  fresh = jax.device_get({"params": state.params, "model_state": state.model_state})
  saved = {path: leaf for path, leaf in _flat(_read_tree(directory)).items()
           if path[0] in fresh}
  _check_same_paths(directory, set(saved), set(_flat(fresh)))
  loaded, new = set(), set()
  def take(path, leaf):
    path = tuple(str(getattr(k, "key", k)) for k in path)
    layer, have = "/".join(path[1:-1]) or path[-1], saved[path]
    if have.shape == leaf.shape:
      loaded.add(layer)
      return np.asarray(have, leaf.dtype)
    if not _is_class_head(have.shape, leaf.shape, num_classes):
      raise ConfigError(f"{KEY}={directory}: {'/'.join(path)} has shape {list(have.shape)} in "
                        f"the checkpoint but {list(leaf.shape)} in the model")
    new.add(layer)
    return leaf
  tree = jax.tree_util.tree_map_with_path(take, fresh)
  return tree["params"], tree["model_state"], sorted(loaded - new), sorted(new)


def _is_class_head(saved: tuple, now: tuple, num_classes: int) -> bool:
  """Shapes that differ only in dimensions of the class count, the last among them."""
  return (len(saved) == len(now) and now[-1] == num_classes and saved[-1] != now[-1]
          and all(s == n or n == num_classes for s, n in zip(saved, now)))


def _read_tree(directory: str, arrays: bool = True) -> dict:
  """The `state` item of a checkpoint step, as numpy arrays (or only its metadata)."""
  try:
    return checkpoint.read_state_tree(directory, arrays)
  except MedsegError as e:
    raise ConfigError(f"{KEY}={e}") from e


def _flat(tree: dict) -> dict:
  return {tuple(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
