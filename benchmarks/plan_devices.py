"""The 3D plan on N devices against the same plan on one, paired by seed, on the same
examples (as the large-batch study compares device counts).

    python benchmarks/plan_devices.py --study=/tmp/pb3 --devices=8 --seeds=2,3,4

Reads a study `benchmarks/plan_budget.py` made (its data, its one-device 3D plan made with
`--budget`, and its finished `plan_3d_seed<S>` runs, which it trains where missing) and
trains the plan for N simulated devices in STUDY/plan_3d_dev<N>_seed<S>. The N-device
plan is the planner's own function of the device count (medseg_jax/planning/rules.py):
each device's batch capped by the dataset's 5% share on N devices, the examples of the
one-device plan's steps in N-device global batches, and GreScale's schedule. A budgeted
plan on N real devices would train as many steps as on one (each device's step takes about
as long); on N simulated CPU devices that costs N times the time, so the comparison here
keeps the examples, not the time. Resumable: a finished run is read, not run again.
Prints one JSON line and a table of test mean foreground Dice with the paired differences
(Student's t, 95%).
"""

import argparse
import json
import math
import os
import sys

import plan_budget

sys.path.insert(0, plan_budget.REPO)


def device_choices(plan_path: str, devices: int) -> list:
  """What turns the one-device plan at `plan_path` into the plan for `devices` devices
  on the same examples: the planner's rules.Choice list, with the device count."""
  from medseg_jax import config_schema, defaults, files
  from medseg_jax.planning import fingerprint, rules
  cfg = config_schema.load_config(plan_path)
  found = files.read_json(os.path.join(os.path.dirname(plan_path), fingerprint.FILE),
                          "the plan's fingerprint")
  batch = min(cfg.train.per_device_batch_size,
              rules.batch_cap(found, math.prod(cfg.data.patch_size), devices))
  examples = cfg.train.num_steps * cfg.train.per_device_batch_size
  steps = -(-examples // (batch * devices))
  choices = rules.schedule(batch, devices, steps)
  # What only the one-device plan sets (its decay) takes the default, as in an N-device plan.
  dropped = ({c.key for c in rules.schedule(batch, 1, steps)} - {c.key for c in choices})
  default = defaults.get_config()
  choices += [rules.Choice(key, config_schema.lookup(default, key), "the default")
              for key in sorted(dropped)]
  return choices + [rules.Choice("parallel.num_devices", devices, "the devices")]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--study", required=True, help="a benchmarks/plan_budget.py --out directory")
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--seeds", default="2,3,4")
  args = p.parse_args()
  info = json.load(open(os.path.join(args.study, "prepared.json")))
  plan = os.path.join(info["plans"], "plan_3d.py")
  extra = [f"--config.{c.key}={c.value}" for c in device_choices(plan, args.devices)]
  name = f"plan_3d_dev{args.devices}"
  rows = []
  simulated = f"--xla_force_host_platform_device_count={args.devices}"
  for seed in map(int, args.seeds.split(",")):
    rows.append(plan_budget.train("plan_3d", seed, info, args.study))
    before = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{before} {simulated}".strip()  # for the N-device run only
    try:
      rows.append(plan_budget.train("plan_3d", seed, info, args.study, name=name,
                                    extra=extra))
    finally:
      os.environ["XLA_FLAGS"] = before
  from medseg_jax.tuning import paired
  by = {(r["setting"], r["seed"]): r["dice"] for r in rows}
  seeds = sorted({r["seed"] for r in rows})
  diffs = [by[(name, s)] - by[("plan_3d", s)] for s in seeds]
  print(json.dumps({"overrides": extra, "rows": rows, "differences": diffs,
                    "interval": paired.interval(diffs) if len(diffs) > 1 else None}))
  print(f"| seed | plan_3d (1 device) | {name} | difference |\n|---|---|---|---|")
  for s, d in zip(seeds, diffs):
    print(f"| {s} | {by[('plan_3d', s)]:.4f} | {by[(name, s)]:.4f} | {d:+.4f} |")


if __name__ == "__main__":
  main()
