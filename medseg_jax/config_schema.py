"""What a config is: the keys of `medseg_jax/defaults.py`, addressed by dotted names
("model.name"); a saved config (a checkpoint's or a model file's) migrated onto today's keys; and whether a
checkpoint's saved config and component sources still fit the run at hand."""

import importlib.util
import json
from typing import Any, Mapping, Sequence

import ml_collections
from absl import logging

from medseg_jax import components, defaults
from medseg_jax.errors import ConfigError

# Sections whose keys are the user's: the keywords of a network and of plugins.
FREE_FORM = ("model.kwargs", "train.plugin_kwargs")
# Model keys that say where a fresh run's weights came from, not what the model is.
NOT_THE_MODEL = ("model.init_from", "model.init_checkpoint")

Tree = Mapping[str, Any] | ml_collections.ConfigDict


def load_config(config_arg: str) -> ml_collections.ConfigDict:
  """`get_config()` of the file `PATH` (`get_config(VARIANT)` for `PATH:VARIANT`)."""
  path, _, variant = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("_medseg_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def base_config() -> ml_collections.ConfigDict:
  """The defaults every config file starts from (`defaults.get_config()`): a config must
  have exactly their keys."""
  return defaults.get_config()


def flatten(tree: Tree, whole: Sequence[str] = FREE_FORM) -> dict[str, Any]:
  """Dotted key -> value of a nested config or dict: {"seed": 0, "model.name": "unet", ...}.
  Each section named in `whole` (by default the free-form ones) is one value; other empty
  sections have no key."""
  # Imported here: flax brings JAX along, which the commands that never flatten a config
  # (medseg_jax.zoo, --help) would otherwise load for a second or more at every start.
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  if isinstance(tree, ml_collections.ConfigDict):
    tree = tree.to_dict()
  return traverse_util.flatten_dict(dict(tree), sep=".",
                                    is_leaf=lambda path, _: ".".join(path) in whole)


def lookup(tree: Tree, key: str) -> Any:
  """The value at the dotted `key` of a nested config or dict; KeyError(key) if there is
  none (a part missing, or a part that is a value, not a section)."""
  node = tree
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise KeyError(key)
    node = node[part]
  return node


def assign(tree: Tree, key: str, value: Any) -> None:
  """Sets the dotted `key` of a nested config or dict to `value`, in place."""
  parent, _, leaf = key.rpartition(".")
  (lookup(tree, parent) if parent else tree)[leaf] = value


def check_keys(cfg: ml_collections.ConfigDict, path: str) -> None:
  """Raises ConfigError naming every key of the defaults that the config from the file at
  `path` lacks, and every key it has that they do not (a misspelling, or a key that no
  longer exists)."""
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not an "
                      "ml_collections.ConfigDict")
  reference, keys = set(flatten(base_config())), set(flatten(cfg))
  missing, unknown = sorted(reference - keys), sorted(keys - reference)
  problems = [f"lacks config keys {', '.join(missing)}"] if missing else []
  problems += [f"has unknown config keys {', '.join(unknown)}"] if unknown else []
  if problems:
    raise ConfigError(f"{path}: {'; '.join(problems)} (a config has exactly the keys of "
                      "medseg_jax/defaults.py)")


def config_from_saved(saved: Mapping[str, Any], where: str) -> ml_collections.ConfigDict:
  """A locked config from a saved one (`cfg.to_dict()` as JSON: a checkpoint's or a model
  file's) on top of the defaults, so that what an older medseg_jax saved
  keeps loading: lists become tuples where the defaults have tuples, a saved key they no
  longer have (or of another kind) is dropped with a warning naming `where`, and a key
  added since keeps its default."""
  cfg = base_config()
  dropped = [key for key, value in flatten(saved).items() if not _merge(cfg, key, value)]
  if dropped:
    logging.warning("%s: saved config keys this medseg_jax does not have (or has with another "
                    "type) are left at their defaults: %s", where, ", ".join(dropped))
  cfg.lock()
  return cfg


