"""Checkpointer: restore with its fallback, config checks and optimizer counters."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from medseg_jax import optim
from medseg_jax.training import checkpoint
from medseg_jax.errors import ConfigError, MedsegError
from medseg_jax.training.state import TrainState


def _state(value: float) -> TrainState:
  params = {"w": jnp.full((64, 64), value, jnp.float32)}
  return TrainState.create(apply_fn=None, params=params, model_state={},
                           tx=optax.adam(1e-3)).replace(step=jnp.asarray(int(value), jnp.int32))


def _saved(tmp_path, steps=(1, 2, 3)):
  ckpt = checkpoint.Checkpointer(str(tmp_path), 5)
  for step in steps:
    ckpt.save(step, _state(step), {"step": step})
  ckpt.wait()
  return ckpt


def _corrupt(tmp_path, step):
  for path in glob.glob(str(tmp_path / "checkpoints" / str(step) / "state" / "**" / "d" / "*"),
                        recursive=True):
    with open(path, "r+b") as f:
      f.truncate(1)


def test_restore_reads_arrays_and_meta(tmp_path):
  ckpt = _saved(tmp_path)
  restored = ckpt.restore(_state(0), None)
  assert restored.step == 3 and restored.meta == {"step": 3}
  np.testing.assert_array_equal(restored.state.params["w"], np.full((64, 64), 3.0))
  assert ckpt.restore(_state(0), None, step=1).meta == {"step": 1}
  ckpt.close()


def test_the_best_follows_the_dice_while_its_saves_are_in_flight(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), 5)
  dices = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.8}  # saved back to back, without waiting
  assert [ckpt.save_if_best(s, _state(s), {"step": s}, d) for s, d in dices.items()] == [
      True, True, False, True]
  ckpt.close()
  reopened = checkpoint.Checkpointer(str(tmp_path), 5)  # the best Dice read back: 0.8
  assert reopened.best_step() == 4
  assert not reopened.save_if_best(5, _state(5), {"step": 5}, 0.75)
  restored = reopened.restore(_state(0), None, best=True)
  np.testing.assert_array_equal(restored.state.params["w"], np.full((64, 64), 4.0))
  assert reopened.save_if_best(6, _state(6), {"step": 6}, 0.9)
  reopened.close()
  assert os.listdir(tmp_path / "checkpoints_best") == ["6"]


def test_an_unreadable_newest_checkpoint_is_skipped_and_removed(tmp_path, caplog):
  ckpt = _saved(tmp_path)
  _corrupt(tmp_path, 3)
  restored = ckpt.restore(_state(0), None)
  assert restored.step == 2
  np.testing.assert_array_equal(restored.state.params["w"], np.full((64, 64), 2.0))
  assert not os.path.exists(tmp_path / "checkpoints" / "3")
  assert "Skipping unreadable checkpoint" in caplog.text
  ckpt.close()


def test_an_explicit_unreadable_step_is_an_error_naming_it(tmp_path):
  ckpt = _saved(tmp_path)
  _corrupt(tmp_path, 2)
  with pytest.raises(MedsegError, match=r"checkpoints/2: unreadable checkpoint"):
    ckpt.restore(_state(0), None, step=2)
  with pytest.raises(MedsegError, match=r"no checkpoint at step 7 \(have \[1, 2, 3\]\)"):
    ckpt.restore(_state(0), None, step=7)
  ckpt.close()


def test_check_config_refuses_another_model_and_accepts_other_changes(caplog):
  saved = base.get_config()
  meta = {"config": saved.to_dict()}
  changed = base.get_config()
  changed.optim.lr = 0.5
  checkpoint.check_config(meta, changed, "DIR")
  assert "optim.lr 1e-05 -> 0.5" in caplog.text
  changed.model.base_features = 32
  with pytest.raises(ConfigError, match=r"^model.base_features: 32 in the config but 64 in the "
                                        r"checkpoints in DIR"):
    checkpoint.check_config(meta, changed, "DIR")


def test_with_step_sets_every_optimizer_counter():
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.linear_schedule(1.0, 0.0, 9)))
  opt_state = tx.init({"w": jnp.ones(3)})
  counts = lambda s: [int(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(s)[0]
                      if getattr(path[-1], "name", None) == "count"]
  assert counts(opt_state) == [0, 0]
  moved = optim.with_step(opt_state, 7)
  assert counts(moved) == [7, 7]
  mu = lambda s: [leaf for leaf in jax.tree.leaves(s) if leaf.shape == (3,)]
  assert all(np.array_equal(a, b) for a, b in zip(mu(moved), mu(opt_state)))


def test_has_checkpoint_only_with_a_step_directory(tmp_path):
  """What main asks before it looks for model.init_from: is there a run to resume?"""
  assert not checkpoint.has_checkpoint(str(tmp_path))
  os.makedirs(tmp_path / "checkpoints" / "tmp-write")
  assert not checkpoint.has_checkpoint(str(tmp_path))
  os.makedirs(tmp_path / "checkpoints" / "5")
  assert checkpoint.has_checkpoint(str(tmp_path))
