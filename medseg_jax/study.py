"""Scaling study: train every (devices, LR policy, seed) combination and compare them.

    python -m medseg_jax.study --config=configs/quickstart.py --devices=1,2,4,8 \\
        --policies=linear,linear_gradual,grescale --seeds=2 --workdir=DIR [--config.key=value]

Each combination is a normal run of `medseg_jax.main` in DIR/runs/<policy>_dev<N>_seed<S>,
so it resumes if interrupted and is skipped once it has its test metrics. The
results go to DIR/study.csv, DIR/study.md and DIR/study.png.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from medseg_jax import cli, files

POLICIES = {
    "none": ["--config.lr.scaling=none", "--config.lr.policy=standard", "--config.lr.warmup=none"],
    "sqrt": ["--config.lr.scaling=sqrt", "--config.lr.policy=standard", "--config.lr.warmup=none"],
    "linear": ["--config.lr.scaling=linear", "--config.lr.policy=standard",
               "--config.lr.warmup=none"],
    "linear_constant": ["--config.lr.scaling=linear", "--config.lr.policy=standard",
                        "--config.lr.warmup=constant"],
    "linear_gradual": ["--config.lr.scaling=linear", "--config.lr.policy=standard",
                       "--config.lr.warmup=gradual"],
    "grescale": ["--config.lr.scaling=linear", "--config.lr.policy=grescale"],
}
METRICS = ("dice", "mean_accuracy", "mean_iou", "pixel_accuracy", "fw_iou")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the study.")
_DEVICES = flags.DEFINE_list("devices", ["1", "8"], "Device counts to compare.")
_POLICIES = flags.DEFINE_list("policies", ["linear", "linear_gradual", "grescale"],
                              f"LR policies, from {sorted(POLICIES)}.")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per combination (0, 1, ...).")
_BASELINE = flags.DEFINE_string("baseline_policy", "linear",
                                "Policy whose run on the fewest devices is the baseline.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", -1, "Simulated CPU devices per run: -1 = the largest --devices count when "
    "the machine has no accelerator, 0 = none (use the real devices).")


def _check_flags() -> None:
  if not _WORKDIR.value:
    cli.fail("--workdir is required", 2)
  unknown = [p for p in _POLICIES.value if p not in POLICIES]
  if unknown:
    cli.fail(f"--policies: unknown {unknown}, choose from {sorted(POLICIES)}", 2)
  if not all(d.isdigit() and int(d) > 0 for d in _DEVICES.value):
    cli.fail(f"--devices={','.join(_DEVICES.value)}: positive integers, comma-separated", 2)
  if _SEEDS.value < 1:
    cli.fail("--seeds must be at least 1", 2)
  if _BASELINE.value not in _POLICIES.value:
    cli.fail(f"--baseline_policy={_BASELINE.value}: not among --policies", 2)


def run_name(policy: str, devices: int, seed: int) -> str:
  return f"{policy}_dev{devices}_seed{seed}"


def _run(config_args: list[str], workdir: str, policy: str, devices: int, seed: int,
         cpu_devices: int) -> bool:
  """Trains one combination unless it is complete; True if it has its test metrics."""
  done = os.path.join(workdir, "eval", "test_metrics.json")
  if os.path.exists(done):
    logging.info("%s: complete, skipped", workdir)
    return True
  env = dict(os.environ)
  if cpu_devices:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} " \
                       f"--xla_force_host_platform_device_count={cpu_devices}".strip()
  cmd = [sys.executable, "-m", "medseg_jax.main", *config_args, *POLICIES[policy],
         f"--config.parallel.num_devices={devices}", f"--config.seed={seed}",
         f"--workdir={workdir}"]
  print(f"[study] {os.path.basename(workdir)}: {' '.join(cmd[1:])}", flush=True)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "study_run.log"), "a") as log:
    code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
  if code:
    print(f"[study] {os.path.basename(workdir)} failed with exit code {code}; "
          f"see {workdir}/study_run.log", flush=True)
  return code == 0 and os.path.exists(done)


def collect(workdir: str) -> dict:
  """Test metrics and training time (sum of logged step times) of one finished run."""
  with open(os.path.join(workdir, "eval", "test_metrics.json")) as f:
    result = json.load(f)
  seconds, last = 0.0, 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "step_time" in record:
        seconds += record["step_time"] * (record["step"] - last)
        last = record["step"]
  return {**{m: result[m] for m in METRICS}, "train_seconds": seconds}


def summarize(rows: list[dict], baseline_policy: str) -> list[dict]:
  """Mean and std over seeds per (policy, devices), with the Dice gap to the baseline."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["policy"], r["devices"]), []).append(r)
  fewest = min(r["devices"] for r in rows)
  base = groups.get((baseline_policy, fewest))
  base_dice = float(np.mean([r["dice"] for r in base])) if base else None
  table = []
  for (policy, devices), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    entry = {"policy": policy, "devices": devices, "runs": len(runs)}
    for m in METRICS + ("train_seconds",):
      values = np.array([r[m] for r in runs], np.float64)
      entry[m], entry[f"{m}_std"] = float(values.mean()), float(values.std())
    entry["dice_gap"] = entry["dice"] - base_dice if base_dice is not None else None
    table.append(entry)
  return table


