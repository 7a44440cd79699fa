"""The training state: arrays only, with the model and optimizer as static fields."""

from typing import Any, Callable

import flax.struct
import jax
import optax


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  model_state: Any       # e.g. {"batch_stats": ...}; {} when the model has none
  opt_state: optax.OptState
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, apply_fn, params, model_state, tx) -> "TrainState":
    return cls(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
               model_state=model_state, opt_state=tx.init(params),
               apply_fn=apply_fn, tx=tx)

  def apply_gradients(self, grads, model_state) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        model_state=model_state, opt_state=opt_state)


def init_state(model, tx: optax.GradientTransformation, rng: jax.Array,
               sample_shape: tuple) -> TrainState:
  """A fresh host-side state: `model` initialised on one example of `sample_shape`."""
  # Initialisation runs once on one device, where the partitionable threefry only adds
  # compile time (seconds per model on a CPU); the classic one is as deterministic.
  with jax.threefry_partitionable(False):
    variables = jax.jit(model.init, static_argnames="train")(
        rng, jax.numpy.zeros((1,) + tuple(sample_shape), jax.numpy.float32), train=False)
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState.create(apply_fn=model.apply, params=params, model_state=variables, tx=tx)
