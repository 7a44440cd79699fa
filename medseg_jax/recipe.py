"""The whole recipe on a new dataset, one resumable command:

    python -m medseg_jax.recipe --data=ROOT --workdir=DIR [--configurations=2d,3d]
        [--num_folds=5] [--budget=10m] [--memory=GIB] [--num_devices=N]
        [--override=KEY=VALUE ...]

1. plan: the fingerprint and the plan of each configuration (`medseg_jax.plan`) in
   DIR/plans;
2. folds: each configuration cross-validated (`tuning.crossval`) in DIR/cv_<c>, which also
   decides its mirroring and post-processing out of fold;
3. choose: the best configuration or pair of them (`tuning.best`), DIR/best.json;
4. export: every fold of the chosen configuration(s), each with its configuration's
   mirroring and post-processing, bundled into one ensemble file, DIR/model.zip;
5. report: DIR/recipe.md and DIR/recipe.png.

Every stage is a command of its own run as a process, and skips what is done, so the same
command continues an interrupted recipe. `--override=KEY=VALUE` reaches every training
run as `--config.KEY=VALUE` (e.g. a shorter run). DIR/recipe_state.json holds each
stage's seconds.
"""

import os
import subprocess
import sys
import time

from absl import flags

from medseg_jax import cli, files
from medseg_jax.errors import ConfigError, MedsegError
from medseg_jax.export import write
from medseg_jax.planning import written
from medseg_jax.tuning import crossval, report

STATE, REPORT, MODEL = "recipe_state.json", "recipe.md", "model.zip"


def _step(args: list[str], log: str) -> None:
  """Runs `python -m ARGS`, its output appended to `log`; a failure is one MedsegError."""
  with open(log, "a") as out:
    code = subprocess.run([sys.executable, "-m", *args], stdout=out,
                          stderr=subprocess.STDOUT).returncode
  if code:
    raise MedsegError(f"{args[0]} failed with exit code {code}; see {log}")


class Recipe:
  """The stages over DIR, each timed into DIR/recipe_state.json."""

  def __init__(self, workdir: str, data: str, configurations: list[str], num_folds: int,
               plan_args: list[str], overrides: list[str]):
    self.dir, self.data, self.configurations = workdir, data, configurations
    self.num_folds, self.plan_args = num_folds, plan_args
    self.overrides = [f"--config.{o}" for o in overrides]
    self.log = os.path.join(workdir, "recipe.log")
    self.state = files.read_json(os.path.join(workdir, STATE), "the recipe's state",
                                 missing_ok=True) or {"seconds": {}}

  def stage(self, name: str, work) -> None:
    print(f"[recipe] {name}", flush=True)
    started = time.perf_counter()
    work()
    seconds = self.state["seconds"]
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
    files.write_json(os.path.join(self.dir, STATE), self.state)

  def plan_path(self, c: str) -> str:
    return os.path.join(self.dir, "plans", f"plan_{c}.py")

  def cv_dir(self, c: str) -> str:
    return os.path.join(self.dir, f"cv_{c}")

  def plan(self) -> None:
    """The plans of the configurations asked for that are not there yet (a plan already
    made stays as its folds trained it)."""
    missing = [c for c in self.configurations if not os.path.exists(self.plan_path(c))]
    if missing:
      _step(["medseg_jax.plan", f"--data={self.data}", f"--configurations={','.join(missing)}",
             f"--output={os.path.join(self.dir, 'plans')}", *self.plan_args], self.log)

  def folds(self) -> None:
    for c in self.configurations:
      _step(["medseg_jax.tuning.crossval", f"--config={self.plan_path(c)}",
             f"--workdir={self.cv_dir(c)}", f"--config.data.num_folds={self.num_folds}",
             *self.overrides], self.log)

  def choose(self) -> None:
    _step(["medseg_jax.tuning.best",
           f"--crossval={','.join(self.cv_dir(c) for c in self.configurations)}",
           f"--output={self.dir}"], self.log)

  def export(self) -> None:
    """Each fold of the chosen configurations as a model file with its configuration's
    out-of-fold decisions, then one ensemble file of them all."""
    chosen = files.read_json(os.path.join(self.dir, "best.json"), "the best configuration")
    paths = []
    for cv in chosen["chosen"]:
      c = os.path.basename(cv).removeprefix("cv_")
      decided = files.read_json(os.path.join(cv, crossval.RESULT), "a cross-validation")
      inference = decided["mirroring"]["overrides"] + decided["postprocessing"]["overrides"]
      for fold in crossval.evaluated_folds(cv):
        path = os.path.join(self.dir, "export", f"{c}_fold{fold}.zip")
        if not os.path.exists(path):
          _step(["medseg_jax.main", "--mode=export", f"--config={self.plan_path(c)}",
                 f"--config.data.num_folds={self.num_folds}", f"--config.data.fold={fold}",
                 *self.overrides, *inference, f"--workdir={crossval.fold_dir(cv, fold)}",
                 "--checkpoint=latest", f"--output={path}"], self.log)
        paths.append(path)
    write.bundle(paths, os.path.join(self.dir, MODEL), os.path.basename(
        os.path.abspath(self.dir)))

  def report(self) -> None:
    files.write_text(os.path.join(self.dir, REPORT), report_text(self))
    report_plot(self, os.path.join(self.dir, "recipe.png"))


