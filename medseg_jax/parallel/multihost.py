"""Host-side helpers for several processes: barriers, agreement, gathering to numpy."""

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier called `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (a collective: all processes call it)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array, whole, on every process."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree: Any) -> Any:
  """Copies replicated arrays (including ones spread over several hosts) to numpy."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)


def all_processes(values: np.ndarray) -> np.ndarray:
  """`values` of every process stacked along a new first axis (process order); each
  process passes the same shape and dtype. A collective: every process calls it at the
  same point of its program, which orders it among the others."""
  if jax.process_count() == 1:
    return np.asarray(values)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(values)))
