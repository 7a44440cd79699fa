"""The GreScale guideline tuner: its decisions with a fake trainer, and one real tiny run."""

import csv
import json
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

import helpers
from configs import quickstart
from medseg_jax import defaults
from helpers import REPO, TINY as TINY_RUN, env_with_devices
from medseg_jax import config_schema, optim
from medseg_jax.errors import ConfigError, DataError
from medseg_jax.tuning import guideline, guideline_settings, report, runs
from medseg_jax.tuning.actions import after_action
from medseg_jax.tuning.guideline_settings import Settings

INITIAL, COEF, WARMUP, DECAY, OPT = ("optim.lr", "lr.grescale.decay_coefficient",
                                     "lr.grescale.warmup_epochs", "lr.grescale.decay_epochs",
                                     "optim.name")


def settings(**values):
  """The tuner's settings for the tests of its search: today's defaults, a low threshold, a
  large budget, no tolerance, one validation draw with seed 0, then `values`."""
  return Settings(**{"threshold": 8, "budget": 50, "tolerance": 0.0, "val_draws": 1,
                     "seed": 0, **values})


def metrics(dice, mean_accuracy=0.5, mean_iou=0.5):
  m = {"dice": dice, "mean_accuracy": mean_accuracy, "mean_iou": mean_iou,
       "pixel_accuracy": 0.99, "fw_iou": 0.98}
  return {"val": m, "test": dict(m, dice=dice - 0.01)}


class Fake:
  """A deterministic trainer: val Dice from the overrides by `score`; records its calls."""

  def __init__(self, score, baseline=0.9):
    self.score, self.baseline, self.calls = score, baseline, []

  def __call__(self, name, overrides):
    self.calls.append((name, overrides))
    if overrides["parallel.num_devices"] == 1:
      return metrics(self.baseline)
    return metrics(self.score(overrides))


def tune(g, fake, tmp_path, k=8):
  """Tunes the quickstart config (adam, 16 epochs) with settings `g`."""
  tuner = guideline.Tuner(quickstart.get_config(), k, fake, str(tmp_path), g)
  status = tuner.run()
  return tuner, status


def actions(tuner):
  return [h["action"] for h in tuner.history]


# -- what one step of each action does to the GreScale schedule, by hand -----------------

# eta = optim.lr = 0.01, k = 8 (8 devices x 7), 10 steps per epoch, 40 epochs = 400 steps.
# Defaults: warmup 5 epochs (steps 0-49, eta -> 8 eta = 0.08 at step 49), decay 3/7 of
# (40 - 5) = 15 epochs (steps 250-399), stabilisation between at 0.5 x 0.08 = 0.04, decay
# time-based: 0.04 / (1 + 0.1 x (step - 250) / 10).
PROBE = [0, 24, 49, 50, 59, 60, 150, 239, 240, 249, 250, 260, 399]
HELD = 0.04
BEFORE = [0.01, 0.01 + 0.07 * 24 / 49, 0.08, *[HELD] * 8, HELD / 1.1, HELD / 2.49]
AFTER = {
    # optim.lr x 0.5: every value halves, the peak is 0.5 x 8 x 0.01 = 0.04.
    "decrease_initial_lr": [0.005, 0.005 + 0.035 * 24 / 49, 0.04, *[0.02] * 8, 0.02 / 1.1,
                            0.02 / 2.49],
    # c 0.1 -> 0.2: equal up to the decay's first step, then 0.04 / (1 + 0.2 x epochs).
    "increase_decay_coefficient": [*BEFORE[:11], HELD / 1.2, HELD / (1 + 0.2 * 14.9)],
    # warmup 5 -> 6 epochs: the ramp ends at step 59, the stabilisation starts at 60.
    "increase_warmup": [0.01, 0.01 + 0.07 * 24 / 59, 0.01 + 0.07 * 49 / 59,
                        0.01 + 0.07 * 50 / 59, 0.08, *[HELD] * 6, HELD / 1.1, HELD / 2.49],
    # decay 15 -> 16 epochs: it starts at step 240, 10 steps earlier.
    "increase_decay_period": [*BEFORE[:8], HELD, HELD / 1.09, HELD / 1.1, HELD / 1.2,
                              HELD / (1 + 0.1 * 15.9)],
}
PHASES = {"warmup": (0, 50), "stabilisation": (50, 250), "decay": (250, 400)}
AFTER_PHASES = {
    "increase_warmup": {"warmup": (0, 60), "stabilisation": (60, 250), "decay": (250, 400)},
    "increase_decay_period": {"warmup": (0, 50), "stabilisation": (50, 240),
                              "decay": (240, 400)},
}


