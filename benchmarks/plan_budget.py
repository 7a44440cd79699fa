"""Planned runs against the hand-set 3D quickstart at the same training time, paired by
seed: the 3D plan and the 2D plan made with `--budget`, and configs/quickstart_3d.py with as
many steps as the same share of the budget holds at its own timed step.

    python benchmarks/plan_budget.py --budget=10m --seeds=0,1,2     # resumable
    python benchmarks/plan_budget.py --dataset=ct_aniso --out=runs/plan_budget_ct
    python benchmarks/plan_budget.py --dataset=ct_aniso --out=runs/plan_budget_ct \
        --plans=benchmarks/results/plan_budget/plan_budget_ct_epyc   # a committed plan set

Writes a synthetic dataset (`--dataset`: `mri`, the quickstart's phantoms at 1 x 1 x 2 mm;
`ct_aniso`, CT-like phantoms at 0.8 x 0.8 x 3 mm whose shapes vary by up to 20%; their three
classes for every setting) to OUT/data, plans it
once (timing steps: run it on an idle machine), then trains every (seed, setting) in its own
workdir; a workdir whose run finished is read, not run again, so a stopped study resumes.
`--plans=DIR` trains a plan set made before (DIR/plans and DIR/prepared.json, as OUT holds
them) instead of planning, on the dataset written anew (the same generator and seed), so a
study continues on another machine with the plans and step counts timed on the first.
The runs' steps are fixed before they start: their results do not depend on the machine's
load while they train. Prints one JSON line and a table of test mean foreground Dice with
the paired differences (Student's t, 95%).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("plan_3d", "plan_2d", "quickstart_3d")
DATASETS = {"mri": {"shape": (64, 64, 32)},
            "ct_aniso": {"shape": (96, 96, 16), "spacing": (0.8, 0.8, 3.0),
                         "shape_jitter": 0.2, "modality": "CT"}}


def run(args: list[str], log: str) -> None:
  """A command of this repository, its output to `log`; raises on a non-zero exit."""
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(f"{' '.join(args)} failed with {proc.returncode}: see {log}")


def prepare(out: str, volumes: int, budget: str, dataset: str, made: str = "") -> dict:
  """The dataset, its plans and the quickstart's step count for the budget (timed once, or
  read from `made`, a plan set made before)."""
  sys.path.insert(0, REPO)
  from medseg_jax.data import synthetic
  data = os.path.join(out, "data")
  if not os.path.exists(data):
    synthetic.write_synthetic_decathlon(data, num_training=volumes, num_test=0,
                                        **DATASETS[dataset])
  plans = os.path.join(out, "plans")
  info_path = os.path.join(out, "prepared.json")
  if os.path.exists(info_path):
    return json.load(open(info_path))
  if made:
    shutil.copytree(os.path.join(made, "plans"), plans)
    info = {**json.load(open(os.path.join(made, "prepared.json"))), "data": data,
            "plans": plans, "made_in": os.path.abspath(made)}
    with open(info_path, "w") as f:
      json.dump(info, f)
    return info
  start = time.time()
  run(["-m", "medseg_jax.plan", f"--data={data}", f"--output={plans}", f"--budget={budget}",
       "--num_devices=1"], os.path.join(out, "plan.log"))
  planning = time.time() - start
  info = {"data": data, "plans": plans, "planning_seconds": planning,
          "quickstart": quickstart_steps(data, budget)}
  with open(info_path, "w") as f:
    json.dump(info, f)
  return info


def quickstart_steps(data: str, budget: str) -> dict:
  """configs/quickstart_3d.py's seconds per step here and the steps the budget holds."""
  from medseg_jax import plan
  from medseg_jax.planning import rules, timing
  from medseg_jax.config_schema import load_config
  cfg = load_config(os.path.join(REPO, "configs", "quickstart_3d.py"))
  cfg.data.root, cfg.data.synthetic, cfg.data.label_map = data, False, ()
  seconds = timing.step_seconds(cfg, 3, 1, 1)[0]
  return {"step_seconds": seconds,
          "steps": rules.budget_steps(plan.budget_seconds(budget), seconds)}


def train(setting: str, seed: int, info: dict, out: str, name: str = "",
          extra: tuple = ()) -> dict:
  """The test metrics of one (setting, seed), training it unless its run finished; a
  `name` other than the setting's, with `extra` arguments, is a variant of it."""
  name = name or setting
  workdir = os.path.join(out, f"{name}_seed{seed}")
  manifest = os.path.join(workdir, "manifest.json")
  if not (os.path.exists(manifest) and json.load(open(manifest)).get("finished")):
    common = [f"--workdir={workdir}", f"--config.seed={seed}", "--config.data.split_seed=0"]
    if setting == "quickstart_3d":
      # The planned runs' task: the three classes (the quickstart merges the tumour's two).
      args = ["--config=configs/quickstart_3d.py", f"--config.data.root={info['data']}",
              "--config.data.synthetic=False", "--config.data.label_map=()",
              f"--config.train.num_steps={info['quickstart']['steps']}"]
    else:
      args = [f"--config={os.path.join(info['plans'], setting + '.py')}",
              f"--config.data.root={info['data']}"]
    os.makedirs(workdir, exist_ok=True)
    run(["-m", "medseg_jax.main", *args, *extra, *common], os.path.join(workdir, "run.log"))
  done = json.load(open(manifest))
  return {"setting": name, "seed": seed, "dice": done["final_metrics"]["test"][
      "dice_foreground"], "wall_seconds": done["wall_time_seconds"]}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--budget", default="10m")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--volumes", type=int, default=24)
  p.add_argument("--dataset", choices=sorted(DATASETS), default="mri")
  p.add_argument("--settings", default=",".join(SETTINGS),
                 help="the settings to train (a study in parts); the table needs all")
  p.add_argument("--out", default=os.path.join(REPO, "runs", "plan_budget"))
  p.add_argument("--plans", default="", help="a plan set made before (DIR/plans, "
                 "DIR/prepared.json): trained instead of planning anew")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  info = prepare(args.out, args.volumes, args.budget, args.dataset, args.plans)
  settings = args.settings.split(",")
  if unknown := set(settings) - set(SETTINGS):
    p.error(f"--settings: unknown {sorted(unknown)}; choose from {SETTINGS}")
  rows = [train(s, int(seed), info, args.out) for seed in args.seeds.split(",")
          for s in settings]
  if set(settings) != set(SETTINGS):
    return
  from medseg_jax.tuning import paired
  by = {(r["setting"], r["seed"]): r["dice"] for r in rows}
  seeds = sorted({r["seed"] for r in rows})
  result = {"dataset": args.dataset, "budget": args.budget, "planning_seconds": info["planning_seconds"],
            "quickstart": info["quickstart"], "rows": rows, "paired": {}}
  for a, b in (("plan_3d", "quickstart_3d"), ("plan_3d", "plan_2d")):
    diffs = [by[(a, s)] - by[(b, s)] for s in seeds]
    result["paired"][f"{a} - {b}"] = {"differences": diffs,
                                      "interval": paired.interval(diffs) if len(diffs) > 1
                                      else None}
  print(json.dumps(result))
  print(f"| seed | {' | '.join(SETTINGS)} |\n|---|" + "---|" * len(SETTINGS))
  for s in seeds:
    print(f"| {s} | " + " | ".join(f"{by[(k, s)]:.4f}" for k in SETTINGS) + " |")


if __name__ == "__main__":
  main()
