"""Pure train and eval steps.

Both run on one shard of the global batch. How shards are combined is injected:
`reduce_mean` / `reduce_sum` are the all-reduce (or the identity when XLA
partitions a global computation) chosen in `parallel/strategies.py`. Hyperparameters and
the loss are bound with functools.partial at build time.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from medseg_jax.data import targets
from medseg_jax.evaluation import mirroring
from medseg_jax.training.state import TrainState

Reduce = Callable[[jax.Array], jax.Array]


def _apply(state: TrainState, params, images, train: bool, rng=None):
  """Runs the model; returns (logits, new model state)."""
  variables = {"params": params, **state.model_state}
  rngs = {"dropout": rng} if rng is not None else None
  if train and state.model_state:
    return state.apply_fn(variables, images, train=True, rngs=rngs,
                          mutable=list(state.model_state.keys()))
  return state.apply_fn(variables, images, train=train, rngs=rngs), state.model_state


def train_step(state: TrainState, batch: dict, rng: jax.Array, *,
               loss_fn: Callable, reduce_mean: Reduce,
               augment: Callable | None = None) -> tuple[TrainState, dict]:
  """One synchronous SGD step: local gradients, all-reduced mean, optimizer update.

  `augment(key, images, labels)`, if given, transforms the batch first (data/augment.py)."""
  rng = jax.random.fold_in(rng, state.step)
  images, labels = batch["image"], batch["label"].astype(jnp.int32)  # stored as uint8
  if augment is not None:
    rng, augment_rng = jax.random.split(rng)
    images, labels = augment(augment_rng, images, labels)

  def objective(params):
    logits, model_state = _apply(state, params, images, True, rng)
    return jnp.mean(loss_fn(logits, labels)), model_state

  (loss, model_state), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  grads = reduce_mean(grads)
  loss = reduce_mean(loss)
  new_state = state.apply_gradients(grads, model_state)
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_step(state: TrainState, batch: dict, *, outputs: targets.Classes | targets.Regions,
              reduce_sum: Reduce, flips: tuple[tuple[int, ...], ...] = ((),)
              ) -> tuple[jax.Array, jax.Array]:
  """(Confusion matrix [true, predicted] of the valid pixels' labels summed over shards,
  labels). With several `flips` (test-time mirroring), the labels of the probabilities
  averaged over the flipped images (`evaluation.mirroring`)."""
  if len(flips) == 1 and not flips[0]:
    logits, _ = _apply(state, state.params, batch["image"], False)
    pred = outputs.labels_of_logits(logits)
  else:
    probs = mirroring.mean_over_flips(lambda images: predict_step(state, images, outputs),
                                      batch["image"], flips, jnp.flip)
    pred = outputs.labels(probs, jnp)
  n = outputs.num_labels
  index = batch["label"].astype(jnp.int32) * n + pred
  weight = jnp.broadcast_to(batch["mask"][:, None, None], index.shape).astype(jnp.int32)
  counts = jnp.bincount(index.ravel(), weights=weight.ravel(), length=n**2)
  confusion = reduce_sum(counts.reshape(n, n).astype(jnp.int32))
  return confusion, pred.astype(jnp.uint8)


def predict_step(state: TrainState, images: jax.Array,
                 outputs: targets.Classes | targets.Regions) -> jax.Array:
  """Per-pixel probabilities [B,H,W,K] of the classes (softmax) or regions (sigmoid)."""
  logits, _ = _apply(state, state.params, images, False)
  return outputs.probabilities(logits)
