"""The GreScale guideline, automated: scale a config to K devices without losing accuracy.

    python -m medseg_jax.tuning.guideline --config=configs/unet_brats.py --num_devices=K \\
        --workdir=DIR [--budget=N] [--threshold=T] [--SETTING=VALUE ...]

1. The baseline: the config on one device at the reference batch.
2. GreScale with the config's `optim.lr` (the base LR eta, the thesis's "initial LR")
   and `lr.grescale` values (the defaults) at K devices, LR scaled linearly. Below
   `--threshold` devices that is the answer.
3. Otherwise the ordered actions of `--actions`, one fixed step per setting, each applied
   to the best settings so far: a setting that beats them becomes the new best and the
   same action is repeated; one that does not is dropped and the next action comes. A
   tie (a difference below `--tolerance`) keeps the best so far, the smaller change.
   It stops when a setting reaches the baseline (then the same settings train once more
   with fresh seeds: the model validation), when the actions are exhausted, or when
   `--budget` settings (the baseline included) are spent.

Every setting trains once per validation draw (`--val_draws`, default 3): draw d is fold
d of the subjects outside the test split (`data.fold`, each fold the size of the config's
validation split) with seed `--seed` + d, and the setting's metrics are the means over
its draws. Every run keeps the config's `data.split_seed` (unset: its `seed`), so the
test split is the same in all of them and in the scaling study, and the deciding and
confirming seeds (100, 101, ... by default) are apart from the study's (0, 1, ...).
Where the draws disagree on the sign of a Dice difference, the decision says so; a setting
with a diverged run is worse than any other, its other draws not trained.

Decisions compare the metrics of `--split` (default `val`: the validation metrics of
each run's tested checkpoint), by `--comparison`, with differences below `--tolerance`
as ties; the test metrics are reported beside them and decide nothing. The tuner's
settings are its own flags (`Settings`). Every run is a normal run in DIR/runs/<name>;
its state is DIR/guideline_state.json, so an interrupted tuner continues where it stopped.
"""

import functools
import json
import math
import os
import sys
from typing import Callable

import ml_collections
from absl import flags

from medseg_jax import cli, files, optim
from medseg_jax.data import split
from medseg_jax.monitor import manifest
from medseg_jax.errors import ConfigError, DataError
from medseg_jax.tuning import actions, guideline_settings, report, runs
from medseg_jax.tuning.guideline_settings import Settings

Metrics = dict[str, float | None]
Result = dict[str, Metrics | None]       # {"val": ..., "test": ...}
Trainer = Callable[[str, dict], Result]  # (run name, config overrides) -> result
STATE = "guideline_state.json"
SPLITS = ("val", "test")
STATUS = {
    "below_threshold": "fewer devices than the threshold: GreScale defaults, trained once",
    "confirmed": "reached the baseline, confirmed by a run with another seed",
    "not_confirmed": "reached the baseline, but the run with another seed did not",
    "unconfirmed": "reached the baseline; no budget left for the confirming run",
    "actions_exhausted": "actions exhausted before reaching the baseline",
    "budget_spent": "budget spent before reaching the baseline",
}


def _value(metrics: Metrics, key: str) -> float:
  value = metrics.get(key)
  return -math.inf if value is None else float(value)


def lexicographic(keys: tuple[str, ...], a: Metrics, b: Metrics, tolerance: float) -> int:
  """+1 if `a` is better than `b`, -1 if worse, 0 if a tie: the first key whose values
  differ by `tolerance` or more decides (smaller differences are ties)."""
  for key in keys:
    x, y = _value(a, key), _value(b, key)
    if x != y and abs(x - y) >= tolerance:
      return 1 if x > y else -1
  return 0


COMPARISONS: dict[str, Callable[[Metrics, Metrics, float], int]] = {
    "dice_macc_miou": functools.partial(lexicographic, ("dice", "mean_accuracy", "mean_iou")),
    "dice": functools.partial(lexicographic, ("dice",)),
    "mean_iou": functools.partial(lexicographic, ("mean_iou",)),
}


