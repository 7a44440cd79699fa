"""The plans (`python -m medseg_jax.plan`): each rule against numbers worked out here by
hand (isotropic MRI, anisotropic CT, 2D slices, 1 and 8 devices); the memory fit against
XLA's memory analysis of a train step compiled here; the written plans load, pass the
config check and train."""

import copy
import functools
import hashlib
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_plan
from helpers import REPO
from medseg_jax import config as config_check
from medseg_jax import config_schema, kinds, optim
from medseg_jax.models import build_model
from medseg_jax.planning import planner, rules
from medseg_jax.training import losses, state, step


def _fingerprint(spacings, cropped, modalities=("MRI",), labels=("background", "tumour"),
                 margin=0):
  """Cases of `cropped` shapes, each inside a volume `margin` voxels larger along every
  axis and side."""
  cases = [{"name": f"case_{i}", "spacing": list(s), "shape": [n + 2 * margin for n in c],
            "cropped_shape": list(c), "class_voxels": [1, 1]}
           for i, (s, c) in enumerate(zip(spacings, cropped))]
  return {"dataset": "Hand", "modalities": list(modalities), "labels": list(labels),
          "cases": cases, "intensities": {}}


def test_an_isotropic_mri_dataset():
  """Median spacing; a patch of the median shape (under 256^3) pooled on every axis down to
  4 voxels; per-volume z-scores."""
  fp = _fingerprint([(1, 1, 1), (1.2, 1, 1), (1, 1, 1.1)],
                    [(100, 120, 80), (90, 110, 70), (110, 130, 90)])
  spacing, rule = rules.target_spacing(fp)
  np.testing.assert_allclose(spacing, [1, 1, 1.0])
  assert rule == "the median spacing of the 3 training cases"
  shape = rules.median_shape(fp, spacing)
  # at 1 mm: case 0 100 x 120 x 80, case 1 108 x 110 x 70, case 2 110 x 130 x 99
  assert shape.tolist() == [108, 120, 80]
  patch = rules.initial_patch(spacing, shape)
  assert patch.tolist() == [108, 120, 80]  # 256 mm along each axis, cut to the median shape
  levels = rules.pooling(spacing, patch, 5)
  # 108 -> 54 -> 27 -> 13.5 -> 6.75 (>= 4 after each: 4 levels; a 5th would leave 3.4)
  assert levels == [(2, 2, 2)] * 4
  assert rules.divisible(patch, levels) == (96, 112, 80)
  # the box holds every voxel: z-scores over the whole volume
  assert rules.volume_normalisation(fp).value == "zscore"
  assert rules.slice_normalisation(fp).value == "zscore_nonzero"


@pytest.mark.parametrize("margin,scheme", [(0, "zscore"), (4, "zscore"), (6, "mri"),
                                           (20, "mri")])
def test_mri_z_scores_over_the_non_zero_voxels_where_cropping_shrinks_a_case(margin, scheme):
  """Boxes of 100 x 120 x 80 inside volumes `margin` larger on each side: the median box's
  share is 0.79 at 4 voxels (not under 3/4), 0.71 at 6."""
  fp = _fingerprint([(1, 1, 1)] * 3, [(100, 120, 80)] * 3, margin=margin)
  share = 100 * 120 * 80 / ((100 + 2 * margin) * (120 + 2 * margin) * (80 + 2 * margin))
  assert rules.cropped_share(fp) == pytest.approx(share)
  assert rules.volume_normalisation(fp).value == scheme
  assert f"a median {share:.0%} of" in rules.cropping(fp).rule


