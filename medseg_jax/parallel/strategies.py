"""Data-parallel strategies: the only module that touches pmap, shard_map, meshes and collectives.

`config.parallel.strategy` picks how the pure steps (`training/step.py`, handed in by the
caller with their settings bound) run on the mesh:
- `shard_map` (default): each device runs the step on its shard; gradients are
  averaged with an explicit `lax.pmean` all-reduce.
- `pmap`: the same per-shard body under `jax.pmap`, state stacked per device.
- `gspmd`: `jax.jit` over global arrays; XLA partitions the batch and inserts
  the all-reduce itself.

Every strategy offers the same small interface (`Parallel`), so the training loop
never branches on the strategy and never sees pmap's per-device stacking:
`replicated_state` is the single place that undoes it.

Under `jax.shard_map` with `check_vma=True`, gradients of replicated parameters
already come back summed over devices, and a following pmean would leave them
N times too large. The per-shard body therefore runs with `check_vma=False`
and reduces explicitly, exactly as under pmap (tests/test_parallel.py shows the trap).
"""

import dataclasses
import enum
import functools
from typing import Any, Callable

import jax
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medseg_jax import components
from medseg_jax.errors import ConfigError
from medseg_jax.parallel.in_flight import Bound

AXIS = "data"


class Layout(enum.Enum):
  """How an argument or result of a per-shard step lies across the devices."""

  STATE = "state"            # the train state: replicated; pmap keeps a copy per device
  REPLICATED = "replicated"  # equal everywhere: an rng going in, an all-reduced value out
  SPLIT = "split"            # split along the batch


