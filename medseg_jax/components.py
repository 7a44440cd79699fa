"""One resolver for the components a config names: networks, losses, plugins, strategies.

Every kind names a component the same way:
- a built-in name of the kind's registry: `unet`, `dice_ce`, `gspmd`;
- an import path `package.module:Name`, the module importable from `sys.path`;
- a Python file and a name `path/to/file.py:Name`. A relative path is taken relative to the
  config file's directory, then to the working directory: `absolute_specs` (called by
  `main` before anything reads the config) writes the path it found into the config, so
  the resolved config, the manifest and a restart all name the same file.

Importing a user's module runs its code, as running a config file does: the config and
the components it names are the user's own program. A resolved component records its spec,
its source file and the SHA-256 of that file (the manifest and every checkpoint keep it;
a restart, `--mode=evaluate` and `--mode=predict` warn when the file has changed).
"""

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any, Mapping

from medseg_jax.errors import ConfigError, first_line

# The config keys that name components, and the one that lists them (plugins).
KEYS = ("model.name", "train.loss", "parallel.strategy")
LIST_KEYS = ("train.plugins",)


@dataclasses.dataclass(frozen=True)
class Component:
  """A resolved component: what the config said, the object, and where it came from."""

  key: str                 # the config key naming it, e.g. "model.name"
  spec: str                # as the config gives it
  obj: Any                 # the class or function
  source: str | None       # its source file; None for a built-in
  sha256: str | None       # of the source file; None for a built-in

  @property
  def name(self) -> str:
    """The name the component goes by: the built-in name or the part after ':'."""
    return self.spec.rpartition(":")[2]

  @property
  def builtin(self) -> bool:
    return self.source is None

  def record(self) -> dict:
    """What the manifest and the checkpoint meta keep of it."""
    return {"spec": self.spec, "source": self.source, "sha256": self.sha256}

  def error(self, what: str) -> ConfigError:
    """A ConfigError naming the config key, the spec and the source file."""
    where = f" ({self.source})" if self.source else ""
    return ConfigError(f"{self.key}={self.spec!r}{where}: {what}")


def resolve(key: str, spec: str, builtins: Mapping[str, Any]) -> Component:
  """The component `spec` names: a key of `builtins`, `module:Name` or `file.py:Name`."""
  if not isinstance(spec, str) or not spec:
    raise ConfigError(f"{key}={spec!r}: name a component: one of {sorted(builtins)}, "
                      "module:Name or file.py:Name")
  if ":" not in spec:
    if spec not in builtins:
      raise ConfigError(f"{key}={spec!r}: unknown; choose from {sorted(builtins)}, or name "
                        "your own as module:Name or file.py:Name")
    return Component(key, spec, builtins[spec], None, None)
  where, _, name = spec.rpartition(":")
  if not where or not name.isidentifier():
    raise ConfigError(f"{key}={spec!r}: expected module:Name or file.py:Name")
  module = _load_file(key, spec, where) if where.endswith(".py") else _import(key, spec, where)
  source = os.path.abspath(module.__file__) if getattr(module, "__file__", None) else None
  if not hasattr(module, name):
    raise ConfigError(f"{key}={spec!r}: {source or where} has no {name!r}")
  return Component(key, spec, getattr(module, name), source,
                   file_sha256(source) if source else None)


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _import(key: str, spec: str, module_name: str):
  try:
    return importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except  (the user's code may raise anything)
    raise ConfigError(f"{key}={spec!r}: cannot import {module_name}: "
                      f"{type(e).__name__}: {first_line(e)}") from e


def _load_file(key: str, spec: str, path: str):
  """The module of the Python file at `path`, loaded once per path and content."""
  if not os.path.isfile(path):
    raise ConfigError(f"{key}={spec!r}: {path}: no such file (a relative path is taken "
                      "from the config file's directory, then the working directory)")
  path = os.path.abspath(path)
  # A name of its own per path and content: two files of the same name, or a file edited
  # between two loads, are distinct modules.
  digest = hashlib.sha256(path.encode() + b"\0" + open(path, "rb").read()).hexdigest()[:16]
  name = f"medseg_component_{digest}"
  if name in sys.modules:
    return sys.modules[name]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module  # dataclasses and pickling look a class's module up here
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  (the user's code may raise anything)
    del sys.modules[name]
    raise ConfigError(f"{key}={spec!r}: importing {path} failed: "
                      f"{type(e).__name__}: {first_line(e)}") from e
  return module


def _absolute(spec: Any, config_dir: str) -> Any:
  """`spec` with a relative file path made absolute where the file is found."""
  if not isinstance(spec, str) or ":" not in spec:
    return spec
  where, _, name = spec.rpartition(":")
  if not where.endswith(".py") or os.path.isabs(where):
    return spec
  for base in (config_dir, os.getcwd()):
    candidate = os.path.join(base, where)
    if os.path.isfile(candidate):
      return f"{os.path.abspath(candidate)}:{name}"
  return spec  # resolving it reports the missing file


def absolute_specs(cfg, config_dir: str) -> None:
  """Makes the relative file paths of every component key of `cfg` absolute (in place),
  looking in `config_dir` first, then in the working directory."""
  for key in KEYS + LIST_KEYS:
    section, _, leaf = key.rpartition(".")
    node = cfg[section]
    if key in LIST_KEYS:
      node[leaf] = tuple(_absolute(s, config_dir) for s in node[leaf])
    else:
      node[leaf] = _absolute(node[leaf], config_dir)


def changed_sources(saved: Mapping[str, dict] | None, now: Mapping[str, dict]) -> list[str]:
  """The source files whose SHA-256 differs between two component records (saved with a
  checkpoint, and now), as 'key: file' lines."""
  changed = []
  for key, record in (saved or {}).items():
    current = now.get(key)
    if record.get("sha256") and current and record.get("source") == current.get("source") \
        and record["sha256"] != current.get("sha256"):
      changed.append(f"{key}: {record['source']}")
  return changed