def grescale_cfg():
  cfg = defaults.get_config()
  cfg.lr.policy, cfg.optim.lr, cfg.train.num_epochs = "grescale", 0.01, 40
  return cfg


def schedule_at(cfg):
  resolved = optim.resolve_schedule(cfg, 7 * 8, 10, 400)
  phases = {p.name: (p.start, p.end) for p in resolved.phases}
  return [float(resolved.schedule(s)) for s in PROBE], phases, resolved


def test_grescale_schedule_before_any_action():
  values, phases, resolved = schedule_at(grescale_cfg())
  assert values == pytest.approx(BEFORE, rel=1e-5)
  assert phases == PHASES and resolved.phases[0].lr_end == pytest.approx(0.08)


@pytest.mark.parametrize("action", list(AFTER))
def test_one_step_of_each_action_by_hand(action):
  cfg, changed = after_action(grescale_cfg(), action)
  values, phases, resolved = schedule_at(cfg)
  assert values == pytest.approx(AFTER[action], rel=1e-5), changed
  assert phases == AFTER_PHASES.get(action, PHASES)
  if action == "decrease_initial_lr":
    assert changed == "optim.lr: 0.01 → 0.005"
    assert resolved.phases[0].lr_end == pytest.approx(0.5 * 8 * 0.01)  # the peak


def test_after_action_needs_grescale_and_room():
  cfg = grescale_cfg()
  cfg.lr.policy = "standard"
  with pytest.raises(ConfigError, match="^lr.policy='standard'"):
    after_action(cfg, "increase_warmup")
  cfg = grescale_cfg()
  cfg.lr.grescale.warmup_epochs = 25.0  # 25 + 15 epochs of decay fill the 40
  with pytest.raises(ConfigError, match="^increase_warmup: no step left"):
    after_action(cfg, "increase_warmup")


# -- the tuner's decisions with a scripted trainer ----------------------------------------


def test_action_order_when_nothing_improves(tmp_path):
  fake = Fake(lambda o: 0.8)
  tuner, status = tune(settings(), fake, tmp_path)
  assert status == "actions_exhausted"
  assert actions(tuner) == ["baseline", "grescale", "decrease_initial_lr",
                            "increase_decay_coefficient", "increase_warmup",
                            "increase_decay_period", "change_optimizer"]
  assert [h["run"] for h in tuner.history][:3] == ["00_baseline", "01_grescale",
                                                   "02_decrease_initial_lr"]
  trials = [o for _, o in fake.calls[2:]]
  # Each trial is one step from the GreScale defaults, since none was better.
  # The search starts from the config's optim.lr (quickstart: 2e-3), the thesis's eta.
  start = {INITIAL: 2e-3, COEF: 0.1, WARMUP: 5.0, DECAY: 0.0, OPT: "adam"}
  # 16 epochs: the default decay phase is 3/7 of (16 - 5) = 4.714285714 epochs, + 1.
  steps = [{INITIAL: 1e-3}, {COEF: 0.2}, {WARMUP: 6.0}, {DECAY: 5.714285714}, {OPT: "sgd"}]
  for trial, step in zip(trials, steps):
    assert {k: trial[k] for k in start} == pytest.approx({**start, **step})
    assert trial["parallel.num_devices"] == 8 and trial["lr.policy"] == "grescale"
    assert trial["lr.scaling"] == "linear" and trial["seed"] == 0
  assert fake.calls[0][1] == {"parallel.num_devices": 1, "train.per_device_batch_size": 16,
                              "seed": 0, "data.split_seed": 0}
  assert [h["decision"] for h in tuner.history[2:]] == ["not better: next action"] * 5