@dataclasses.dataclass(frozen=True)
class Parallel:
  """A strategy on a 1-D mesh of devices along the data axis (the loop's whole interface).

  The protocol every strategy implements, the built-ins and a user's own
  (`parallel.strategy=module:Class` or `file.py:Class`, a subclass of this class):
  - constructed as `Class(mesh)`, `mesh` a 1-D `Mesh` over the devices, axis `AXIS`;
  - `num_devices`, `bn_axis_name` (the axis for synchronised batch statistics, None when
    XLA partitions a global computation), `replicated` (the sharding checkpoints restore to);
  - `put_state(state)` places a host state on the mesh; `replicated_state(state)` gives
    it back as global arrays replicated over the mesh (what a checkpoint saves);
  - `put_batch(local_batch)` builds global arrays from this process's rows, which
    `local_rows(global_batch)` names;
  - `train_step(step_fn)`, `eval_step(step_fn)`, `predict_step(step_fn)` compile the pure
    steps of `training/step.py` for the mesh, supplying `reduce_mean` / `reduce_sum`
    (the all-reduce over the batch's shards) to the train and eval steps.
  Every strategy must give the gradients of one device on the whole batch
  (tests/test_parallel.py checks the built-ins; a user's strategy can be checked alike).
  """

  mesh: Mesh

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @functools.cached_property
  def in_flight(self) -> Bound:
    """The bound on queued steps that the steps with an all-reduce (train, eval) share:
    wrap each compiled one with `in_flight.wrap` (a no-op off the CPU backend)."""
    return Bound(list(self.mesh.devices.flat))

  @property
  def bn_axis_name(self) -> str | None:
    """Axis name for synchronised BatchNorm; None when XLA sees the global batch."""
    return AXIS

  @property
  def replicated(self) -> NamedSharding:
    """The sharding of a state replicated on every device (e.g. to restore a checkpoint)."""
    return NamedSharding(self.mesh, P())

  @property
  def _split(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(AXIS))

  def put_state(self, state: Any) -> Any:
    """Replicates a host (or replicated) state on every device of the mesh."""
    return jax.device_put(state, self.replicated)

  def replicated_state(self, state: Any) -> Any:
    """A placed state as global arrays replicated over the mesh, still on the devices
    (pmap's per-device stack undone): what a checkpoint saves and the step is read from."""
    return state

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Builds global arrays from this process's part of the batch."""
    return {k: self._put_split(v) for k, v in local_batch.items()}

  def local_rows(self, global_batch: int) -> slice:
    """The rows of a global batch that this process feeds: those of its devices' shards,
    which `put_batch` places by the devices' positions in the mesh."""
    per_device = global_batch // self.num_devices
    mine = [i for i, d in enumerate(self.mesh.devices.flat)
            if d.process_index == jax.process_index()]
    return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)

  def _put_split(self, x: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(self._split, np.asarray(x))

  def train_step(self, step_fn: Callable) -> Callable:
    """Compiled `(state, batch, rng) -> (state, metrics)`; the input state is donated.

    `step_fn(state, batch, rng, reduce_mean=...)` is the pure step; the strategy supplies
    the all-reduce that averages over the batch's shards."""
    raise NotImplementedError

  def eval_step(self, step_fn: Callable) -> Callable:
    """Compiled `(state, batch) -> (confusion matrix summed over the mesh, predicted labels)`
    from the pure `step_fn(state, batch, reduce_sum=...)`."""
    raise NotImplementedError

  def predict_step(self, step_fn: Callable) -> Callable:
    """Compiled `(state, images) -> probabilities` from the pure `step_fn(state, images)`,
    split along the batch like the input."""
    raise NotImplementedError


class _PerShard(Parallel):
  """Strategies that run the step on each device's shard and all-reduce explicitly."""

  def train_step(self, step_fn: Callable) -> Callable:
    # Per shard, the shard's index is folded into the rng: every device its own dropout
    # and augmentation streams.
    fn = functools.partial(step_fn, reduce_mean=_pmean)
    return self._map(_with_shard_rng(fn), (Layout.STATE, Layout.SPLIT, Layout.REPLICATED),
                     (Layout.STATE, Layout.REPLICATED), donate=True)

  def eval_step(self, step_fn: Callable) -> Callable:
    fn = functools.partial(step_fn, reduce_sum=_psum)
    return self._map(fn, (Layout.STATE, Layout.SPLIT), (Layout.REPLICATED, Layout.SPLIT))

  def predict_step(self, step_fn: Callable) -> Callable:
    return self._map(step_fn, (Layout.STATE, Layout.SPLIT), Layout.SPLIT)

  def _map(self, fn: Callable, in_layouts: tuple, out_layouts: Any,
           donate: bool = False) -> Callable:
    """`fn` compiled to run per shard; the first argument (the state) is donated if asked."""
    raise NotImplementedError


class ShardMap(_PerShard):
  """`jax.shard_map` over the mesh, explicit all-reduce (check_vma=False: see above)."""

  def _map(self, fn, in_layouts, out_layouts, donate=False):
    spec = lambda layout: P(AXIS) if layout is Layout.SPLIT else P()
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=_each(in_layouts, spec),
                           out_specs=_each(out_layouts, spec), check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,) if donate else ())