def write_reports(study_dir: str, table: list[dict], baseline_policy: str) -> None:
  fields = list(table[0])
  with files.atomic_path(os.path.join(study_dir, "study.csv")) as tmp, \
      open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(table)
  lines = ["| policy | devices | runs | Dice | mean acc. | mean IoU | pixel acc. | fw IoU "
           "| Dice gap | train s |", "|---" * 10 + "|"]
  for e in table:
    cells = [f"{e[m]:.4f} ± {e[m + '_std']:.4f}" for m in METRICS]
    gap = "" if e["dice_gap"] is None else f"{e['dice_gap']:+.4f}"
    lines.append(f"| {e['policy']} | {e['devices']} | {e['runs']} | {' | '.join(cells)} | "
                 f"{gap} | {e['train_seconds']:.0f} |")
  note = (f"Test-split metrics, mean ± std over seeds. Dice gap: against `{baseline_policy}` "
          "on the fewest devices.\n")
  with files.atomic_path(os.path.join(study_dir, "study.md")) as tmp, open(tmp, "w") as f:
    f.write("# Scaling study\n\n" + note + "\n" + "\n".join(lines) + "\n")
  _plot(study_dir, table)


def _plot(study_dir: str, table: list[dict]) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(6, 4))
  for policy in dict.fromkeys(e["policy"] for e in table):
    entries = [e for e in table if e["policy"] == policy]
    ax.errorbar([e["devices"] for e in entries], [e["dice"] for e in entries],
                yerr=[e["dice_std"] for e in entries], marker="o", capsize=3, label=policy)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("devices (k)")
  ax.set_ylabel("test Dice")
  ax.legend()
  fig.tight_layout()
  with files.atomic_path(os.path.join(study_dir, "study.png")) as tmp:
    fig.savefig(tmp, dpi=90)
  plt.close(fig)


def main(argv: list[str]) -> None:
  del argv
  cli.quiet_library_logs()
  config_args = [a for a in sys.argv[1:] if a.startswith("--config")]
  devices = sorted(int(d) for d in _DEVICES.value)
  cpu_devices = _CPU_DEVICES.value
  if cpu_devices < 0:
    import jax  # pylint: disable=import-outside-toplevel
    cpu_devices = max(devices) if jax.devices()[0].platform == "cpu" else 0
  study_dir = _WORKDIR.value
  rows, failed = [], []
  for policy in _POLICIES.value:
    for n in devices:
      for seed in range(_SEEDS.value):
        workdir = os.path.join(study_dir, "runs", run_name(policy, n, seed))
        if _run(config_args, workdir, policy, n, seed, cpu_devices):
          rows.append({"policy": policy, "devices": n, "seed": seed, **collect(workdir)})
        else:
          failed.append(run_name(policy, n, seed))
  if rows:
    table = summarize(rows, _BASELINE.value)
    write_reports(study_dir, table, _BASELINE.value)
    files.write_json(os.path.join(study_dir, "study_runs.json"), rows)
    print(open(os.path.join(study_dir, "study.md")).read())
  if failed:
    cli.fail(f"{len(failed)} run(s) failed: {', '.join(failed)}", 1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(_check_flags))