def test_repeat_on_improve_builds_on_the_best_run(tmp_path):
  # Better down to an initial LR of 5e-4, no better below; nothing else matters.
  fake = Fake(lambda o: 0.8 + 0.01 * min(o[INITIAL] and 2e-3 / o[INITIAL], 4.0))
  tuner, status = tune(settings(actions=("decrease_initial_lr", "increase_decay_coefficient")),
                       fake, tmp_path)
  assert status == "actions_exhausted"
  assert [o[INITIAL] for _, o in fake.calls[1:]] == pytest.approx(
      [2e-3, 1e-3, 5e-4, 2.5e-4, 5e-4])
  assert [h["decision"] for h in tuner.history[2:]] == [
      "better: repeat the action", "better: repeat the action", "not better: next action",
      "not better: next action"]
  assert fake.calls[-1][1][COEF] == pytest.approx(0.2)
  assert tuner.chosen == "03_decrease_initial_lr"
  assert tuner.history[-1]["changed"] == "lr.grescale.decay_coefficient: 0.1 → 0.2"


def test_warmup_grows_until_the_run_has_no_room(tmp_path):
  # Longer warmup is always better; 16 epochs with a 4.71-epoch decay leave room up to 11.
  fake = Fake(lambda o: 0.5 + 0.01 * o[WARMUP])
  tuner, status = tune(settings(actions=("increase_warmup",)), fake, tmp_path)
  assert status == "actions_exhausted"
  assert [o[WARMUP] for _, o in fake.calls[1:]] == [5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]


def test_reaching_the_baseline_is_confirmed_with_the_next_seed(tmp_path):
  fake = Fake(lambda o: 0.95 if o[COEF] > 0.15 else 0.8)
  tuner, status = tune(settings(), fake, tmp_path)
  assert status == "confirmed"
  assert actions(tuner)[2:] == ["decrease_initial_lr", "increase_decay_coefficient", "confirm"]
  name, confirm = fake.calls[-1]
  assert name == "04_confirm" and confirm["seed"] == 1
  assert tuner.history[-1]["changed"] == "seed: 0 → 1"
  assert {k: v for k, v in confirm.items() if k != "seed"} == {
      k: v for k, v in fake.calls[-2][1].items() if k != "seed"}
  assert tuner.chosen == "03_increase_decay_coefficient"


def test_confirmation_can_fail(tmp_path):
  fake = Fake(lambda o: 0.95 if o["seed"] == 0 else 0.8)
  tuner, status = tune(settings(), fake, tmp_path)
  assert status == "not_confirmed" and actions(tuner) == ["baseline", "grescale", "confirm"]
  assert tuner.chosen == "01_grescale"


def test_budget_stops_the_search(tmp_path):
  fake = Fake(lambda o: 0.8)
  tuner, status = tune(settings(budget=4), fake, tmp_path)
  assert status == "budget_spent" and len(fake.calls) == 4
  more = Fake(lambda o: 0.8)  # a larger budget continues the search
  tuner, status = tune(settings(budget=6), more, tmp_path)
  assert status == "budget_spent" and [n for n, _ in more.calls] == [
      "04_increase_warmup", "05_increase_decay_period"]
  fake = Fake(lambda o: 0.95 if o[INITIAL] < 2e-3 else 0.8)
  tuner, status = tune(settings(budget=3), fake, tmp_path / "b")
  assert status == "unconfirmed" and len(fake.calls) == 3
  assert tuner.chosen == "02_decrease_initial_lr"


def test_below_the_threshold_trains_once(tmp_path):
  fake = Fake(lambda o: 0.5)
  tuner, status = tune(settings(threshold=12), fake, tmp_path, k=8)
  assert status == "below_threshold" and actions(tuner) == ["baseline", "grescale"]
  assert tuner.chosen == "01_grescale"


def test_comparison_priority_and_tolerance():
  compare = guideline.COMPARISONS["dice_macc_miou"]
  a = {"dice": 0.801, "mean_accuracy": 0.70, "mean_iou": 0.60}
  b = {"dice": 0.800, "mean_accuracy": 0.75, "mean_iou": 0.60}
  assert compare(a, b, 0.0) == 1           # Dice decides
  assert compare(a, b, 0.002) == -1        # Dice tied, mean accuracy decides
  assert compare(a, dict(b, mean_accuracy=0.701), 0.002) == 0
  assert compare(a, dict(b, mean_accuracy=0.701, mean_iou=0.5), 0.002) == 1
  assert compare({"dice": None}, {"dice": 0.1}, 0.0) == -1
  assert compare(a, a, 0.0) == 0 and compare({"dice": None}, {"dice": None}, 0.0) == 0
  assert compare({"dice": 0.75}, {"dice": 0.5}, 0.25) == 1  # a difference at the tolerance
  assert compare({"dice": 0.75}, {"dice": 0.5}, 0.2500001) == 0
  assert guideline.COMPARISONS["mean_iou"](a, dict(b, mean_iou=0.65), 0.0) == -1