def test_an_anisotropic_ct_dataset():
  """A z axis over 3x coarser with 3x fewer voxels takes the 10th percentile of its
  spacings; the in-plane axes pool first, z once its spacing is under twice theirs."""
  z = [3.0, 4.0, 5.0, 5.0, 6.0]
  fp = _fingerprint([(0.8, 0.8, s) for s in z], [(400, 400, 40)] * 5, modalities=("CT",))
  spacing, rule = rules.target_spacing(fp)
  # np.percentile([3, 4, 5, 5, 6], 10) = 3 + 0.4 * (4 - 3)
  np.testing.assert_allclose(spacing, [0.8, 0.8, 3.4])
  assert "axis 2 is anisotropic" in rule and "10th percentile" in rule
  # x, y: 400 voxels; z: 40 x 5 mm / 3.4 mm = 58.8 -> 59
  assert rules.median_shape(fp, spacing).tolist() == [400, 400, 59]
  levels = rules.pooling(spacing, (160, 160, 48), 5)
  # spacings (0.8, 0.8, 3.4) -> (1.6, 1.6, 3.4) -> (3.2, 3.2, 3.4): z joins at level 3
  # (48 -> 24 -> 12 -> 6); x and y end at 160 / 32 = 5; 5 levels, the cap.
  assert levels == [(2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
  assert rules.divisible((161, 150, 47), levels) == (160, 128, 40)
  assert rules.pooling(spacing, (160, 160, 24), 5)[-1] == (2, 2, 1)  # 24 / 8 = 3 < 4
  # z is largest against the median shape (48 / 59): one step of its total factor, 8
  assert rules.smaller_patch((160, 160, 48), (400, 400, 59), spacing) == (160, 160, 40)
  assert rules.volume_normalisation(fp).value == "ct"
  assert rules.slice_normalisation(fp).value == "percentile"
  assert rules.volume_normalisation(_fingerprint([(1, 1, 1)], [(9, 9, 9)], ("CT", "PET"))).value == "auto"


def test_a_3d_example_shrinks_to_a_share_of_its_voxels_largest_axis_first():
  """64x80x12 in a median shape of 95x96x17 at 0.8 x 0.8 x 3 mm (in-plane axes pooled 4
  times, z once: totals 16, 16, 2), shrunk to a third (20,480 of 61,440 voxels): y (80/96
  the largest share) to 64; z (12/17) to 10; x (64/95 against 64/96) to 48; y to 48;
  z to 8: 48x48x8, 18,432 voxels. To a half: the first three steps, 48x64x10."""
  spacing, shape = (0.8, 0.8, 3.0), (95, 96, 17)
  shrunk = planner._shrunk_patch  # pylint: disable=protected-access
  assert shrunk((64, 80, 12), shape, spacing, 1 / 3) == (48, 48, 8)
  assert shrunk((64, 80, 12), shape, spacing, 0.5) == (48, 64, 10)


def test_a_dataset_barely_coarser_along_z_stays_at_its_median():
  fp = _fingerprint([(1, 1, 2.9)] * 3, [(100, 100, 30)] * 3)
  np.testing.assert_allclose(rules.target_spacing(fp)[0], [1, 1, 2.9])
  # 3.5 mm is 3.5x coarser, but 40 slices x 3 is not under 100 voxels: no percentile rule
  fp = _fingerprint([(1, 1, 3.5)] * 3, [(100, 100, 40)] * 3)
  np.testing.assert_allclose(rules.target_spacing(fp)[0], [1, 1, 3.5])


def test_the_2d_plan_slices_across_the_coarsest_axis():
  fp = _fingerprint([(0.8, 0.8, 3.0)] * 3, [(200, 180, 30)] * 3)
  axis, size, _ = rules.slicing(fp)
  assert (axis, size) == (2, 200)
  fp = _fingerprint([(3.0, 1, 1)] * 3, [(30, 100, 150)] * 3)
  assert rules.slicing(fp)[:2] == (0, 150)
  fp = _fingerprint([(1, 1, 1)] * 3, [(64, 70, 50)] * 3)
  assert rules.slicing(fp)[:2] == (2, 70)  # isotropic: the last axis
  network = rules.choices_dict(rules.topology_2d(200))
  # 200 / 2^5 = 6.25 >= 4: 5 levels (the cap); 200 rounded down to a multiple of 32
  assert (network["model.depth"], network["data.image_size"]) == (5, 192)
  network = rules.choices_dict(rules.topology_2d(40))
  assert (network["model.depth"], network["data.image_size"]) == (3, 40)


def test_one_and_eight_devices_differ_as_documented():
  """The same per-device batch: 8 times the global batch, 8 times fewer steps for the same
  examples, GreScale with k = 8 in place of one device's poly decay."""
  one = rules.choices_dict(rules.schedule(2, 1))
  eight = rules.choices_dict(rules.schedule(2, 8))
  changed = {k for k in one.keys() | eight.keys() if one.get(k) != eight.get(k)}
  assert changed == {"lr.policy", "lr.scaling", "lr.decay", "train.eval_every_steps",
                     "checkpoint.every_steps"}
  assert (one["lr.policy"], one["lr.decay"], one["lr.scaling"]) == ("standard", "poly", "none")
  assert (eight["lr.policy"], eight["lr.scaling"]) == ("grescale", "linear")
  assert eight.get("lr.decay") is None  # GreScale decays by its own rule
  # 1000 epochs of 250 x 2 examples: 250,000 steps of 2, or 31,250 steps of 16
  assert one["train.eval_every_steps"] == 250_000 // 20
  assert eight["train.eval_every_steps"] == -(-31_250 // 20)
  assert one["lr.reference_batch_size"] == eight["lr.reference_batch_size"] == 2
  # 5% of 3 cases x 100^3 voxels is 150,000 voxels: 15 patches of 10^4, over 8 devices 1 each
  fp = _fingerprint([(1, 1, 1)] * 3, [(100, 100, 100)] * 3)
  assert rules.batch_cap(fp, 10 ** 4, 1) == 15 and rules.batch_cap(fp, 10 ** 4, 8) == 1
  assert rules.batch_cap(fp, 10 ** 6, 1) == 2  # never under a global batch of 2


def _compiled_peak(cfg, batch, classes, channels):
  """XLA's memory analysis of the train step of `cfg` compiled here for one device."""
  model = build_model(cfg.model, classes, cfg.data.image_size)
  kind = kinds.from_config(cfg)
  shape = kind.input_shape(channels)
  tx = optim.make_optimizer(cfg, 0.01)
  init = lambda: state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.key(0), jnp.zeros((1,) + shape))[
          "params"], model_state={}, tx=tx)
  fn = functools.partial(step.train_step, loss_fn=losses.get_loss(cfg.train.loss),
                         reduce_mean=lambda t: t, augment=kind.augmentation())
  batch_spec = {"image": jax.ShapeDtypeStruct((batch,) + shape, jnp.float32),
                "label": jax.ShapeDtypeStruct((batch,) + shape[:-1], jnp.int32)}
  m = jax.jit(fn, donate_argnums=0).lower(jax.eval_shape(init), batch_spec,
                                          jax.random.key(0)).compile().memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def test_the_planned_batch_is_the_largest_the_budget_holds():
  """A 2D plan on a dataset large enough that memory, not its size, decides the batch."""
  fp = _fingerprint([(1, 1, 1)] * 400, [(12, 12, 12)] * 400)
  small = planner.config_of(planner.data_choices("/data", 2, rules.slice_normalisation(fp))
                            + rules.schedule(2, 1) + rules.topology_2d(12)
                            + rules.augmentation(12))
  budget = _compiled_peak(small, 3, 2, 1) + 1
  machine = planner.Machine(budget, "a test budget", 1)
  choices = planner.plan_2d(fp, "/data", machine, planner.peak_fn(fp))
  cfg = planner.config_of(choices)
  batch = cfg.train.per_device_batch_size
  assert batch == 3
  assert _compiled_peak(cfg, batch + 1, 2, 1) > budget
  rule = [c.rule for c in choices if c.key == "train.per_device_batch_size"][0]
  assert rule.startswith(f"XLA plans {budget / 2**30:.2f} GiB for a train step of batch 3 "
                         "(width 32, the largest example)")


@pytest.mark.parametrize("fitting", [0, 1, 3, 6])
def test_a_time_budget_takes_the_largest_candidate_that_trains_min_steps(fitting):
  """A timer whose step time grows with capacity, where the `fitting` smallest candidates
  take rules.MIN_STEPS: the plan takes the largest of them (the smallest when none does and
  the example shrinks no more), found by timing at most 3 of the 6 candidates."""
  fp = _fingerprint([(1, 1, 1)] * 40, [(64, 64, 64)] * 40)
  fixed = (planner.data_choices("/data", 2, rules.slice_normalisation(fp))
           + rules.augmentation(64))
  order = [(b, s[0]) for b, s in rules.candidates((64, 64), lambda s: (32, 32))]
  shrink = lambda s, share: (32, 32)  # noqa: E731  (nothing under 32x32)
  budget = 1000.0
  enough = rules.TRAIN_SHARE * budget / rules.MIN_STEPS  # the slowest step that fits
  timed = []

  def timer(cfg):
    timed.append((cfg.model.base_features, cfg.data.image_size))
    rank = order.index(timed[-1])
    return enough * (0.9 if rank < fitting else 1.1) * (1 + rank / 100)
  network, steps = planner._fit_to_time(  # pylint: disable=protected-access
      fixed, 2, planner.Machine(2**30, "test", 1), planner.TimeBudget(budget, timer),
      (64, 64), shrink, lambda base, s: rules.topology_2d(s[0], base))
  chosen = rules.choices_dict(network)
  expected = order[max(fitting - 1, 0)]
  assert (chosen["model.base_features"], chosen["data.image_size"]) == expected
  assert (steps >= rules.MIN_STEPS) == (fitting > 0)
  assert len(timed) <= 3 and expected in timed


def test_when_no_candidate_trains_min_steps_the_example_shrinks_until_one_does():
  """A step time proportional to width x pixels, where even the smallest candidate, width 8
  at 40x40 (64 x 0.707 = 45, down to a multiple of 8), trains 700 steps: the example
  shrinks by the steps missing (a share of 0.7: 40 x 0.837 = 33.5, down to 32) and width 8
  at 32x32 trains 700 x 1600 / 1024 = 1093 steps."""
  fp = _fingerprint([(1, 1, 1)] * 40, [(64, 64, 64)] * 40)
  fixed = (planner.data_choices("/data", 2, rules.slice_normalisation(fp))
           + rules.augmentation(64))
  budget = 1000.0
  per_pixel = rules.TRAIN_SHARE * budget / 700 / (8 * 40 * 40)  # width 8 at 40x40: 700 steps
  timed = []

  def timer(cfg):
    timed.append((cfg.model.base_features, cfg.data.image_size))
    return per_pixel * cfg.model.base_features * cfg.data.image_size ** 2

  def shrink(size, share):  # the example's side by the square root of the share, by 8s
    return (max(8, int(size[0] * share ** 0.5) // 8 * 8),) * 2

  network, steps = planner._fit_to_time(  # pylint: disable=protected-access
      fixed, 2, planner.Machine(2**30, "test", 1), planner.TimeBudget(budget, timer),
      (64, 64), shrink, lambda base, s: rules.topology_2d(s[0], base))
  chosen = rules.choices_dict(network)
  assert (chosen["model.base_features"], chosen["data.image_size"]) == (8, 32)
  assert steps == 1093
  assert timed[-2:] == [(8, 40), (8, 32)]
  assert "width 8 at 32x32: " in [c.rule for c in network if c.key == "model.base_features"][0]


BUDGET = 120  # seconds of training: enough for the tiny candidates to take 1000 steps


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
  """The command run once on the fingerprint test's small CT + PET dataset."""
  tmp = tmp_path_factory.mktemp("planned")
  root = test_plan._dataset(tmp / "Task")
  proc = subprocess.run([sys.executable, "-m", "medseg_jax.plan", f"--data={root}",
                         f"--output={tmp / 'plans'}", "--workers=1", "--memory=1",
                         f"--budget={BUDGET}s", "--num_devices=1"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return tmp, proc.stdout


def test_the_written_plans_record_the_fingerprint_and_pass_the_config_check(planned):
  tmp, stdout = planned
  assert stdout.splitlines()[0] == ("Tiny: 3 training cases, modalities CT, PET, "
                                    "classes background, liver, lesion")
  assert "median spacing 0.8 x 0.8 x 2.5 mm" in stdout
  assert f"wrote {tmp / 'plans' / 'plan_2d.py'}" in stdout
  text = (tmp / "plans" / "fingerprint.json").read_text()
  digest = hashlib.sha256(json.dumps(json.loads(text), sort_keys=True,
                                     separators=(",", ":")).encode()).hexdigest()
  for dims in (2, 3):
    path = tmp / "plans" / f"plan_{dims}d.py"
    assert f"FINGERPRINT_SHA256 = '{digest}'" in path.read_text()
    cfg = config_schema.load_config(str(path))
    assert cfg.data.spatial_dims == dims and cfg.data.root == str(tmp / "Task")
    cfg.parallel.num_devices = 1
    config_check.check(cfg)
  for dims in (2, 3):  # a budgeted run: no augmentation, nnU-Net's ranges written
    cfg = config_schema.load_config(str(tmp / "plans" / f"plan_{dims}d.py"))
    assert cfg.data.augment.enabled is False
    assert (cfg.data.augment.rotation_degrees, tuple(cfg.data.augment.zoom)) == (30.0, (0.7, 1.4))
  cfg = config_schema.load_config(str(tmp / "plans" / "plan_3d.py"))
  # 0.8 x 0.8 x 2.5 mm is not anisotropic by the rule (3 x 6 slices is not under 10)
  assert cfg.data.target_spacing == (0.8, 0.8, 2.5)
  assert cfg.model.pooling == ((2, 2, 1),) and cfg.data.volume_normalisation == "auto"


def test_a_planned_3d_config_trains_and_its_steps_fill_the_time_budget(planned, tmp_path):
  """100 of the plan's steps: their time per step (after the first log period, which
  compiles) times the planned steps is the budget's training share within a factor of 2
  either way: the planner timed the same step on this machine, whose load the suite's
  other processes vary."""
  tmp, _ = planned
  cfg = copy.deepcopy(config_schema.load_config(str(tmp / "plans" / "plan_3d.py")))
  planned_steps = cfg.train.num_steps
  assert planned_steps >= rules.MIN_STEPS
  cfg.train.num_steps, cfg.monitor.log_every_steps = 100, 10
  cfg.data.val_fraction, cfg.data.test_fraction, cfg.parallel.num_devices = 0.34, 0.0, 1
  cfg.train.eval_every_steps = cfg.checkpoint.every_steps = 0
  import helpers  # pylint: disable=import-outside-toplevel
  helpers.train(cfg, str(tmp_path / "run"))
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines() if '"step_time"' in line]
  assert records[-1]["step"] == 100 and np.isfinite(records[-1]["loss"])
  per_step = np.mean([r["step_time"] for r in records[1:]])
  share = rules.TRAIN_SHARE * BUDGET
  assert share / 2 <= per_step * planned_steps <= share * 2, (per_step, planned_steps, share)


def test_the_benchmarks_n_device_plan_keeps_the_examples_of_the_one_device_plan(planned):
  """benchmarks/plan_devices.py's 8-device variant of a budgeted 3D plan: every device's
  batch capped for 8 devices, the one-device plan's examples in fewer, larger steps, and
  otherwise the documented differences of an 8-device plan."""
  tmp, _ = planned
  sys.path.insert(0, f"{REPO}/benchmarks")
  import plan_devices  # pylint: disable=import-outside-toplevel
  path = str(tmp / "plans" / "plan_3d.py")
  one = config_schema.load_config(path)
  eight = copy.deepcopy(one)
  for choice in plan_devices.device_choices(path, 8):
    config_schema.assign(eight, choice.key, choice.value)
  fingerprint = json.loads((tmp / "plans" / "fingerprint.json").read_text())
  batch = min(one.train.per_device_batch_size,
              rules.batch_cap(fingerprint, int(np.prod(one.data.patch_size)), 8))
  assert eight.train.per_device_batch_size == batch == eight.lr.reference_batch_size
  examples = one.train.num_steps * one.train.per_device_batch_size
  assert 0 <= eight.train.num_steps * 8 * batch - examples < 8 * batch
  assert (eight.lr.policy, eight.lr.scaling, eight.lr.decay) == ("grescale", "linear", "none")
  assert eight.parallel.num_devices == 8 and eight.optim.lr == one.optim.lr
  assert (eight.model, eight.data.patch_size) == (one.model, one.data.patch_size)
  config_check.check(eight)


def test_the_benchmarks_study_trains_a_plan_set_made_before(planned, tmp_path):
  """benchmarks/plan_budget.py --plans=DIR: the plans and step counts of DIR are copied, not
  planned again, and the dataset is written anew in OUT."""
  tmp, _ = planned
  made = tmp_path / "made"
  shutil.copytree(tmp / "plans", made / "plans")
  timed = {"data": "/elsewhere/data", "plans": "/elsewhere/plans", "planning_seconds": 61.0,
           "quickstart": {"step_seconds": 0.5, "steps": 925}}
  (made / "prepared.json").write_text(json.dumps(timed))
  sys.path.insert(0, f"{REPO}/benchmarks")
  import plan_budget  # pylint: disable=import-outside-toplevel
  out = tmp_path / "out"
  info = plan_budget.prepare(str(out), 2, "10m", "mri", str(made))
  assert info == {**timed, "data": str(out / "data"), "plans": str(out / "plans"),
                  "made_in": str(made)}
  assert json.loads((out / "prepared.json").read_text()) == info
  for name in ("plan_2d.py", "plan_3d.py", "fingerprint.json"):
    assert (out / "plans" / name).read_bytes() == (made / "plans" / name).read_bytes()
  assert sorted(p.name for p in (out / "data" / "imagesTr").iterdir()) == [
      "phantom_000.nii.gz", "phantom_001.nii.gz"]
  assert not (out / "plan.log").exists()  # nothing planned
