"""Plugins: the training loop's extensible actions, named in `train.plugins`.

A plugin is a class, named like every component (`module:Class` or `file.py:Class`). The
loop builds each once, as `Class(context, **train.plugin_kwargs[Class])`, and calls,
whichever of these methods it defines (`Plugin` below lists them), at fixed points:

  on_log(step, metrics)          after each logged step: that step's metrics.jsonl record
  on_validation(step, metrics)   after each validation: the validation metrics
                                 (`dice`, `per_class`, `per_volume`, ...)
  on_checkpoint(step, path)      after each checkpoint is started: its directory
  on_end(step, test_metrics)     when training ends: the test metrics (None when a stop
                                 signal ended it)

A method may return a string: a request to stop training after this step, with that
reason, recorded and logged like early stopping (the run then tests its best checkpoint).
A plugin observes: it sees metrics and paths on the host, never the train state, so a
resumed run stays bit for bit the run that never stopped. It may write files (into
`context.workdir`) and TensorBoard scalars (`context.scalar`).

On several processes a plugin runs on process 0, or on every process when its class sets
`all_processes = True`; a stop request is shared with every process as a stop signal is,
so all stop after the same step. A plugin that raises ends the run with one error line
naming it.
"""

import dataclasses
from typing import Any, Callable

import jax
import ml_collections

from medseg_jax import components
from medseg_jax.errors import ConfigError, MedsegError, first_line

HOOKS = ("on_log", "on_validation", "on_checkpoint", "on_end")


class Plugin:
  """A base class for plugins (optional: any class with some of these methods will do)."""

  all_processes = False  # True: every process calls it; False: process 0 only

  def __init__(self, context: "Context", **kwargs):
    del kwargs
    self.context = context

  def on_log(self, step: int, metrics: dict) -> str | None:
    del step, metrics

  def on_validation(self, step: int, metrics: dict) -> str | None:
    del step, metrics

  def on_checkpoint(self, step: int, path: str) -> str | None:
    del step, path

  def on_end(self, step: int, test_metrics: dict | None) -> str | None:
    del step, test_metrics


@dataclasses.dataclass(frozen=True)
class Context:
  """What a plugin is given when it is built."""

  workdir: str
  config: dict                              # the resolved config
  process_index: int
  scalar: Callable[[str, float, int], None]  # (tag, value, step): a TensorBoard scalar


def plugin_components(cfg: ml_collections.ConfigDict) -> list[components.Component]:
  """The plugin classes `train.plugins` names, checked, with their `train.plugin_kwargs`."""
  found = []
  for spec in cfg.train.plugins:
    component = components.resolve("train.plugins", spec, {})
    if not isinstance(component.obj, type) or not any(
        callable(getattr(component.obj, hook, None)) for hook in HOOKS):
      raise component.error(f"{component.name} is not a class with any of {list(HOOKS)}")
    found.append(component)
  names = {c.name for c in found}
  for name in cfg.train.plugin_kwargs:
    if name not in names:
      raise ConfigError(f"train.plugin_kwargs.{name}: no plugin of that name in train.plugins "
                        f"({sorted(names)})")
  return found


class Plugins:
  """The run's plugins on this process; `call` runs one hook of each."""

  def __init__(self, found: list[components.Component], cfg: ml_collections.ConfigDict,
               workdir: str, scalar: Callable[[str, float, int], None]):
    """`found` are the plugins `train.plugins` of `cfg` names, resolved
    (`plugin_components`)."""
    context = Context(workdir, cfg.to_dict(), jax.process_index(), scalar)
    self._plugins: list[tuple[components.Component, Any]] = []
    for component in found:
      if jax.process_index() != 0 and not getattr(component.obj, "all_processes", False):
        continue
      kwargs = cfg.train.plugin_kwargs.get(component.name, ml_collections.ConfigDict())
      try:
        plugin = component.obj(context, **kwargs.to_dict())
      except Exception as e:  # pylint: disable=broad-except  (the user's code may raise anything)
        raise _failed(component, "__init__", e) from e
      self._plugins.append((component, plugin))

  def call(self, hook: str, *args) -> str | None:
    """Runs `hook` of every plugin that has it; the stop reasons they return, joined."""
    reasons = []
    for component, plugin in self._plugins:
      method = getattr(plugin, hook, None)
      if method is None:
        continue
      try:
        reason = method(*args)
      except Exception as e:  # pylint: disable=broad-except  (the user's code may raise anything)
        raise _failed(component, hook, e) from e
      if reason:
        reasons.append(f"{component.name}: {reason}")
    return "; ".join(reasons) or None


def _failed(component: components.Component, hook: str, error: Exception) -> MedsegError:
  where = f" ({component.source})" if component.source else ""
  return MedsegError(f"train.plugins: {component.spec}{where}: {hook} raised "
                     f"{type(error).__name__}: {first_line(error)}")