class Pmap(_PerShard):
  """`jax.pmap` over the mesh; the state is stacked, one copy per device of this process.

  pmap takes and returns host-local arrays (leading axis: this process's devices); the
  steps' batch-split and replicated results are turned back into global arrays, so that
  callers see what the other strategies give them.
  """

  @property
  def _local(self) -> NamedSharding:
    """This process's devices, in mesh order, split along the leading (device) axis."""
    local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
    return NamedSharding(Mesh(np.array(local), (AXIS,)), P(AXIS))

  def put_state(self, state):
    n = self._local.mesh.size
    return jax.tree.map(lambda x: _from_shards(x, (n,) + x.shape, self._local,
                                               lambda s: s.data[None]),
                        jax.device_put(state, self.replicated))

  def replicated_state(self, state):
    return jax.tree.map(self._unstack_replicated, state)

  def put_batch(self, local_batch):
    n = self._local.mesh.size
    return {k: jax.device_put(v.reshape((n, v.shape[0] // n) + v.shape[1:]), self._local)
            for k, v in local_batch.items()}

  def _unstack_replicated(self, x: jax.Array) -> jax.Array:
    """One copy per device, equal after the all-reduce, as one replicated global array."""
    return _from_shards(x, x.shape[1:], self.replicated, lambda s: s.data[0])

  def _unstack_split(self, x: jax.Array) -> jax.Array:
    """[local devices, batch, ...] as the global [devices * batch, ...] batch."""
    shape = (self.num_devices * x.shape[1],) + x.shape[2:]
    return _from_shards(x, shape, self._split, lambda s: s.data[0])

  def _map(self, fn, in_layouts, out_layouts, donate=False):
    in_axes = _each(in_layouts, lambda layout: None if layout is Layout.REPLICATED else 0)
    # The same devices on every process: pmap's collectives then span all processes.
    pmapped = jax.pmap(fn, axis_name=AXIS, in_axes=in_axes, donate_argnums=(0,) if donate
                       else (), devices=list(self.mesh.devices.flat))
    unstack = {Layout.STATE: lambda x: x, Layout.REPLICATED: self._unstack_replicated,
               Layout.SPLIT: self._unstack_split}
    restore = lambda tree, layout: jax.tree.map(unstack[layout], tree)
    if isinstance(out_layouts, tuple):
      return lambda *args: tuple(map(restore, pmapped(*args), out_layouts))
    return lambda *args: restore(pmapped(*args), out_layouts)


class Gspmd(Parallel):
  """`jax.jit` over global arrays; XLA partitions the batch and inserts the all-reduce."""

  @property
  def bn_axis_name(self):
    return None

  def train_step(self, step_fn):
    # The step sees the global batch, so augment's per-example keys follow the index.
    fn = functools.partial(step_fn, reduce_mean=_identity)
    return jax.jit(fn, in_shardings=(self.replicated, self._split, self.replicated),
                   out_shardings=self.replicated, donate_argnums=0)

  def eval_step(self, step_fn):
    fn = functools.partial(step_fn, reduce_sum=_identity)
    return jax.jit(fn, out_shardings=(self.replicated, self._split))

  def predict_step(self, step_fn):
    return jax.jit(step_fn, out_shardings=self._split)


STRATEGIES = {"shard_map": ShardMap, "pmap": Pmap, "gspmd": Gspmd}


def strategy_component(spec: str) -> components.Component:
  """The strategy class `parallel.strategy` names, checked to implement `Parallel`."""
  component = components.resolve("parallel.strategy", spec, STRATEGIES)
  if not (isinstance(component.obj, type) and issubclass(component.obj, Parallel)):
    raise component.error(f"{component.name} is not a subclass of "
                          "medseg_jax.parallel.strategies.Parallel")
  return component


def make_parallel(strategy: str, num_devices: int = 0) -> Parallel:
  """The strategy on the first `num_devices` devices of all processes (0 = all)."""
  cls = strategy_component(strategy).obj
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ConfigError(f"parallel.num_devices={num_devices}: there are {len(devices)} devices")
  if num_devices and jax.process_count() > 1 and num_devices != len(devices):
    raise ConfigError(f"parallel.num_devices={num_devices}: with several processes, use 0 "
                      f"(all {len(devices)} devices)")
  devices = devices[:num_devices or len(devices)]
  mesh = Mesh(np.array(devices), (AXIS,), axis_types=(AxisType.Auto,))
  return cls(mesh)


def _pmean(tree):
  return lax.pmean(tree, AXIS)


def _psum(tree):
  return lax.psum(tree, AXIS)


def _identity(tree):
  return tree


def _each(layouts: Any, fn: Callable) -> Any:
  """`fn` of one layout, or of each in a tuple of them."""
  return tuple(fn(l) for l in layouts) if isinstance(layouts, tuple) else fn(layouts)


def _with_shard_rng(fn: Callable) -> Callable:
  def wrapped(state, batch, rng):
    return fn(state, batch, jax.random.fold_in(rng, lax.axis_index(AXIS)))
  return wrapped


def _from_shards(x: jax.Array, shape: tuple, sharding: NamedSharding,
                 piece: Callable) -> jax.Array:
  """A global array of `shape` laid out by `sharding`, built on each of this process's
  devices from `piece` of `x`'s shard there: no copies between devices."""
  return jax.make_array_from_single_device_arrays(
      shape, sharding, [piece(s) for s in x.addressable_shards])