def report_text(recipe: Recipe) -> str:
  """The recipe's Markdown report: per-fold Dice, the out-of-fold decisions, the choice,
  the time of each stage."""
  best = files.read_json(os.path.join(recipe.dir, "best.json"), "the best configuration")
  lines = [f"# Recipe: {recipe.data}", "",
           "| configuration | folds | fold Dice (foreground) | mean | mirrored | "
           "post-processed |", "|---|---|---|---|---|---|"]
  for c in recipe.configurations:
    cv = files.read_json(os.path.join(recipe.cv_dir(c), crossval.RESULT), "a cross-validation")
    folds = " / ".join(f"{f['dice_foreground']:.4f}" for f in cv["folds"])
    m, p = cv["mirroring"], cv["postprocessing"]
    lines.append(f"| {c} | {len(cv['folds'])} | {folds} | {cv['mean']['dice_foreground']:.4f} | "
                 f"{m['mean_dice']['off']:.4f} → {m['mean_dice']['on']:.4f} "
                 f"({'on' if m['mirror'] else 'off'}) | {p['mean_dice']['none']:.4f} → "
                 f"{p['mean_dice']['chosen']:.4f} |")
  lines += ["", "Out-of-fold mean foreground Dice of each candidate (tuning.best):", ""]
  lines += [f"- {' + '.join(os.path.basename(m) for m in c['members'])}: {c['dice']:.4f}"
            for c in best["candidates"]]
  lines += ["", f"Chosen: {' + '.join(os.path.basename(m) for m in best['chosen'])}; its "
            f"folds are in `{MODEL}`.", "", "| stage | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.0f} |" for k, v in recipe.state["seconds"].items()]
  return "\n".join(lines) + "\n"


def report_plot(recipe: Recipe, path: str) -> None:
  """Per-fold foreground Dice of each configuration."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for i, c in enumerate(recipe.configurations):
    cv = files.read_json(os.path.join(recipe.cv_dir(c), crossval.RESULT), "a cross-validation")
    ax.plot([f["fold"] for f in cv["folds"]], [f["dice_foreground"] for f in cv["folds"]],
            "o-", label=f"{c} (mean {cv['mean']['dice_foreground']:.3f})", color=f"C{i}")
  ax.set_xlabel("fold")
  ax.set_ylabel("out-of-fold foreground Dice")
  ax.legend(fontsize=8)
  report.save_figure(fig, path)


def _cli() -> None:
  data = flags.DEFINE_string("data", None, "The dataset: a Decathlon task directory.")
  workdir = flags.DEFINE_string("workdir", None, "Directory of every stage's outputs.")
  configurations = flags.DEFINE_list("configurations", list(written.CONFIGURATIONS),
                                     "The planned configurations to cross-validate.")
  num_folds = flags.DEFINE_integer("num_folds", 5, "Cross-validation folds.", lower_bound=2)
  budget = flags.DEFINE_string("budget", "", "The planner's --budget: each run's wall time.")
  memory = flags.DEFINE_float("memory", 0.0, "The planner's --memory (GiB per device).")
  devices = flags.DEFINE_integer("num_devices", 0, "The planner's --num_devices; 0 = the "
                                 "devices JAX sees here.", lower_bound=0)
  overrides = flags.DEFINE_multi_string("override", [], "KEY=VALUE: --config.KEY=VALUE for "
                                        "every training run.")

  def check() -> None:
    if not data.value or not workdir.value:
      cli.fail("--data and --workdir are required", 2)
    if error := written.configurations_error(configurations.value):
      cli.fail(error, 2)
    wrong = [o for o in overrides.value if "=" not in o]
    if wrong:
      cli.fail(f"--override={wrong[0]}: KEY=VALUE", 2)

  def main() -> None:
    if not os.path.isfile(os.path.join(data.value, "dataset.json")):
      raise ConfigError(f"--data={data.value}: no dataset.json there")
    os.makedirs(workdir.value, exist_ok=True)
    plan_args = ([f"--budget={budget.value}"] if budget.value else []) + (
        [f"--memory={memory.value}"] if memory.value else []) + (
        [f"--num_devices={devices.value}"] if devices.value else [])
    recipe = Recipe(workdir.value, data.value, configurations.value, num_folds.value,
                    plan_args, overrides.value)
    for name in ("plan", "folds", "choose", "export", "report"):
      recipe.stage(name, getattr(recipe, name))
    print(f"[recipe] {os.path.join(workdir.value, MODEL)}; "
          f"{os.path.join(workdir.value, REPORT)}")

  cli.run(main, check)


if __name__ == "__main__":
  _cli()
