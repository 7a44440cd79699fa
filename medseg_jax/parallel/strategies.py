"""Data parallelism: the only module that touches pmap, shard_map, meshes and collectives.

`config.parallel.strategy` picks how the pure steps of `step.py` run on the mesh:
- `shard_map` (default): each device runs the step on its shard; gradients are
  averaged with an explicit `lax.pmean` all-reduce.
- `pmap`: the same per-shard body under `jax.pmap`, state stacked per device.
- `gspmd`: `jax.jit` over global arrays; XLA partitions the batch and inserts
  the all-reduce itself.

Under `jax.shard_map` with `check_vma=True`, gradients of replicated parameters
already come back summed over devices, and a following pmean would leave them
N times too large. The per-shard body therefore runs with `check_vma=False`
and reduces explicitly, exactly as under pmap.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medseg_jax import step as step_lib
from medseg_jax.errors import ConfigError

AXIS = "data"
STRATEGIES = ("shard_map", "pmap", "gspmd")


def _pmean(tree):
  return lax.pmean(tree, AXIS)


def _psum(tree):
  return lax.psum(tree, AXIS)


def _identity(tree):
  return tree


@dataclasses.dataclass(frozen=True)
class Parallel:
  """A strategy on a 1-D mesh of devices along the data axis."""

  strategy: str
  mesh: Mesh
  check_vma: bool = False  # True only to demonstrate the N-times trap in tests

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def num_local_devices(self) -> int:
    return sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)

  @property
  def bn_axis_name(self) -> str | None:
    """Axis name for synchronised BatchNorm; None when XLA sees the global batch."""
    return None if self.strategy == "gspmd" else AXIS

  @property
  def replicated(self) -> NamedSharding:
    return self._sharding(P())

  def _sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  # -- placing data ----------------------------------------------------------
  def put_state(self, state: Any) -> Any:
    """Replicates a host state on every device of the mesh."""
    if self.strategy == "pmap":
      state = jax.tree.map(lambda x: np.broadcast_to(x, (self.num_local_devices,) + x.shape),
                           jax.device_get(state))
      return jax.tree.map(self._put_local, state)
    return jax.device_put(state, self.replicated)

  def get_state(self, state: Any) -> Any:
    """The state as one replicated copy (undoes pmap's per-device stacking)."""
    return _first(state) if self.strategy == "pmap" else state

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Builds global arrays from this process's part of the batch."""
    if self.strategy == "pmap":
      n = self.num_local_devices
      local_batch = {k: v.reshape((n, v.shape[0] // n) + v.shape[1:])
                     for k, v in local_batch.items()}
    return {k: self._put_local(v) for k, v in local_batch.items()}

  def local_rows(self, global_batch: int) -> slice:
    """The rows of a global batch that this process feeds: those of its devices' shards,
    which `put_batch` places by the devices' positions in the mesh."""
    per_device = global_batch // self.num_devices
    mine = [i for i, d in enumerate(self.mesh.devices.flat)
            if d.process_index == jax.process_index()]
    return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)

  def _put_local(self, x: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(self._sharding(P(AXIS)), np.asarray(x))

  # -- compiling steps -------------------------------------------------------
  # Per-shard specs: the state (first argument) is replicated, batches are split
  # along the data axis, the rng is replicated. Under pmap the state is stacked.

  def train_step(self, loss_fn: Callable, augment: Callable | None = None) -> Callable:
    """Compiled `(state, batch, rng) -> (state, metrics)`; the input state is donated.

    Under gspmd the step sees the global batch, so `augment`'s per-example keys follow
    the example's index; per shard, the shard's index is folded into the rng first."""
    if self.strategy == "gspmd":
      fn = functools.partial(step_lib.train_step, loss_fn=loss_fn, reduce_mean=_identity,
                             augment=augment)
      return jax.jit(fn, in_shardings=(self.replicated, self._sharding(P(AXIS)),
                                       self.replicated),
                     out_shardings=self.replicated, donate_argnums=0)
    fn = functools.partial(step_lib.train_step, loss_fn=loss_fn, reduce_mean=_pmean,
                           augment=augment)
    return self._per_shard(_with_shard_rng(fn), (P(), P(AXIS), P()), (P(), P()),
                           unstack=lambda out: (out[0], _first(out[1])), donate=True)

  def augment_step(self, augment: Callable) -> Callable:
    """Compiled `(batch, rng) -> (images, labels)`: `augment` alone, keyed as in the train
    step (per shard, the shard's index folded in), for tests and benchmarks."""
    fn = lambda batch, rng: augment(rng, batch["image"], batch["label"])
    if self.strategy == "gspmd":
      return jax.jit(fn, out_shardings=self._sharding(P(AXIS)))
    per_shard = lambda batch, rng: fn(batch, _shard_key(rng))
    if self.strategy == "pmap":
      local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
      pmapped = jax.pmap(per_shard, axis_name=AXIS, in_axes=(0, None), devices=local)
      return lambda batch, rng: tuple(_merge(x) for x in pmapped(batch, rng))
    return jax.jit(jax.shard_map(per_shard, mesh=self.mesh, in_specs=(P(AXIS), P()),
                                 out_specs=(P(AXIS), P(AXIS)), check_vma=False))

  def eval_step(self, num_classes: int) -> Callable:
    """Compiled `(state, batch) -> (confusion matrix summed over the mesh, predicted labels)`."""
    if self.strategy == "gspmd":
      fn = functools.partial(step_lib.eval_step, num_classes=num_classes, reduce_sum=_identity)
      return jax.jit(fn, out_shardings=(self.replicated, self._sharding(P(AXIS))))
    fn = functools.partial(step_lib.eval_step, num_classes=num_classes, reduce_sum=_psum)
    return self._per_shard(fn, (P(), P(AXIS)), (P(), P(AXIS)),
                           unstack=lambda out: (_first(out[0]), _merge(out[1])))

  def predict_step(self) -> Callable:
    """Compiled `(state, images) -> probabilities`, split along the batch like the input."""
    if self.strategy == "gspmd":
      return jax.jit(step_lib.predict_step, out_shardings=self._sharding(P(AXIS)))
    return self._per_shard(step_lib.predict_step, (P(), P(AXIS)), P(AXIS), unstack=_merge)

  def _per_shard(self, fn: Callable, in_specs: tuple, out_specs: Any,
                 unstack: Callable, donate: bool = False) -> Callable:
    donate_argnums = (0,) if donate else ()
    if self.strategy == "pmap":
      in_axes = (0,) + tuple(None if spec == P() else 0 for spec in in_specs[1:])
      local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
      pmapped = jax.pmap(fn, axis_name=AXIS, in_axes=in_axes, donate_argnums=donate_argnums,
                         devices=local)
      return lambda *args: unstack(pmapped(*args))
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=self.check_vma)
    return jax.jit(mapped, donate_argnums=donate_argnums)


def _with_shard_rng(fn: Callable) -> Callable:
  """Gives every shard its own dropout and augmentation streams."""
  def wrapped(state, batch, rng):
    return fn(state, batch, _shard_key(rng))
  return wrapped


def _shard_key(rng: jax.Array) -> jax.Array:
  return jax.random.fold_in(rng, lax.axis_index(AXIS))


def _first(tree: Any) -> Any:
  """pmap stacks replicated outputs per device; after the all-reduce the copies are equal."""
  return jax.tree.map(lambda x: x[0], tree)


def _merge(x: jax.Array) -> jax.Array:
  """pmap's [devices, batch, ...] outputs as one [devices * batch, ...] batch."""
  return x.reshape((-1,) + x.shape[2:])


def make_parallel(strategy: str, num_devices: int = 0, check_vma: bool = False) -> Parallel:
  """The strategy on the first `num_devices` devices of all processes (0 = all)."""
  if strategy not in STRATEGIES:
    raise ConfigError(f"parallel.strategy={strategy!r}: choose from {list(STRATEGIES)}")
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ConfigError(f"parallel.num_devices={num_devices}: there are {len(devices)} devices")
  if num_devices and jax.process_count() > 1 and num_devices != len(devices):
    raise ConfigError(f"parallel.num_devices={num_devices}: with several processes, use 0 "
                      f"(all {len(devices)} devices)")
  devices = devices[:num_devices or len(devices)]
  mesh = Mesh(np.array(devices), (AXIS,), axis_types=(AxisType.Auto,))
  return Parallel(strategy=strategy, mesh=mesh, check_vma=check_vma)


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
