"""Test-time mirroring in 2D: the eval step and the prediction of a volume average the
probabilities over the flips of each slice, each flipped back; checked against flips
written by hand with index reversal."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import optax
import pytest

from helpers import config
from medseg_jax import kinds
from medseg_jax.data import targets
from medseg_jax.evaluation import mirroring
from medseg_jax.training import step
from medseg_jax.training.state import TrainState

HAND_FLIPS = [lambda x: x, lambda x: x[:, ::-1], lambda x: x[:, :, ::-1],
              lambda x: x[:, ::-1, ::-1]]  # none, rows, columns, both: each its own inverse


def state_of(kernel: int) -> TrainState:
  """A one-convolution network with 3 classes; a 1x1 kernel is flip-equivariant."""
  model = nn.Conv(3, (kernel, kernel))
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                    opt_state=(), apply_fn=lambda v, x, train, rngs: model.apply(v, x),
                    tx=optax.identity())


def hand_mean(state: TrainState, images: np.ndarray) -> np.ndarray:
  """The mean over the four flips of the network's softmax, by index reversal."""
  probs = [f(np.asarray(jax.nn.softmax(state.apply_fn({"params": state.params}, f(images),
                                                      False, None), -1)))
           for f in HAND_FLIPS]
  return sum(probs) / 4


def test_the_flips_of_a_slice_are_its_rows_columns_and_both():
  assert mirroring.flips(True, (1, 2)) == [(), (1,), (2,), (1, 2)]
  assert mirroring.flips(False, (1, 2)) == [()]
  assert len(mirroring.flips(True, (0, 1, 2))) == 8


def batch(seed=1):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(4, 8, 8, 2)).astype(np.float32),
          "label": rng.integers(0, 3, size=(4, 8, 8)).astype(np.int32),
          "mask": np.ones(4, bool)}


@pytest.mark.parametrize("kernel", [1, 3])
def test_the_mirrored_eval_step_labels_the_mean_of_the_flipped_probabilities(kernel):
  state, b = state_of(kernel), batch()
  slices_kind = kinds.from_config(config("--config.evaluation.mirror=True"))
  mirrored = jax.jit(slices_kind.evaluated_by(
      lambda s, x, **kw: step.eval_step(s, x, outputs=targets.Classes(3), reduce_sum=lambda c: c, **kw)))
  confusion, pred = mirrored(state, b)
  expected = np.argmax(hand_mean(state, b["image"]), -1)
  np.testing.assert_array_equal(np.asarray(pred), expected)
  hand_confusion = np.zeros((3, 3), np.int64)
  np.add.at(hand_confusion, (b["label"].ravel(), expected.ravel()), 1)
  np.testing.assert_array_equal(np.asarray(confusion), hand_confusion)
  _, plain = jax.jit(lambda s, x: step.eval_step(s, x, outputs=targets.Classes(3),
                                                 reduce_sum=lambda c: c))(state, b)
  if kernel == 1:  # a flip-equivariant network is unchanged by mirroring
    np.testing.assert_array_equal(np.asarray(pred), np.asarray(plain))
  else:  # else mirroring changes some labels (so the test can tell them apart)
    assert (np.asarray(pred) != np.asarray(plain)).any()


def test_a_volume_is_predicted_from_the_mean_of_the_flipped_slices(tmp_path):
  """Slices.probabilities with mirroring equals the unmirrored prediction of a network
  that averages the hand-flipped outputs itself."""
  state = state_of(3)
  cfg = config("--config.data.image_size=8")
  rng = np.random.default_rng(0)
  path = str(tmp_path / "case.nii.gz")
  nib.save(nib.Nifti1Image(rng.normal(size=(8, 8, 5, 2)).astype(np.float32), np.eye(4)), path)
  info = {"modalities": ["T1", "T2"]}

  def run(slices):
    return np.asarray(jax.nn.softmax(state.apply_fn({"params": state.params}, slices, False,
                                                    None), -1))
  plain = kinds.from_config(cfg).probabilities(info, 4)
  cfg_mirror = config("--config.data.image_size=8", "--config.evaluation.mirror=True")
  mirrored = kinds.from_config(cfg_mirror).probabilities(info, 4)(path, run)
  reference = plain(path, lambda slices: hand_mean(state, slices))
  np.testing.assert_allclose(mirrored, reference, rtol=1e-6, atol=1e-7)
  assert not np.allclose(mirrored, plain(path, run), atol=1e-4)