@pytest.mark.parametrize("tolerance,decision", [(0.002, "not better: next action"),
                                                (0.0005, "better: repeat the action")])
def test_tie_tolerance_in_the_search(tmp_path, tolerance, decision):
  fake = Fake(lambda o: 0.800 if o[INITIAL] == 2e-3 else 0.801)
  tuner, _ = tune(settings(tolerance=tolerance, budget=3), fake, tmp_path)
  assert tuner.history[2]["decision"] == decision


def test_comparison_comes_from_the_config(tmp_path):
  # Dice improves while mean IoU drops: better by Dice, worse by mean IoU.
  def score(o):
    return metrics(0.81, mean_iou=0.4) if o[INITIAL] < 2e-3 else metrics(0.8, mean_iou=0.5)
  def trainer(name, o):
    return metrics(0.9, mean_iou=0.9) if o["parallel.num_devices"] == 1 else score(o)
  for comparison, decision in (("dice", "better: repeat the action"),
                               ("mean_iou", "not better: next action")):
    tuner = guideline.Tuner(quickstart.get_config(), 8, trainer, str(tmp_path / comparison),
                            settings(comparison=comparison, budget=3))
    tuner.run()
    assert tuner.history[2]["decision"] == decision
  with pytest.raises(ConfigError, match="--comparison"):
    guideline.Tuner(quickstart.get_config(), 8, trainer, str(tmp_path),
                    settings(comparison="best"))


class Interrupted(Exception):
  pass


def test_resume_from_the_state_file(tmp_path):
  score = lambda o: 0.8 + 0.01 * (o[WARMUP] - 5.0) + (0.002 if o[INITIAL] == 1e-3 else 0.0)
  reference = Fake(score)
  whole, _ = tune(settings(), reference, tmp_path / "whole")

  def failing(name, overrides):
    if len(first.calls) == 5:
      raise Interrupted(name)
    return first(name, overrides)
  first = Fake(score)
  with pytest.raises(Interrupted):
    guideline.Tuner(quickstart.get_config(), 8, failing, str(tmp_path / "resumed"),
                    settings()).run()
  state = json.loads((tmp_path / "resumed" / guideline.STATE).read_text())
  assert sorted(state["runs"]) == [name for name, _ in first.calls]
  second = Fake(score)
  resumed, _ = tune(settings(), second, tmp_path / "resumed")
  assert [name for name, _ in second.calls] == [name for name, _ in reference.calls[5:]]
  assert resumed.history == whole.history and resumed.status == whole.status
  with pytest.raises(ConfigError, match="num_devices"):
    guideline.Tuner(quickstart.get_config(), 16, second, str(tmp_path / "resumed"), settings())


@pytest.mark.parametrize("key,value", [("budget", 1), ("tolerance", -0.1), ("split", "train"),
                                       ("actions", ("decrease_initial_lr", "shuffle")),
                                       ("optimizers", ("sgd", "rmsprop")),
                                       ("initial_lr_factor", 2.0), ("warmup_epochs_step", 0.0),
                                       ("val_draws", 0), ("seed", -1)])
def test_bad_guideline_settings(tmp_path, key, value):
  with pytest.raises(ConfigError, match=f"--{key}"):
    guideline.Tuner(quickstart.get_config(), 8, Fake(lambda o: 0.5), str(tmp_path),
                    settings(**{key: value}))


def test_default_settings_are_the_thesis_guideline():
  assert Settings() == Settings(
      threshold=12, budget=12, comparison="dice_macc_miou", tolerance=0.002, split="val",
      actions=("decrease_initial_lr", "increase_decay_coefficient", "increase_warmup",
               "increase_decay_period", "change_optimizer"),
      initial_lr_factor=0.5, decay_coefficient_step=0.1, warmup_epochs_step=1.0,
      decay_epochs_step=1.0, optimizers=("sgd", "adam", "lars"), val_draws=3, seed=100)


def test_settings_from_flags():
  values = flags.FlagValues()
  read = guideline_settings.define_flags(values)
  values(["prog"])
  assert read() == Settings()
  values(["prog", "--actions=increase_warmup,change_optimizer", "--budget=3",
           "--tolerance=0", "--optimizers=lars"])
  assert read() == Settings(actions=("increase_warmup", "change_optimizer"), budget=3,
                            tolerance=0.0, optimizers=("lars",))