def _merge(cfg: ml_collections.ConfigDict, key: str, value: Any) -> bool:
  """Sets `key` of `cfg` to a saved `value`; False if `cfg` has no such value to set."""
  parent, _, leaf = key.rpartition(".")
  try:
    node = lookup(cfg, parent) if parent else cfg
  except KeyError:
    return False
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    return False
  if key in FREE_FORM and isinstance(value, dict):
    node[leaf] = ml_collections.ConfigDict(value)
    return True
  if isinstance(node[leaf], ml_collections.ConfigDict):  # a section saved as one value
    return False
  try:
    node[leaf] = _tuples(value) if isinstance(node[leaf], tuple) else value
  except (TypeError, ValueError):  # ConfigDict refuses a value of another type
    return False
  return True


def _tuples(value):
  """JSON's lists back to the tuples a config holds."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def differences(saved: Tree, cfg: Tree, ignore: Sequence[str] = ()
                ) -> dict[str, tuple[Any, Any]]:
  """Dotted key -> (saved value, current value) for every setting, free-form ones key by
  key, in which a saved config and `cfg` differ, sorted by key; `ignore`d keys aside."""
  saved_flat, now = (flatten(_as_saved(tree), whole=()) for tree in (saved, cfg))
  return {key: (saved_flat.get(key), now.get(key))
          for key in sorted(saved_flat.keys() | now.keys())
          if key not in ignore and saved_flat.get(key) != now.get(key)}


def _as_saved(tree: Tree) -> dict:
  """`tree` as it reads back from JSON (tuples become lists), for comparing with a saved
  one."""
  if isinstance(tree, ml_collections.ConfigDict):
    tree = tree.to_dict()
  return json.loads(json.dumps(tree))


def check_compatible(saved: Mapping[str, Any] | None, cfg: ml_collections.ConfigDict,
                     where: str) -> None:
  """Refuses a checkpoint's saved config (None: it saved none) of another model than
  `cfg`'s; logs every other setting that changed since. `where` names the checkpoints."""
  if saved is None:
    return
  changed = differences(saved, cfg)
  added = _added_at_default(saved, changed)
  for key, (before, now) in changed.items():
    if key.startswith("model.") and key not in NOT_THE_MODEL and key not in added:
      raise ConfigError(f"{key}: {now!r} in the config but {before!r} in the "
                        f"checkpoints in {where} (use another --workdir, or --from_scratch)")
  if changed:
    logging.warning("Settings changed since the checkpoint: %s", ", ".join(
        f"{k} {before!r} -> {now!r}" for k, (before, now) in changed.items()))


def _added_at_default(saved: Tree, changed: dict[str, tuple[Any, Any]]) -> set[str]:
  """The changed keys that the saved config lacks (keys added to the defaults since it was
  saved) and that hold their default: a checkpoint of before they existed is of the same
  model (a new `model.*` key defaults to what the network was before it)."""
  saved_keys = flatten(_as_saved(saved), whole=()).keys()
  default = flatten(_as_saved(base_config()), whole=())
  return {key for key, (_, now) in changed.items()
          if key not in saved_keys and key in default and now == default[key]}


def check_checkpoint(meta: Mapping[str, Any] | None, cfg: ml_collections.ConfigDict,
                     where: str, components_now: dict | None = None) -> None:
  """Refuses a checkpoint (its `meta` item, None: none) of another model than `cfg`'s and
  logs every other setting that changed (`check_compatible`); given the component records
  of `cfg`, also names every component source file whose content changed."""
  if not meta:
    return
  check_compatible(meta.get("config"), cfg, where)
  if components_now is None:
    return
  for line in components.changed_sources(meta.get("components"), components_now):
    logging.warning("A component's source file has changed since the checkpoints in %s "
                    "were saved (its SHA-256 differs): %s", where, line)
