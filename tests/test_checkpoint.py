"""Checkpointer: one directory keeping the newest and the best, restore with its fallback,
config checks and optimizer counters."""

import glob
import json
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import REPO, TINY
from medseg_jax import config_schema, defaults, optim
from medseg_jax.training import checkpoint, warm_start
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


def _on_disk(tmp_path) -> list[int]:
  return sorted(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit())


def _dice_on_disk(tmp_path) -> dict[int, float]:
  """{step: Dice} read from the `metrics` files alone (orbax's JSON item), not via orbax."""
  found = {}
  for step in _on_disk(tmp_path):
    path = tmp_path / "checkpoints" / str(step) / "metrics" / "metrics"
    if path.exists():
      found[step] = json.loads(path.read_text())["dice"]
  return found


def test_a_step_is_read_alone_as_numpy_arrays_without_orbax_warnings(tmp_path, caplog):
  """read_state_tree (export, model.init_from) reads a step directory as orbax wrote it:
  the arrays the manager restores, and no warning about the step's metadata."""
  ckpt = _saved(tmp_path, steps=(2,))
  restored = ckpt.restore(_state(0), None, 2).state
  ckpt.close()
  step_dir = os.path.join(checkpoint.directory(str(tmp_path)), "2")
  with caplog.at_level("WARNING"):
    tree = checkpoint.read_state_tree(step_dir)
    shapes = checkpoint.read_state_tree(step_dir, arrays=False)
  assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
  assert isinstance(tree["params"]["w"], np.ndarray)
  np.testing.assert_array_equal(tree["params"]["w"], np.asarray(restored.params["w"]))
  assert int(tree["step"]) == 2 and tuple(shapes["params"]["w"].shape) == (64, 64)


def test_restore_reads_arrays_and_meta(tmp_path):
  ckpt = _saved(tmp_path)
  restored = ckpt.restore(_state(0), None)
  assert restored.step == 3 and restored.meta == {"step": 3}
  np.testing.assert_array_equal(restored.state.params["w"], np.full((64, 64), 3.0))
  assert ckpt.restore(_state(0), None, 1).meta == {"step": 1}
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
  restored = reopened.restore(_state(0), None, checkpoint.BEST)
  np.testing.assert_array_equal(restored.state.params["w"], np.full((64, 64), 4.0))
  assert reopened.save_if_best(6, _state(6), {"step": 6}, 0.9)
  reopened.close()
  assert _dice_on_disk(tmp_path) == {1: 0.5, 2: 0.7, 4: 0.8, 6: 0.9}


def test_one_directory_keeps_the_newest_steps_and_the_best(tmp_path):
  """Periodic saves (no Dice) and best saves share one directory: the newest max_to_keep
  steps of either kind stay, and the best stays however old it gets."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), 2)
  ckpt.save(1, _state(1), {"step": 1})
  assert ckpt.best_step() is None  # a step saved without a Dice is never the best
  assert ckpt.save_if_best(2, _state(2), {"step": 2}, 0.5)   # validated, not a periodic step
  for step in (3, 4, 5):
    ckpt.save(step, _state(step), {"step": step})
  assert not ckpt.save_if_best(5, _state(5), {"step": 5}, 0.4)
  ckpt.wait()
  assert _on_disk(tmp_path) == [2, 4, 5] and ckpt.best_step() == 2
  assert ckpt.save_if_best(6, _state(6), {"step": 6}, 0.6)   # validated and periodic
  assert not ckpt.save(6, _state(6), {"step": 6})             # one save for both
  ckpt.close()
  assert _on_disk(tmp_path) == [5, 6] and _dice_on_disk(tmp_path) == {6: 0.6}
  reopened = checkpoint.Checkpointer(str(tmp_path), 2)
  assert reopened.best_step() == 6 and reopened.latest_step() == 6
  reopened.close()


def test_the_last_step_validated_after_its_save_becomes_the_best(tmp_path):
  """The end of a run without a best yet: its last step, saved without a Dice, then
  validated, is the best and still there once."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), 3)
  ckpt.save(4, _state(4), {"step": 4})
  assert ckpt.save_if_best(4, _state(4), {"step": 4}, 0.3)
  ckpt.close()
  assert _on_disk(tmp_path) == [4] and _dice_on_disk(tmp_path) == {4: 0.3}


def test_no_best_checkpoint_before_a_validation_is_one_line(tmp_path):
  ckpt = _saved(tmp_path)
  with pytest.raises(MedsegError, match=r"checkpoints: no best checkpoint \(kept once a "):
    ckpt.restore(_state(0), None, checkpoint.BEST)
  ckpt.close()


@pytest.mark.parametrize("text,parsed", [("latest", "latest"), ("best", "best"), ("12", 12),
                                         (7, 7)])