def test_chosen_config_file_is_the_source_and_the_changes(tmp_path):
  """The file loads as main loads it, with exactly the keys of base.py, and equals the
  source config with the changes applied by hand; it follows later edits of the source."""
  source = tmp_path / "configs" / "source.py"
  source.parent.mkdir()
  source.write_text("from configs import quickstart\n\n\ndef get_config():\n"
                    "  c = quickstart.get_config()\n  c.train.num_epochs = 3\n  return c\n")
  overrides = {"parallel.num_devices": 8, "lr.policy": "grescale", INITIAL: 2.5e-4, OPT: "sgd",
               "seed": 0, "data.split_seed": 0}
  cfg = config_schema.load_config(str(source))
  cfg.data.synthetic_shape = (32, 32, 8)  # as a command-line override of the tuner
  chosen = report.chosen_config(cfg, overrides)
  out = tmp_path / "tuned"
  out.mkdir()
  path = out / "guideline_config.py"
  path.write_text(report.changes_source(str(source), chosen, "test", str(out)))
  assert "import ml_collections" not in path.read_text()  # no snapshot of every value
  expected = quickstart.get_config().to_dict()
  expected["train"]["num_epochs"], expected["data"]["synthetic_shape"] = 3, (32, 32, 8)
  expected["lr"]["policy"], expected["optim"]["lr"] = "grescale", 2.5e-4
  expected["optim"]["name"], expected["parallel"]["num_devices"] = "sgd", 8
  expected["data"]["split_seed"] = 0
  loaded = load_config(str(path))
  config_schema.check_keys(loaded, str(path))
  assert loaded.to_dict() == expected
  assert report.read_changes(str(path)) == (str(source), {
      "data.synthetic_shape": (32, 32, 8), "data.split_seed": 0, "optim.name": "sgd",
      "optim.lr": 2.5e-4, "lr.policy": "grescale", "parallel.num_devices": 8})
  source.write_text(source.read_text().replace("num_epochs = 3", "num_epochs = 5"))
  assert load_config(str(path)).train.num_epochs == 5  # the source's, not a copy


@pytest.mark.parametrize("directory, source", [
    ("large_batch", "configs/large_batch_contrast.py"),
    ("large_batch/large_batch_study_2026-11-24", "configs/large_batch_study.py"),
    ("large_batch/draws_2026-12-07/guideline8", "configs/large_batch_contrast.py"),
    ("large_batch/draws_2026-12-07/guideline16", "configs/large_batch_contrast.py"),
    ("large_batch/fcn_2026-12-07/guideline8", "configs/large_batch_contrast_fcn.py")])
def test_the_committed_chosen_config_loads_as_its_run_was_trained(directory, source):
  """benchmarks/results/large_batch/...: each chosen file is its study's config with the
  chosen run's overrides from the tuner's state."""
  directory = os.path.join(REPO, "benchmarks", "results", directory)
  path = os.path.join(directory, "guideline_config.py")
  loaded = load_config(path)
  config_schema.check_keys(loaded, path)
  state = json.loads(open(os.path.join(directory, guideline.STATE)).read())
  overrides = next(h["overrides"] for h in state["history"] if h["run"] == state["chosen"])
  expected = helpers.config(*runs.override_args(overrides), path=source)
  assert loaded.to_dict() == expected.to_dict()


