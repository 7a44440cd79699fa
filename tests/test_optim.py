"""LR policies at their phase boundaries (hand-computed), k, GreScale phases, optimizers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from medseg_jax import defaults, optim
from medseg_jax.training import losses, step
from medseg_jax.errors import ConfigError
from medseg_jax.models import UNet
from medseg_jax.training.state import TrainState
from medseg_jax.tuning import schedule

SPE = 10  # steps per epoch


def cfg_with(**lr):
  cfg = defaults.get_config()
  cfg.optim.lr = 0.1
  cfg.train.per_device_batch_size = 7
  for key, value in lr.items():
    if key.startswith("grescale_"):
      cfg.lr.grescale[key[len("grescale_"):]] = value
    else:
      cfg.lr[key] = value
  return cfg


def lr_at(cfg, steps, devices=4, epochs=100):
  resolved = optim.resolve_schedule(cfg, 7 * devices, SPE, epochs * SPE)
  return [float(resolved.schedule(s)) for s in steps], resolved


def test_k_and_scaling_rules():
  cfg = cfg_with()
  assert optim.scaling_factor(cfg, 7 * 8) == 8
  cfg.lr.reference_batch_size = 14
  assert optim.scaling_factor(cfg, 7 * 8) == 4
  assert optim.peak_learning_rate(cfg, 56) == pytest.approx(0.4)
  cfg.lr.scaling = "sqrt"
  assert optim.peak_learning_rate(cfg, 56) == pytest.approx(0.2)
  cfg.lr.scaling = "none"
  assert optim.peak_learning_rate(cfg, 56) == pytest.approx(0.1)


def test_constant_warmup_holds_the_base_lr_then_jumps():
  values, _ = lr_at(cfg_with(warmup="constant"), [0, 49, 50, 999])
  assert values == pytest.approx([0.1, 0.1, 0.4, 0.4])


def test_gradual_warmup_ramps_from_base_to_k_times_base():
  values, _ = lr_at(cfg_with(warmup="gradual"), [0, 25, 50, 500])
  assert values == pytest.approx([0.1, 0.25, 0.4, 0.4])


def test_step_decay_at_goyals_epochs():
  values, _ = lr_at(cfg_with(decay="step"), [299, 300, 599, 600, 800, 999])
  assert values == pytest.approx([0.4, 0.04, 0.04, 0.004, 0.0004, 0.0004])


def test_step_decay_counts_epochs_from_the_start_after_a_warmup():
  values, _ = lr_at(cfg_with(warmup="gradual", decay="step"), [50, 299, 300])
  assert values == pytest.approx([0.4, 0.4, 0.04])


def test_cosine_and_poly_decays():
  values, _ = lr_at(cfg_with(warmup="gradual", decay="cosine"), [50, 50 + 475, 999])
  assert values == pytest.approx([0.4, 0.2, 0.4 * 0.5 * (1 + math.cos(math.pi * 949 / 950))],
                                rel=1e-6, abs=1e-8)
  values, _ = lr_at(cfg_with(decay="poly"), [0, 500, 999])
  assert values == pytest.approx([0.4, 0.4 * 0.5**0.9, 0.4 * (1 / 1000)**0.9], rel=1e-4)


def test_grescale_values_at_its_phase_boundaries():
  # eta = optim.lr = 0.1, k = 4: the warmup ramps 0.1 -> 0.4 over steps 0..49 and reaches
  # 0.4 at its last step; the stabilisation holds 0.5 x 0.4; the decay starts from it.
  values, resolved = lr_at(cfg_with(policy="grescale"), [0, 24, 49, 50, 592, 593, 603, 999])
  decay = round(3 / 7 * 95 * SPE)  # 407 steps
  assert [p.name for p in resolved.phases] == ["warmup", "stabilisation", "decay"]
  assert [p.end - p.start for p in resolved.phases] == [50, 1000 - 50 - decay, decay]
  assert values[0] == pytest.approx(0.1)
  assert values[1] == pytest.approx(0.1 + 0.3 * 24 / 49)
  assert values[2] == pytest.approx(0.4)
  assert values[3:6] == pytest.approx([0.2, 0.2, 0.2])
  assert values[6] == pytest.approx(0.2 / 1.1)              # one epoch into the decay
  assert values[7] == pytest.approx(0.2 / (1 + 0.1 * 406 / SPE))


def test_a_larger_decay_coefficient_decays_faster_from_the_same_start():
  steps = np.arange(1000)
  slow = np.asarray(lr_at(cfg_with(policy="grescale"), steps)[1].schedule(steps))
  fast = np.asarray(lr_at(cfg_with(policy="grescale", grescale_decay_coefficient=0.3),
                          steps)[1].schedule(steps))
  start = 593  # the decay's first step (see above): both at the held LR 0.2
  np.testing.assert_array_equal(fast[:start + 1], slow[:start + 1])
  assert fast[start] == pytest.approx(0.2)
  assert np.all(fast[start + 1:] < slow[start + 1:])
  # Time-based, by hand: held / (1 + c x epochs into the decay), 40.6 epochs at the end.
  assert fast[-1] == pytest.approx(0.2 / (1 + 0.3 * 40.6))


@pytest.mark.parametrize("epochs,warmup,expected", [
    (12, 5, (5, 4, 3)), (40, 5, (5, 20, 15)), (100, 5, (5, 54.3, 40.7)),
    (40, 8, (8, 17, 15)),   # a longer warmup takes its epochs from the stabilisation
])
def test_grescale_phase_lengths(epochs, warmup, expected):
  _, resolved = lr_at(cfg_with(policy="grescale", grescale_warmup_epochs=float(warmup)), [0],
                      epochs=epochs)
  lengths = [(p.end - p.start) / SPE for p in resolved.phases]
  assert lengths == pytest.approx(list(expected), abs=0.05)


def test_grescale_parameters_from_config():
  cfg = cfg_with(policy="grescale", grescale_decay_epochs=20.0,
                 grescale_stabilisation_factor=0.25, grescale_decay_coefficient=1.0)
  cfg.optim.lr = 1e-4  # k = 4: peak 4e-4, held 1e-4
  values, resolved = lr_at(cfg, [0, 49, 50, 800, 810])
  assert values == pytest.approx([1e-4, 4e-4, 1e-4, 1e-4, 5e-5])
  assert resolved.phases[2].start == 800


@pytest.mark.parametrize("key,value", [("stabilisation_factor", 0.0),
                                       ("stabilisation_factor", 1.5),
                                       ("decay_coefficient", -0.1), ("warmup_epochs", -1.0),
                                       ("decay_epochs", -2.0)])
def test_bad_grescale_values_are_config_errors_under_any_policy(key, value):
  for policy in ("grescale", "standard"):  # the tuner switches a standard config later
    with pytest.raises(ConfigError, match=f"^lr.grescale.{key}={value}: must"):
      lr_at(cfg_with(policy=policy, **{f"grescale_{key}": value}), [0])


def test_grescale_has_no_initial_lr_of_its_own():
  # The thesis's initial LR is optim.lr; a second key would be a second, diverging eta.
  assert "initial_lr" not in defaults.get_config().lr.grescale


@pytest.mark.parametrize("key,value", [("policy", "cyclic"), ("warmup", "slow"),
                                       ("decay", "linear"), ("scaling", "cube")])
def test_unknown_policy_settings_are_config_errors(key, value):
  with pytest.raises(ConfigError, match=f"lr.{key}"):
    lr_at(cfg_with(**{key: value}), [0])


SCHEDULES = ([("standard", warmup, decay) for warmup in optim.WARMUPS for decay in optim.DECAYS]
             + [("grescale", "none", "none")])


@pytest.mark.parametrize("policy,warmup,decay", SCHEDULES)
def test_every_policy_evaluates_over_an_array_of_steps_and_plots(policy, warmup, decay,
                                                                 tmp_path):
  cfg = cfg_with(policy=policy, warmup=warmup, decay=decay, warmup_epochs=2.0,
                 step_epochs=(4.0, 8.0))
  resolved = optim.resolve_schedule(cfg, 7 * 4, SPE, 10 * SPE)
  steps = np.arange(10 * SPE)
  values = np.asarray(resolved.schedule(steps))
  # The reference: the schedule one step at a time, as the optimizer calls it, around
  # every phase boundary (warmup ends at 20, step decays at 40 and 80).
  assert values.shape == steps.shape
  probe = [0, 1, 19, 20, 21, 39, 40, 41, 57, 79, 80, 99]
  np.testing.assert_allclose(values[probe], [float(resolved.schedule(s)) for s in probe],
                             rtol=1e-5, atol=1e-9)
  path = tmp_path / "lr.png"
  schedule.plot({policy: resolved}, len(steps), str(path), policy)
  assert path.read_bytes()[:4] == b"\x89PNG"


def _tiny_state(tx):
  model = UNet(num_classes=2, depth=2, base_features=4)
  params = helpers.init_variables(model, jnp.zeros((1, 16, 16, 1)))["params"]
  return TrainState.create(apply_fn=model.apply, params=params, model_state={}, tx=tx)


def _batch():
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(4, 16, 16, 1)).astype(np.float32),
          "label": (rng.random((4, 16, 16)) > 0.7).astype(np.int32)}


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "lars"])
def test_every_optimizer_trains_a_tiny_model_one_step(name):
  cfg = cfg_with()
  cfg.optim.name, cfg.optim.weight_decay = name, 1e-4
  tx = optim.make_optimizer(cfg, optim.resolve_schedule(cfg, 7, 1, 1).schedule)
  fn = functools.partial(step.train_step, loss_fn=losses.dice_ce_loss, reduce_mean=lambda x: x)
  state = _tiny_state(tx)
  new_state, metrics = jax.jit(fn)(state, _batch(), jax.random.key(0))
  assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.params,
                       state.params)
  assert max(jax.tree.leaves(moved)) > 0


def test_plain_sgd_step_is_lr_times_gradient():
  cfg = cfg_with()
  cfg.optim.momentum = 0.0
  tx = optim.make_optimizer(cfg, optim.resolve_schedule(cfg, 7, 1, 1).schedule)
  state = _tiny_state(tx)
  batch = _batch()
  loss = lambda p: jnp.mean(losses.dice_ce_loss(state.apply_fn({"params": p}, batch["image"]),
                                                batch["label"]))
  grads = jax.jit(jax.grad(loss))(state.params)
  fn = functools.partial(step.train_step, loss_fn=losses.dice_ce_loss, reduce_mean=lambda x: x)
  new_state, _ = jax.jit(fn)(state, batch, jax.random.key(0))
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# Every chain `make_optimizer` builds: (optim.name, momentum, nesterov), each with and
# without gradient clipping and weight decay.
CHAINS = [("sgd", 0.0, False), ("sgd", 0.9, False), ("sgd", 0.9, True), ("adam", 0.9, False),
          ("adamw", 0.9, False), ("lars", 0.9, False), ("lars", 0.9, True)]


def _chain(name, momentum, nesterov, clip, decay, schedule):
  cfg = cfg_with()
  cfg.optim.update(name=name, momentum=momentum, nesterov=nesterov, grad_clip_norm=clip,
                   weight_decay=decay)
  return optim.make_optimizer(cfg, schedule)


def test_the_renumbering_cases_cover_every_optimizer():
  assert {name for name, _, _ in CHAINS} == set(optim.OPTIMIZERS)


@pytest.mark.parametrize("clip", [0.0, 1.0])
@pytest.mark.parametrize("decay", [0.0, 1e-2])
@pytest.mark.parametrize("name,momentum,nesterov", CHAINS)
@pytest.mark.parametrize("trained,renumbered", [(3, 12), (5, 2)])
def test_with_step_sets_every_counter_as_optax_counts_and_the_next_lr(
    name, momentum, nesterov, clip, decay, trained, renumbered):
  """A state after `trained` updates renumbered to `renumbered`: the leaves that count
  steps (those a fresh optimizer's zero-gradient steps change) hold what `renumbered`
  such steps give them, every other leaf is untouched, and the next update is the one of
  an optimizer whose LR is the schedule's value at `renumbered` at every step."""
  schedule = lambda count: 0.01 * (count + 1.0)  # another LR at every step
  tx = _chain(name, momentum, nesterov, clip, decay, schedule)
  rng = np.random.default_rng(0)
  draw = lambda: {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                  "b": jnp.asarray(rng.normal(size=2), jnp.float32)}
  params = draw()
  state = tx.init(params)
  for _ in range(trained):
    state = tx.update(draw(), state, params)[1]
  zeros = jax.tree.map(jnp.zeros_like, params)
  counted = tx.init(params)
  for _ in range(renumbered):  # optax's own counting: zero gradients at zero parameters
    counted = tx.update(zeros, counted, zeros)[1]
  moved = optim.with_step(state, renumbered)
  assert jax.tree.structure(moved) == jax.tree.structure(state)
  counters = 0
  for new, old, fresh, ref in zip(*map(jax.tree.leaves, (moved, state, tx.init(params),
                                                         counted))):
    is_counter = not np.array_equal(fresh, ref)
    counters += is_counter
    expected = ref if is_counter else old
    assert new.dtype == expected.dtype and np.array_equal(new, expected)
  assert counters == (2 if name in ("adam", "adamw") else 1)  # the schedule's, Adam's
  held = _chain(name, momentum, nesterov, clip, decay, lambda count: schedule(renumbered))
  grads = draw()
  step_lr = lambda tx, s: jax.tree.leaves(tx.update(grads, s, params)[0])
  for a, b in zip(step_lr(tx, moved), step_lr(held, moved)):
    assert np.array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(step_lr(tx, state), step_lr(held, state)))