def test_parse_which(text, parsed):
  assert checkpoint.parse_which(text, "KEY") == parsed


def test_parse_which_names_the_key_of_a_bad_value():
  with pytest.raises(ConfigError, match=r"^--checkpoint='newest': use 'latest', 'best' or a "):
    checkpoint.parse_which("newest", "--checkpoint")


def test_a_bad_checkpoint_flag_is_one_line_from_the_same_parser(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "medseg_jax.main", "--config=configs/quickstart.py",
                         f"--workdir={tmp_path}", "--mode=evaluate", "--checkpoint=newest"],
                        cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      "error: --checkpoint='newest': use 'latest', 'best' or a step number"], proc.stderr


def test_a_run_its_checkpoints_directory_or_a_step_name_the_same_step(tmp_path):
  ckpt = _saved(tmp_path, steps=(1, 2))
  ckpt.save_if_best(3, _state(3), {"step": 3}, 0.5)
  ckpt.save(4, _state(4), {"step": 4})
  ckpt.close()
  where = str(tmp_path / "checkpoints")
  for path in (str(tmp_path), where):
    assert checkpoint.step_directory(path, "latest") == os.path.join(where, "4")
    assert checkpoint.step_directory(path, "best") == os.path.join(where, "3")
    assert checkpoint.step_directory(path, 2) == os.path.join(where, "2")
  assert checkpoint.step_directory(os.path.join(where, "1"), "best") == os.path.join(where, "1")
  with pytest.raises(ConfigError, match=r"^model.init_from=\S+ \(model.init_checkpoint=9\): "
                                        r"\S+/checkpoints: no checkpoint at step 9 "
                                        r"\(have \[1, 2, 3, 4\]\)$"):
    warm_start.step_directory(str(tmp_path), 9)
  with pytest.raises(ConfigError, match=r"no checkpoints \(neither a run directory"):
    warm_start.step_directory(str(tmp_path / "nothing"), "latest")


def test_a_save_without_a_dice_logs_no_orbax_warning(tmp_path, caplog):
  _saved(tmp_path, steps=(1,)).close()
  assert "tracked_metric" not in caplog.text


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
    ckpt.restore(_state(0), None, 2)
  with pytest.raises(MedsegError, match=r"no checkpoint at step 7 \(have \[1, 2, 3\]\)"):
    ckpt.restore(_state(0), None, 7)
  ckpt.close()


def test_check_checkpoint_refuses_another_model_and_accepts_other_changes(caplog):
  saved = defaults.get_config()
  meta = {"config": saved.to_dict()}
  changed = defaults.get_config()
  changed.optim.lr = 0.5
  config_schema.check_checkpoint(meta, changed, "DIR")
  assert "optim.lr 1e-05 -> 0.5" in caplog.text
  changed.model.base_features = 32
  with pytest.raises(ConfigError, match=r"^model.base_features: 32 in the config but 64 in the "
                                        r"checkpoints in DIR"):
    config_schema.check_checkpoint(meta, changed, "DIR")


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


def test_an_unfinished_step_written_into_after_its_removal_is_removed_again(tmp_path):
  """A write of a failed save that lands late (tensorstore's, on its own thread) recreates
  the unfinished step's directories; the removal outlasts it. Finished steps stay."""
  (tmp_path / "2").mkdir()
  unfinished = tmp_path / "4.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp" / "d"
  unfinished.mkdir(parents=True)
  (unfinished / "first").write_bytes(b"x" * 1000)

  def late_write():
    time.sleep(0.3)
    os.makedirs(unfinished, exist_ok=True)
    (unfinished / "late").write_bytes(b"x" * 1000)

  writer = threading.Thread(target=late_write)
  writer.start()
  checkpoint.remove_unfinished(str(tmp_path))
  writer.join()
  assert os.listdir(tmp_path) == ["2"]


def test_a_run_and_its_resume_past_an_unreadable_checkpoint_print_no_traceback(tmp_path):
  """Real training runs: a clean one, then the same command resuming past a truncated
  newest checkpoint. orbax abandons a failed read's other operations on an event loop it
  has closed; each used to print "Event loop is closed" with a traceback."""
  def run(steps: int) -> str:
    command = [sys.executable, "-m", "medseg_jax.main", *TINY, f"--workdir={tmp_path}",
               "--config.checkpoint.every_steps=1", f"--config.train.num_steps={steps}"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Event loop is closed" not in proc.stderr and "Traceback" not in proc.stderr, (
        proc.stderr[-3000:])
    return proc.stderr
  run(3)
  _corrupt(tmp_path, 3)
  assert "Skipping unreadable checkpoint" in run(4)