def load_config(path):
  """Loads a config file the way `medseg_jax.main` does (config_flags, locked)."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
  values(["prog", f"--config={path}"])
  return values.config


TINY = TINY_RUN[1:] + ["--config.train.num_epochs=1", "--config.train.eval_every_steps=0"]


def run(*args, timeout=900):
  return subprocess.run([sys.executable, "-m", "medseg_jax.tuning.guideline", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=env_with_devices(None))


def test_tiny_real_tuning_with_two_draws_and_a_budget_of_two(tmp_path):
  """Two settings (the baseline and GreScale), each trained on validation folds 0 and 1 of
  4 (6 volumes: 1 test, 5 in the pool; folds of 2, 1, 1, 1)."""
  args = ["--config=configs/quickstart.py", "--num_devices=2", "--threshold=2", "--budget=2",
          "--val_draws=2", f"--workdir={tmp_path}", *TINY,
          "--config.data.val_fraction=0.2", "--config.data.test_fraction=0.2"]
  proc = run(*args)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  names = sorted(os.listdir(tmp_path / "runs"))
  assert names == ["00_baseline_fold0", "00_baseline_fold1", "01_grescale_fold0",
                   "01_grescale_fold1"]
  splits = {n: json.loads((tmp_path / "runs" / n / "split.json").read_text()) for n in names}
  assert splits["00_baseline_fold0"] == splits["01_grescale_fold0"]
  assert splits["00_baseline_fold0"]["test"] == splits["00_baseline_fold1"]["test"]
  assert len(splits["00_baseline_fold0"]["val"]) == 2
  assert len(splits["00_baseline_fold1"]["val"]) == 1
  assert not set(splits["00_baseline_fold0"]["val"]) & set(splits["00_baseline_fold1"]["val"])
  with open(tmp_path / "guideline.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["00_baseline", "01_grescale"]
  for r in rows:  # the table holds the mean of what each setting's two runs wrote
    tests, vals = [], []
    for fold in (0, 1):
      workdir = tmp_path / "runs" / f"{r['run']}_fold{fold}"
      tests.append(json.loads((workdir / "eval" / "test_metrics.json").read_text()))
      logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
      vals.append(next(x for x in logged if x["step"] == tests[-1]["step"] and "val_dice" in x))
    for m in ("dice", "pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
      assert float(r[f"test_{m}"]) == pytest.approx((tests[0][m] + tests[1][m]) / 2)
      assert float(r[f"val_{m}"]) == pytest.approx((vals[0][f"val_{m}"] + vals[1][f"val_{m}"]) / 2)
    assert r["val_dice_by_draw"] == " / ".join(f"{v['val_dice']:.4f}" for v in vals)
  base = json.loads((tmp_path / "runs" / "00_baseline_fold1" / "config.json").read_text())
  scaled = json.loads((tmp_path / "runs" / "01_grescale_fold1" / "config.json").read_text())
  assert base["parallel"]["num_devices"] == 1 and base["lr"]["policy"] == "standard"
  assert scaled["parallel"]["num_devices"] == 2 and scaled["lr"]["policy"] == "grescale"
  assert (base["seed"], base["data"]["fold"], base["data"]["num_folds"]) == (101, 1, 4)
  state = json.loads((tmp_path / guideline.STATE).read_text())
  assert state["status"] in ("budget_spent", "unconfirmed")
  chosen = json.loads((tmp_path / "runs" / f"{state['chosen']}_fold0" / "config.json").read_text())
  loaded = json.loads(json.dumps(load_config(str(tmp_path / "guideline_config.py")).to_dict()))
  # the chosen config is the setting's, without its draws' seeds and folds
  assert loaded == {**chosen, "seed": 0,
                    "data": {**chosen["data"], "fold": None, "num_folds": 5}}
  assert (tmp_path / "guideline.png").read_bytes()[:4] == b"\x89PNG"
  assert (tmp_path / "guideline.md").read_text().count("\n| ") == 3  # header + 2 rows
  for name in names:  # each run's manifest: its setting trained once on its draw
    manifest = json.loads((tmp_path / "runs" / name / "manifest.json").read_text())
    assert manifest["runs"]["seeds"] == [100 + int(name[-1])]
  table = (tmp_path / "guideline.csv").read_text()
  again = run(*args)  # every run is reused from the state file; nothing trains
  assert again.returncode == 0 and "training" not in again.stdout
  assert (tmp_path / "guideline.csv").read_text() == table


def test_manifests_record_how_often_the_tuner_trained_each_setting(tmp_path):
  fixed = {"parallel.num_devices": 8, "lr.policy": "grescale"}

  def setting(name, overrides, seeds):
    return {"run": name, "draws": [{"run": f"{name}_fold{d}", "overrides": {
        **overrides, "seed": seed, "data.fold": d}} for d, seed in enumerate(seeds)]}
  history = [setting("00_baseline", {"parallel.num_devices": 1}, (100, 101)),
             setting("01_grescale", fixed, (100, 101)),
             setting("02_decrease_initial_lr", {**fixed, "optim.lr": 5e-6}, (100, 101)),
             setting("03_confirm", {**fixed, "optim.lr": 5e-6}, (102, 103))]
  runs_ = [d["run"] for h in history for d in h["draws"]]
  for name in runs_:
    os.makedirs(tmp_path / name)
    (tmp_path / name / "manifest.json").write_text(json.dumps({"runs": {"count": 1}}))
  guideline.record_repeats(history, str(tmp_path))
  counts = {n: json.loads((tmp_path / n / "manifest.json").read_text())["runs"] for n in runs_}
  assert {n: (r["count"], r["seeds"]) for n, r in counts.items()} == {
      "00_baseline_fold0": (1, [100]), "00_baseline_fold1": (1, [101]),
      "01_grescale_fold0": (1, [100]), "01_grescale_fold1": (1, [101]),
      "02_decrease_initial_lr_fold0": (2, [100, 102]),
      "02_decrease_initial_lr_fold1": (2, [101, 103]),
      "03_confirm_fold0": (2, [100, 102]), "03_confirm_fold1": (2, [101, 103])}
  assert counts["03_confirm_fold1"]["tool"] == "medseg_jax.tuning.guideline"
  assert "seeds" in (tmp_path / "03_confirm_fold1" / "MANIFEST.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--num_devices=0"], "--num_devices=0"),
    (["--num_devices=8", "--budget=1"], "--budget=1"),
    (["--num_devices=8", "--comparison=best"], "--comparison=best"),
    (["--num_devices=8", "--tolerance=small"], "--tolerance=small"),
    (["--num_devices=8", "--config.guideline.budget=3"], "guideline"),
])
def test_bad_flags_are_one_line(tmp_path, args, message):
  proc = run("--config=configs/quickstart.py", f"--workdir={tmp_path}", *args, timeout=120)
  assert proc.returncode == 2 and message in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "runs").exists()


def test_help_lists_every_setting():
  proc = run("--help", timeout=120)
  assert "error:" not in proc.stderr
  for name in ["config", "workdir", "num_devices", *Settings.__dataclass_fields__]:
    assert f"--{name}:" in proc.stdout, name


def test_decisions_use_the_mean_over_the_draws_and_say_where_they_disagree(tmp_path):
  """Fold 0 alone would have GreScale reach the baseline (0.95 against 0.90); the mean over
  the three folds (0.95, 0.84, 0.86: 0.8833) does not. Halving the LR scores 0.91, 0.89,
  0.90 (mean 0.90): it ties the baseline and is confirmed."""
  by_fold = {"grescale": (0.95, 0.84, 0.86), "halved": (0.91, 0.89, 0.90)}

  def score(o):
    return by_fold["halved" if o[INITIAL] < 2e-3 else "grescale"][o["data.fold"]]
  fake = Fake(score)
  tuner, status = tune(settings(val_draws=3, seed=100, tolerance=0.002), fake, tmp_path)
  assert status == "confirmed"
  assert actions(tuner) == ["baseline", "grescale", "decrease_initial_lr", "confirm"]
  assert [h["result"]["val"]["dice"] for h in tuner.history] == pytest.approx(
      [0.9, sum(by_fold["grescale"]) / 3, 0.9, 0.9])
  assert [h["result"]["test"]["dice"] for h in tuner.history] == pytest.approx(
      [0.89, sum(by_fold["grescale"]) / 3 - 0.01, 0.89, 0.89])
  # GreScale against the baseline by fold: +0.05, -0.06, -0.04
  assert tuner.history[1]["decision"] == "start; draws disagree: +0.0500, -0.0600, -0.0400"
  assert tuner.history[2]["decision"] == (
      "reaches the baseline; draws disagree: +0.0100, -0.0100, +0.0000")
  assert tuner.chosen == "02_decrease_initial_lr"
  assert "seed" not in tuner.chosen_overrides()
  assert "data.fold" not in tuner.chosen_overrides()
  report_md = report.markdown(report.table_rows(tuner.history), "t", "n")
  assert "| 0.9500 / 0.8400 / 0.8600 |" in report_md


DIVERGED = "error: training diverged at step 121 (learning rate 0.03): mean loss 29.73"


class Diverging(Fake):
  """A Fake whose runs with `diverges(overrides)` stop as the divergence guard stops them
  (the trainer's record of such a run: no metrics, its error line)."""

  def __init__(self, score, diverges, baseline=0.9):
    super().__init__(score, baseline)
    self.diverges = diverges

  def __call__(self, name, overrides):
    if self.diverges(overrides):
      self.calls.append((name, overrides))
      none = dict.fromkeys(metrics(0.0)["val"])
      return {"val": none, "test": dict(none), "diverged": DIVERGED}
    return super().__call__(name, overrides)


def test_a_setting_that_diverges_is_dropped_after_its_first_draw_and_the_search_goes_on(
    tmp_path):
  """Halving the LR diverges on fold 0 (three draws): folds 1 and 2 are not trained, the
  setting is not better, and the next action (a larger decay coefficient: 0.95 on every
  fold) reaches the baseline and is confirmed."""
  fake = Diverging(lambda o: 0.95 if o[COEF] > 0.15 else 0.8,
                   lambda o: o.get(INITIAL, 1) < 2e-3)
  g = settings(val_draws=3, seed=100)
  tuner, status = tune(g, fake, tmp_path)
  assert status == "confirmed" and tuner.chosen == "03_increase_decay_coefficient"
  assert [n for n, _ in fake.calls if "decrease_initial_lr" in n] == [
      "02_decrease_initial_lr_fold0"]
  halved = tuner.history[2]
  assert halved["result"]["val"]["dice"] is None and len(halved["draws"]) == 1
  assert halved["decision"] == (f"diverged (02_decrease_initial_lr_fold0: {DIVERGED}): "
                                "not better: next action")
  report_md = report.markdown(report.table_rows(tuner.history), "t", "n")
  assert "diverged (02_decrease_initial_lr_fold0" in report_md
  resumed = Diverging(lambda o: 0.0, lambda o: True)  # the state file has every run
  tuner, status = tune(g, resumed, tmp_path)
  assert status == "confirmed" and resumed.calls == []


def test_a_baseline_that_diverges_is_one_error(tmp_path):
  fake = Diverging(lambda o: 0.8, lambda o: o["parallel.num_devices"] == 1)
  with pytest.raises(ConfigError, match=r"^the baseline diverged on one device \(00_baseline: "
                     r"error: training diverged at step 121 .*\): nothing to scale; lower "
                     r"optim.lr$"):
    tune(settings(), fake, tmp_path)


@pytest.mark.parametrize("val", [None, dict.fromkeys(metrics(0.0)["val"])])
def test_a_run_without_validation_metrics_is_one_error_unless_it_diverged(tmp_path, val):
  """A run that did not diverge but has no validation Dice (no validation split) stops the
  tuner with the hint to decide on test; a diverged run's None metrics do not (above)."""
  class NoValidation(Fake):
    def __call__(self, name, overrides):
      return {**super().__call__(name, overrides), "val": val}
  with pytest.raises(DataError, match=r"^run 00_baseline has no val metrics; use --split=test "
                     r"if the config has no validation split$"):
    tune(settings(), NoValidation(lambda o: 0.8), tmp_path)


def test_the_trainer_returns_a_diverged_run_as_such(tmp_path):
  """A run whose directory records the divergence guard's stop (runs.DIVERGED, its best
  checkpoint evaluated) is not trained again: the tuner gets its error, no metrics."""
  workdir = tmp_path / "runs" / "03_change_optimizer"
  workdir.mkdir(parents=True)
  (workdir / runs.DIVERGED).write_text(json.dumps({"error": DIVERGED, "evaluated": False}))
  train = runs.trainer(["--config=configs/quickstart.py"], str(tmp_path / "runs"), 0,
                       "guideline")
  result = train("03_change_optimizer", {"optim.name": "adam"})
  assert result == {"val": dict.fromkeys(runs.METRICS), "test": dict.fromkeys(runs.METRICS),
                    "diverged": DIVERGED}


def test_val_draws_need_folds_to_draw_from():
  cfg = quickstart.get_config()
  assert guideline.draw_folds(cfg, 3) == 6      # round(0.85 / 0.15)
  assert guideline.draw_folds(cfg, 8) == 8      # at least as many folds as draws
  cfg.data.fold, cfg.data.num_folds = 1, 5      # the config's own folds
  assert guideline.draw_folds(cfg, 3) == 5
  with pytest.raises(ConfigError, match=r"^--val_draws=6: more than the config's data.num_folds=5"):
    guideline.draw_folds(cfg, 6)
  cfg = quickstart.get_config()
  cfg.data.val_fraction = 0.0
  with pytest.raises(ConfigError, match=r"^--val_draws=3: data.val_fraction is 0"):
    guideline.Tuner(cfg, 8, Fake(lambda o: 0.5), "unused", settings(val_draws=3))
