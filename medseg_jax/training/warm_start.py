"""`model.init_from`: a fresh run's parameters from VGG-16 weights, from another run, or
from an exported model file.

Applied once, to the fresh state of a run that starts from scratch (a resume restores the
run's own checkpoint instead). From a run (its directory, its checkpoints directory, or
one step's directory) or a model file (`--mode=export`'s FILE, or a NAME of the model zoo)
only the parameters and norm statistics are taken, matched by path (`match`, one rule for
both): the optimizer, step and loader position start fresh. A class head whose class count
changed is initialised anew; any other difference means another model and is refused,
already by the config check when the paths or shapes differ. Every process reads the
source itself.
"""

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from medseg_jax import modelfile, zoo
from medseg_jax.errors import ConfigError, MedsegError
from medseg_jax.models import pretrained
from medseg_jax.training import checkpoint
from medseg_jax.training.state import TrainState

KEY = "model.init_from"


def source_kind(spec: str) -> str:
  """What `spec` names: 'run' (a run, checkpoints or step directory), 'model' (a model
  file or a zoo model's name) or 'vgg' (a VGG-16 file)."""
  if os.path.isdir(spec):
    return "run"
  return "model" if zoo.is_model_spec(spec) else "vgg"


def check(model: ml_collections.ConfigDict, params, starts_fresh: bool = True,
          num_classes: int | None = None) -> None:
  """Checks `model.init_checkpoint`, and `model.init_from` when a run `starts_fresh` (only
  then is it read), against the model's parameter shapes `params` (built for
  `num_classes`): a VGG-16 file is mapped onto them (a layer of another width is a
  ConfigError); a run's checkpoint or a model file must hold the same parameters, of the
  same shapes but for a class head (the dataset decides the class count, so the head's
  shapes are matched again when the run starts)."""
  which = checkpoint.parse_which(model.init_checkpoint, "model.init_checkpoint")
  if not model.init_from or not starts_fresh:
    return
  if source_kind(model.init_from) == "vgg":
    pretrained.check_fits(model.init_from, model.name)
    pretrained.into_fcn(pretrained.read_vgg(model.init_from), params, model.fc_features,
                        log=False)
    return
  match(*_saved(model.init_from, which, arrays=False), {"params": params}, num_classes)


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
  if source_kind(source) == "vgg":
    vgg = pretrained.read_vgg(source)
    params, loaded, new = pretrained.into_fcn(vgg, jax.device_get(state.params),
                                              cfg.model.fc_features)
    model_state = state.model_state
  else:
    which = checkpoint.parse_which(cfg.model.init_checkpoint, "model.init_checkpoint")
    fresh = jax.device_get({"params": state.params, "model_state": state.model_state})
    tree, loaded, new = match(*_saved(source, which, arrays=True), fresh, num_classes)
    tree = jax.tree.map(lambda have, leaf: np.asarray(have, leaf.dtype), tree, fresh)
    params, model_state = tree["params"], tree["model_state"]
  logging.info("%s=%s: %d layers loaded (%s), %d new (%s)", KEY, source, len(loaded),
               ", ".join(loaded), len(new), ", ".join(new) or "none")
  return state.replace(params=params, model_state=model_state,
                       opt_state=state.tx.init(params))


def match(where: str, what: str, saved: dict, fresh: dict, num_classes: int | None):
  """`fresh` (a tree under "params" and maybe "model_state", of arrays or shapes) with the
  leaves of `saved` ({path: array or its metadata}, from a `what` at `where`) at its
  paths; also the layers loaded and those new: class heads of another class count (with
  `num_classes` None, every shape difference counts as one). A path one side lacks, or
  any other shape difference, is a ConfigError naming it."""
  saved = {path: leaf for path, leaf in saved.items() if path[0] in fresh}
  ours = _flat(fresh)
  for missing, where_not in ((sorted(ours.keys() - saved.keys()), "it has no"),
                             (sorted(saved.keys() - ours.keys()), "the model has no")):
    if missing:
      raise ConfigError(f"{KEY}={where}: a {what} of another model: {where_not} "
                        f"{'/'.join(missing[0])}")
  loaded, new = set(), set()
  def take(path, leaf):
    path = _keys(path)
    layer, have = "/".join(path[1:-1]) or path[-1], saved[path]
    if tuple(have.shape) == tuple(leaf.shape):
      loaded.add(layer)
      return have
    if num_classes is not None and not _is_class_head(tuple(have.shape), tuple(leaf.shape),
                                                      num_classes):
      raise ConfigError(f"{KEY}={where}: {'/'.join(path)} has shape {list(have.shape)} in "
                        f"the {what} but {list(leaf.shape)} in the model")
    new.add(layer)
    return leaf
  tree = jax.tree_util.tree_map_with_path(take, fresh)
  return tree, sorted(loaded - new), sorted(new)


def _is_class_head(saved: tuple, now: tuple, num_classes: int) -> bool:
  """Shapes that differ only in dimensions of the class count, the last among them."""
  return (len(saved) == len(now) and now[-1] == num_classes and saved[-1] != now[-1]
          and all(s == n or n == num_classes for s, n in zip(saved, now)))


def _saved(spec: str, which: str | int, arrays: bool) -> tuple[str, str, dict]:
  """(where, what, {path: leaf}) of a run's checkpoint step or a model file: the source
  as messages name it, its kind, and its arrays (or only their metadata)."""
  if source_kind(spec) == "run":
    directory = step_directory(spec, which)
    try:
      return directory, "checkpoint", _flat(checkpoint.read_state_tree(directory, arrays))
    except MedsegError as e:
      raise ConfigError(f"{KEY}={e}") from e
  try:
    path = zoo.resolve(spec, key=KEY)
  except MedsegError as e:
    raise ConfigError(str(e)) from e
  where = spec if path == spec else f"{spec} ({path})"
  try:
    return where, "model file", _flat(modelfile.read(path).variables())
  except MedsegError as e:
    raise ConfigError(f"{KEY}={e}" if path == spec else f"{KEY}={spec}: {e}") from e


def _keys(path) -> tuple:
  return tuple(str(getattr(k, "key", k)) for k in path)


def _flat(tree: dict) -> dict:
  return {_keys(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