def check_settings(g: Settings, cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError for a setting that cannot be used with `cfg` at `num_devices`."""
  if num_devices < 1:
    raise ConfigError(f"--num_devices={num_devices}: must be at least 1")
  if g.comparison not in COMPARISONS:
    raise ConfigError(f"--comparison={g.comparison}: choose from {sorted(COMPARISONS)}")
  unknown = [a for a in g.actions if a not in actions.ACTIONS]
  if unknown:
    raise ConfigError(f"--actions: unknown {unknown}, choose from {list(actions.ACTIONS)}")
  bad = [o for o in g.optimizers if o not in optim.OPTIMIZERS]
  if bad:
    raise ConfigError(f"--optimizers: unknown {bad}, choose from {list(optim.OPTIMIZERS)}")
  if g.split not in SPLITS:
    raise ConfigError(f"--split={g.split}: choose from {list(SPLITS)}")
  checks = {"budget": g.budget >= 2, "threshold": g.threshold >= 1, "tolerance": g.tolerance >= 0,
            "val_draws": g.val_draws >= 1, "seed": g.seed >= 0,
            "initial_lr_factor": 0 < g.initial_lr_factor < 1,
            "decay_coefficient_step": g.decay_coefficient_step > 0,
            "warmup_epochs_step": g.warmup_epochs_step > 0,
            "decay_epochs_step": g.decay_epochs_step > 0}
  limits = {"budget": "at least 2 (the baseline and the GreScale run)", "threshold": "at least 1",
            "val_draws": "at least 1", "seed": "at least 0",
            "tolerance": "not negative", "initial_lr_factor": "between 0 and 1"}
  for key, ok in checks.items():
    if not ok:
      raise ConfigError(f"--{key}={getattr(g, key)}: must be {limits.get(key, 'positive')}")
  if num_devices >= g.threshold and "increase_decay_period" in g.actions:
    actions.decay_epochs(actions.start_params(cfg), cfg)
  if g.val_draws > 1:
    draw_folds(cfg, g.val_draws)


def draw_folds(cfg: ml_collections.ConfigDict, draws: int) -> int:
  """The number of folds the validation draws take folds 0..draws-1 of: the config's own
  (data.num_folds) when it sets data.fold; else as many as make each fold the size of its
  validation split (4 for 20% validation and 20% test), and at least `draws`."""
  if cfg.data.fold is not None:
    if draws > cfg.data.num_folds:
      raise ConfigError(f"--val_draws={draws}: more than the config's data.num_folds="
                        f"{cfg.data.num_folds}")
    return cfg.data.num_folds
  if not cfg.data.val_fraction:
    raise ConfigError(f"--val_draws={draws}: data.val_fraction is 0, so there are no "
                      "validation folds to draw; use --val_draws=1 with --split=test")
  return max(draws, round((1 - cfg.data.test_fraction) / cfg.data.val_fraction))


def _settings(cfg: ml_collections.ConfigDict, num_devices: int) -> dict:
  """What the runs depend on (the tuner's settings only steer decisions), as JSON."""
  return json.loads(json.dumps({"config": cfg.to_dict(), "num_devices": num_devices}))


def _first_difference(a, b, path: str = "") -> str:
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key):
        return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
  return f"{path}: {b!r} there, {a!r} now"


class Tuner:
  """Runs the guideline with `trainer`, keeping its state in WORKDIR/guideline_state.json."""

  def __init__(self, cfg: ml_collections.ConfigDict, num_devices: int, trainer: Trainer,
               workdir: str, settings: Settings = Settings(),
               say: Callable[[str], None] = lambda line: None):
    check_settings(settings, cfg, num_devices)
    self.cfg, self.k, self.trainer, self.say = cfg, num_devices, trainer, say
    self.g = settings
    self.path = os.path.join(workdir, STATE)
    self.settings = _settings(cfg, num_devices)
    self.num_folds = draw_folds(cfg, settings.val_draws) if settings.val_draws > 1 else None
    self.done = self._load()   # run name -> {"overrides", "result"} of every finished run
    self.history: list[dict] = []
    self.status = self.chosen = self.baseline = None

  def _load(self) -> dict:
    state = files.read_json(self.path, "the guideline's state", missing_ok=True)
    if state is None:
      return {}
    try:
      settings, done = state["settings"], state["runs"]
    except (TypeError, KeyError) as e:
      raise DataError(f"{self.path}: not a guideline state file (no settings and runs)") from e
    if settings != self.settings:
      raise ConfigError(f"{self.path}: written for other settings "
                        f"({_first_difference(self.settings, settings)}); "
                        "use another --workdir")
    return done

  def _save(self) -> None:
    files.write_json(self.path, {"settings": self.settings, "runs": self.done,
                                 "history": self.history, "status": self.status,
                                 "chosen": self.chosen})

  def _train(self, action: str, setting: dict, changed: str = "",
             first_seed: int | None = None) -> Result:
    """The mean result of `setting` over its draws (a diverged one is the last), in history."""
    base = f"{len(self.history):02d}_{action}"
    setting = json.loads(json.dumps(setting))
    draws = []
    for draw in self._draws(self.g.seed if first_seed is None else first_seed):
      name = base if self.g.val_draws == 1 else f"{base}_fold{draw['data.fold']}"
      draws.append({"run": name, **self._draw_result(name, {**setting, **draw}, changed)})
      if "diverged" in draws[-1]["result"]:
        break
    result = mean_result([d["result"] for d in draws])
    if "diverged" in draws[-1]["result"]:  # the last draw trained
      result["diverged"] = f"{draws[-1]['run']}: {draws[-1]['result']['diverged']}"
    self.history.append({"run": base, "action": action, "changed": changed, "decision": "",
                         "overrides": setting, "draws": draws, "result": result})
    self._save()
    return result

  def _draw_result(self, name: str, overrides: dict, changed: str) -> dict:
    record = self.done.get(name)
    if record is not None and record["overrides"] != overrides:
      raise ConfigError(f"{self.path}: run {name} was trained with other settings "
                        f"({_first_difference(overrides, record['overrides'])}); "
                        "use another --workdir")
    if record is None:
      self.say(f"{name}: training" + (f" ({changed})" if changed else ""))
      record = {"overrides": overrides, "result": self.trainer(name, overrides)}
      self.done[name] = record
      self._save()
    result = record["result"]  # a diverged run's metrics are all None, by design
    if "diverged" not in result and (result.get(self.g.split) or {}).get("dice") is None:
      raise DataError(f"run {name} has no {self.g.split} metrics; "
                      "use --split=test if the config has no validation split")
    return record

  def _draws(self, first_seed: int) -> list[dict]:
    """The overrides of each validation draw: its seed and, with several draws, fold d."""
    if self.g.val_draws == 1:
      return [{"seed": first_seed}]
    return [{"seed": first_seed + d, "data.fold": d, "data.num_folds": self.num_folds}
            for d in range(self.g.val_draws)]

  def _compare(self, a: Result, b: Result) -> int:
    split = self.g.split
    return COMPARISONS[self.g.comparison](a[split], b[split], self.g.tolerance)

  def _decide(self, decision: str, against: dict | None = None) -> None:
    """Records the last setting's decision; when the draws of it and of `against` (a
    history entry) disagree in the sign of their Dice difference, the decision says so."""
    last = self.history[-1]
    if against is not None:
      decision += disagreement(last["draws"], against["draws"], self.g.split)
    if "diverged" in last["result"]:
      decision = f"diverged ({last['result']['diverged']}): {decision}"
    last["decision"] = decision
    dice = last["result"][self.g.split]["dice"]
    shown = "" if dice is None else f"{self.g.split} Dice {dice:.4f} -> "
    self.say(f"{last['run']}: {shown}{decision}")

  def _split(self) -> dict:
    """The config's split seed, which every run keeps: the test split is always the same."""
    return {"data.split_seed": split.split_seed(self.cfg)}

  def _overrides(self, params: actions.Params) -> dict:
    return {"parallel.num_devices": self.k, "lr.policy": "grescale", "lr.scaling": "linear",
            **params, **self._split()}

  def run(self) -> str:
    """Runs the guideline to its end; returns the status (a key of STATUS)."""
    reference = self.cfg.lr.reference_batch_size or self.cfg.train.per_device_batch_size
    base = self._train("baseline", {"parallel.num_devices": 1,
                                    "train.per_device_batch_size": reference, **self._split()})
    if "diverged" in base:
      raise ConfigError(f"the baseline diverged on one device ({base['diverged']}): "
                        "nothing to scale; lower optim.lr")
    self._decide("baseline")
    self.baseline = self.history[-1]
    params = actions.start_params(self.cfg)
    current = self._train("grescale", self._overrides(params))
    self.chosen = self.history[-1]["run"]
    if self.k < self.g.threshold:
      self._decide("chosen")
      self.status = "below_threshold"
    else:
      self._decide("start", self.baseline)
      self.status = self._iterate(base, params, current)
    self._save()
    return self.status

  def _iterate(self, base: Result, params: actions.Params, current: Result) -> str:
    order, index, tries = list(self.g.actions), 0, 0
    best = self.history[-1]
    while self._compare(current, base) < 0:
      if index == len(order):
        return "actions_exhausted"
      trial_params = actions.ACTIONS[order[index]](params, self.cfg, self.g, tries)
      if trial_params is None:
        index, tries = index + 1, 0
        continue
      if len(self.history) >= self.g.budget:
        return "budget_spent"
      trial = self._train(order[index], self._overrides(trial_params),
                          actions.describe_change(params, trial_params))
      reaches = self._compare(trial, base) >= 0
      if reaches or self._compare(trial, current) > 0:
        self._decide("reaches the baseline" if reaches else "better: repeat the action",
                     self.baseline if reaches else best)
        params, current, tries = trial_params, trial, tries + 1
        self.chosen, best = self.history[-1]["run"], self.history[-1]
      else:  # a tie keeps the setting with fewer changes
        self._decide("not better: next action", best)
        index, tries = index + 1, 0
    return self._confirm(base, params)

  def _confirm(self, base: Result, params: actions.Params) -> str:
    """The model validation: the chosen settings again, with fresh seeds (the ones after
    the deciding runs'), against the baseline."""
    if len(self.history) >= self.g.budget:
      return "unconfirmed"
    seed = self.g.seed + self.g.val_draws
    seeds = (f"{self.g.seed} → {seed}" if self.g.val_draws == 1 else
             f"{self.g.seed}-{seed - 1} → {seed}-{seed + self.g.val_draws - 1}")
    result = self._train("confirm", self._overrides(params), f"seed: {seeds}", seed)
    confirmed = self._compare(result, base) >= 0
    self._decide("reaches the baseline" if confirmed else "below the baseline", self.baseline)
    return "confirmed" if confirmed else "not_confirmed"

  def chosen_overrides(self) -> dict:
    """The chosen setting's config overrides (its draws' seeds and folds are not part of
    it)."""
    return _chosen(self.history, self.chosen)


def _chosen(history: list[dict], chosen: str | None) -> dict | None:
  """The config overrides of the run named `chosen` in `history` (None if absent)."""
  return next((h["overrides"] for h in history if h["run"] == chosen), None)


def mean_result(results: list[Result]) -> Result:
  """The mean of each metric of each split over the draws' results (None where a draw
  has none)."""
  mean: Result = {}
  for split_name in SPLITS:
    per_draw = [r.get(split_name) for r in results]
    if any(m is None for m in per_draw):
      mean[split_name] = None
      continue
    mean[split_name] = {k: (None if any(m.get(k) is None for m in per_draw)
                            else sum(m[k] for m in per_draw) / len(per_draw))
                        for k in per_draw[0]}
  return mean


def disagreement(draws: list[dict], others: list[dict], split_name: str) -> str:
  """"" when the Dice differences between paired draws share a sign (or there is one
  draw); else what the report says: "; draws disagree: +0.0040, -0.0020"."""
  if any(d["result"][split_name]["dice"] is None for d in [*draws, *others]):
    return ""  # a diverged draw has no difference to sign
  differences = [a["result"][split_name]["dice"] - b["result"][split_name]["dice"]
                 for a, b in zip(draws, others)]
  if len(differences) < 2 or not (min(differences) < 0 < max(differences)):
    return ""
  return "; draws disagree: " + ", ".join(f"{d:+.4f}" for d in differences)


def record_repeats(history: list[dict], runs_dir: str) -> None:
  """Records in each run's manifest how often the tuner trained its settings on its draw
  (the chosen settings twice when the model validation ran), with which seeds."""
  def key(draw: dict) -> str:
    return json.dumps({k: v for k, v in draw["overrides"].items() if k != "seed"},
                      sort_keys=True)
  draws = [d for h in history for d in h["draws"]]
  seeds: dict[str, list[int]] = {}
  for d in draws:
    seeds.setdefault(key(d), []).append(d["overrides"]["seed"])
  for d in draws:
    manifest.record_repeats(os.path.join(runs_dir, d["run"]), seeds[key(d)],
                            "medseg_jax.tuning.guideline", d["run"])


def _cli() -> None:
  """The command: flags, then the tuner, then its reports; errors are one line."""
  config = cli.config_flag()
  workdir = flags.DEFINE_string("workdir", None, "Directory of the tuner: its runs and outputs.")
  devices = flags.DEFINE_integer("num_devices", None, "Devices (workers) K to scale to.")
  cpu = flags.DEFINE_integer("cpu_devices", -1, "Simulated CPU devices per run: -1 = K when "
                             "the machine has no accelerator, 0 = none (the real devices).")
  settings = guideline_settings.define_flags()
  for module in (cli, guideline_settings):  # their flags are this command's: in --help
    flags.adopt_module_key_flags(module)

  def check() -> None:
    if not workdir.value:
      cli.fail("--workdir is required", 2)
    if devices.value is None or devices.value < 1:
      cli.fail(f"--num_devices={devices.value}: a positive number of devices is required", 2)

  def main() -> None:
    cfg, k = config.value, devices.value
    trainer = runs.trainer(cli.config_args(sys.argv), os.path.join(workdir.value, "runs"),
                           runs.cpu_devices(cpu.value, k), "guideline")
    tuner = Tuner(cfg, k, trainer, workdir.value, settings(),
                  lambda line: print(f"[guideline] {line}", flush=True))
    status = tuner.run()
    record_repeats(tuner.history, os.path.join(workdir.value, "runs"))
    doc = (f"GreScale settings for {k} devices chosen by medseg_jax.tuning.guideline "
           f"(run {tuner.chosen}: {STATUS[status]}).")
    chosen = report.changes_source(flags.FLAGS["config"].config_filename,
                                   report.chosen_config(cfg, tuner.chosen_overrides()), doc,
                                   workdir.value)
    print(report.write(workdir.value, tuner.history, STATUS[status], tuner.g.split, chosen))

  cli.run(main, check)


if __name__ == "__main__":
  _cli()
