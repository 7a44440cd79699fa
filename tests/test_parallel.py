"""Every strategy on 8 devices equals one device on the same global batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import helpers
from medseg_jax.training import losses, step
from medseg_jax.models import UNet
from medseg_jax.parallel import strategies
from medseg_jax.training.state import TrainState

GLOBAL_BATCH = 16
SIZE = 32


def _batch(seed=0, num_classes=3):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(GLOBAL_BATCH, SIZE, SIZE, 1)).astype(np.float32)
  label = rng.integers(0, num_classes, size=(GLOBAL_BATCH, SIZE, SIZE)).astype(np.int32)
  return {"image": image, "label": label}


def _state(norm="none", axis_name=None, lr=0.5, depth=1):
  model = UNet(num_classes=3, depth=depth, base_features=4, norm=norm, axis_name=axis_name)
  variables = helpers.init_variables(model, jnp.zeros((1, SIZE, SIZE, 1)), 1)
  params = variables.pop("params")
  # Plain SGD: an optimizer that normalises the update (Adam) would hide an N-times gradient.
  return TrainState.create(apply_fn=model.apply, params=params, model_state=dict(variables),
                           tx=optax.sgd(lr))


def _reference_step(state, batch):
  """One device, whole global batch, no collectives."""
  fn = functools.partial(step.train_step, loss_fn=losses.dice_ce_loss,
                         reduce_mean=lambda x: x)
  return jax.jit(fn)(state, batch, jax.random.key(0))


def _parallel_step(strategy, state, batch):
  par = strategies.make_parallel(strategy, 8)
  new_state, metrics = par.train_step(functools.partial(step.train_step, loss_fn=losses.dice_ce_loss))(
      par.put_state(state), par.put_batch(batch), jax.random.key(0))
  return jax.device_get(par.replicated_state(new_state)), jax.device_get(metrics)


def _max_rel_diff(a, b):
  """Largest difference relative to the largest reference value over the whole tree.

  Per-leaf ratios would be noise for leaves whose true gradient is zero
  (a conv bias right before BatchNorm).
  """
  diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  scale = max(float(np.max(np.abs(y))) for y in jax.tree.leaves(b))
  return diff / scale


@pytest.mark.parametrize("strategy", strategies.STRATEGIES)
def test_eight_devices_equal_one(devices8, strategy):
  batch = _batch()
  ref_state, ref_metrics = _reference_step(_state(), batch)
  new_state, metrics = _parallel_step(strategy, _state(), batch)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
  delta_ref = jax.tree.map(lambda a, b: a - b, ref_state.params, _state().params)
  delta = jax.tree.map(lambda a, b: a - b, new_state.params, _state().params)
  assert _max_rel_diff(delta, delta_ref) < 1e-3
  assert int(new_state.step) == 1


@pytest.mark.parametrize("strategy", strategies.STRATEGIES)
def test_steps_continue_from_a_saved_state(devices8, strategy):
  """Two steps, the state taken off the devices and placed again between them (as a
  checkpoint restore does), equal two steps on one device."""
  batches = [_batch(seed=1), _batch(seed=2)]
  ref_state = _state()
  for batch in batches:
    ref_state, ref_metrics = _reference_step(ref_state, batch)
  par = strategies.make_parallel(strategy, 8)
  step_fn = par.train_step(functools.partial(step.train_step, loss_fn=losses.dice_ce_loss))
  state, _ = step_fn(par.put_state(_state()), par.put_batch(batches[0]), jax.random.key(0))
  saved = jax.device_get(par.replicated_state(state))
  assert jax.tree.map(np.shape, saved.params) == jax.tree.map(np.shape, _state().params)
  state, metrics = step_fn(par.put_state(saved), par.put_batch(batches[1]), jax.random.key(0))
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  new_state = jax.device_get(par.replicated_state(state))
  assert int(new_state.step) == 2
  assert _max_rel_diff(new_state.params, ref_state.params) < 1e-4


def test_check_vma_trap_is_caught(devices8):
  """Under jax.shard_map with check_vma=True, the replicated-parameter gradients come back
  summed before the step's pmean: 8x too large. The strategies avoid it (check_vma=False)."""
  batch = _batch()
  _, ref_metrics = _reference_step(_state(), batch)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  fn = functools.partial(step.train_step, loss_fn=losses.dice_ce_loss,
                         reduce_mean=lambda x: jax.lax.pmean(x, "data"))
  trap = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("data"), P()),
                               out_specs=(P(), P()), check_vma=True))
  placed = jax.device_put(batch, NamedSharding(mesh, P("data")))
  _, metrics = trap(_state(), placed, jax.random.key(0))
  np.testing.assert_allclose(metrics["grad_norm"], 8 * ref_metrics["grad_norm"], rtol=1e-4)
  _, metrics = _parallel_step("shard_map", _state(), batch)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)


@pytest.mark.parametrize("strategy", ["shard_map", "pmap"])
def test_batchnorm_statistics_are_synchronised(devices8, strategy):
  """Sync BatchNorm over 8 shards equals BatchNorm over the global batch on one device."""
  batch = _batch(seed=3)
  ref_state, ref_metrics = _reference_step(_state(norm="batch"), batch)
  new_state, metrics = _parallel_step(strategy, _state(norm="batch", axis_name="data"), batch)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  delta_ref = jax.tree.map(lambda a, b: a - b, ref_state.params, _state("batch").params)
  delta = jax.tree.map(lambda a, b: a - b, new_state.params, _state("batch").params)
  assert _max_rel_diff(delta, delta_ref) < 1e-3
  assert _max_rel_diff(new_state.model_state, ref_state.model_state) < 1e-4
