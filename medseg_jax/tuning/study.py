"""Scaling study: train every (devices, LR policy, seed) combination and compare them.

    python -m medseg_jax.tuning.study --config=configs/quickstart.py --devices=1,2,4,8 \\
        --policies=linear,linear_gradual,grescale --seeds=2 --workdir=DIR [--config.key=value]

`--guideline=DIR` adds the policy `guideline`: the config the GreScale guideline tuner
chose in DIR (DIR/guideline_config.py, the study's config with the tuner's changes),
trained like the others.

Seeds 0, 1, ... vary initialisation and batch order; every run has the same split and
data, those of the config's `data.split_seed` (unset: its `seed`), so runs with the same
seed are paired. Each combination is a normal run of `medseg_jax.main` in
DIR/runs/<policy>_dev<N>_seed<S>, so it resumes if interrupted and is skipped once it has
its test metrics. The results go to DIR/study.csv, DIR/study.md and DIR/study.png.
"""

import math
import os
import re
import sys

from absl import flags

from medseg_jax import cli, files
from medseg_jax.data import split
from medseg_jax.monitor import manifest
from medseg_jax.errors import ConfigError, MedsegError
from medseg_jax.tuning import paired, report, runs

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
METRICS = runs.METRICS
COLUMNS = {"dice": "Dice", "mean_accuracy": "mean acc.", "mean_iou": "mean IoU",
           "pixel_accuracy": "pixel acc.", "fw_iou": "fw IoU"}


def run_name(policy: str, devices: int, seed: int) -> str:
  return f"{policy}_dev{devices}_seed{seed}"


def run_all(study_dir: str, policies: dict[str, list[str]], devices: list[int], seeds: int,
            cpu_devices: int, split_seed: int,
            skip: set[tuple[str, int]] = frozenset()) -> tuple[list[dict], list[str]]:
  """Trains every (policy, devices, seed) not in `skip` and not yet complete, each on the
  split (and synthetic data) of `split_seed`; `policies` maps a name to its config
  arguments (`--config=FILE` and overrides). Returns a row per run that completed or
  diverged (a diverged run is a result, marked so), and the names of those that failed
  otherwise."""
  rows, failed = [], []
  for policy, policy_args in policies.items():
    for n in devices:
      if (policy, n) in skip:
        continue
      for seed in range(seeds):
        workdir = os.path.join(study_dir, "runs", run_name(policy, n, seed))
        args = [*policy_args, f"--config.parallel.num_devices={n}", f"--config.seed={seed}",
                f"--config.data.split_seed={split_seed}"]
        if runs.run(args, workdir, cpu_devices, "study") == "failed":
          failed.append(run_name(policy, n, seed))
          continue
        rows.append({"policy": policy, "devices": n, "seed": seed, **collect(workdir)})
        manifest.record_repeats(workdir, list(range(seeds)), "medseg_jax.tuning.study",
                                f"{policy} on {n} devices")
  return rows, failed


def guideline_policy(directory: str, config_args: list[str]) -> list[str]:
  """The config arguments of the policy `guideline`: the chosen config the tuner wrote in
  `directory` (its source config and its changes), with the study's overrides of the keys
  it does not change; the study sets seed, devices and split as for every policy. Its
  source must be the study's --config, so every policy starts from the same config."""
  path = os.path.join(directory, "guideline_config.py")
  source, changed = report.read_changes(path)
  study_config = next(a.split("=", 1)[1] for a in config_args if a.startswith("--config="))
  if not _same_config(source, study_config):
    raise ConfigError(f"--guideline={directory}: its guideline_config.py builds on {source}, "
                      f"not on the study's --config={study_config}")
  kept = [a for a in config_args if not a.startswith("--config=")
          and _override_key(a) not in changed]
  return [f"--config={path}", *kept]


def _same_config(a: str, b: str) -> bool:
  """Whether two PATH[:VARIANT] arguments name the same config file and variant."""
  (path_a, _, variant_a), (path_b, _, variant_b) = a.partition(":"), b.partition(":")
  return os.path.realpath(path_a) == os.path.realpath(path_b) and variant_a == variant_b


def _override_key(arg: str) -> str | None:
  """The KEY of `--config.KEY=VALUE` (or a boolean's `--[no]config.KEY`)."""
  match = re.fullmatch(r"--(?:no)?config\.([^=]+)(?:=.*)?", arg)
  return match.group(1) if match else None


def collect(workdir: str) -> dict:
  """Test metrics and training time (sum of logged step times) of one finished run, and
  whether the divergence guard stopped it: a diverged run has the test metrics of its
  best checkpoint, or none without one (`paired` says how it counts)."""
  record = runs.diverged(workdir)
  evaluated = record is None or record["evaluated"]
  metrics = runs.metrics_on_test(workdir) if evaluated else dict.fromkeys(METRICS)
  extra = {} if record is None else {"error": record["error"]}
  return {**metrics, "train_seconds": runs.train_seconds(workdir),
          "diverged": record is not None, **extra}


def write_reports(study_dir: str, rows: list[dict], baseline_policy: str) -> None:
  """study.csv (one line per policy and device count, the paired columns included),
  study.md (the table, its reading and every run's Dice per seed) and study.png."""
  table = paired.summarize(rows, baseline_policy, METRICS)
  files.write_csv(os.path.join(study_dir, "study.csv"), table)
  names = [run_name(r["policy"], r["devices"], r["seed"]) for r in rows]
  files.write_text(os.path.join(study_dir, "study.md"),
                   paired.markdown(table, rows, baseline_policy, COLUMNS) + "\n"
                   + report.compare_line(os.path.join(study_dir, "runs"), names))
  _plot(study_dir, table)


def _plot(study_dir: str, table: list[dict]) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(6, 4))
  for policy in dict.fromkeys(e["policy"] for e in table):
    entries = [e for e in table if e["policy"] == policy]
    ax.errorbar([e["devices"] for e in entries],  # no Dice (every run diverged): no point
                [math.nan if e["dice"] is None else e["dice"] for e in entries],
                yerr=[e["dice_std"] or 0.0 for e in entries], marker="o", capsize=3,
                label=policy)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("devices (k)")
  ax.set_ylabel("test Dice")
  ax.legend()
  report.save_figure(fig, os.path.join(study_dir, "study.png"))


def _cli() -> None:
  """The command: flags, then every run, then the comparison; errors are one line."""
  config = cli.config_flag()
  flags.adopt_module_key_flags(cli)  # --config is this command's: in --help
  workdir = flags.DEFINE_string("workdir", None, "Directory of the study.")
  devices = flags.DEFINE_list("devices", ["1", "8"], "Device counts to compare.")
  policies = flags.DEFINE_list("policies", ["linear", "linear_gradual", "grescale"],
                               f"LR policies, from {sorted(POLICIES)}.")
  seeds = flags.DEFINE_integer("seeds", 2, "Seeds per combination (0, 1, ...).")
  baseline = flags.DEFINE_string("baseline_policy", "linear",
                                 "Policy whose run on the fewest devices is the baseline.")
  guideline = flags.DEFINE_string(
      "guideline", None, "A guideline tuner's --workdir: adds the policy 'guideline', its "
      "chosen settings.")
  baseline_only = flags.DEFINE_bool(
      "baseline_only_on_fewest", False, "On the fewest devices train only the baseline "
      "policy (the others are scaling rules: at k=1 they add nothing).")
  cpu = flags.DEFINE_integer(
      "cpu_devices", -1, "Simulated CPU devices per run: -1 = the largest --devices count when "
      "the machine has no accelerator, 0 = none (use the real devices).")

  def check() -> None:
    if not workdir.value:
      cli.fail("--workdir is required", 2)
    known = {*POLICIES, "guideline"} if guideline.value else set(POLICIES)
    unknown = [p for p in policies.value if p not in known]
    if unknown:
      hint = " (guideline needs --guideline=DIR)" if "guideline" in unknown else ""
      cli.fail(f"--policies: unknown {unknown}, choose from {sorted(known)}{hint}", 2)
    if not all(d.isdigit() and int(d) > 0 for d in devices.value):
      cli.fail(f"--devices={','.join(devices.value)}: positive integers, comma-separated", 2)
    if seeds.value < 1:
      cli.fail("--seeds must be at least 1", 2)
    if baseline.value not in policies.value:
      cli.fail(f"--baseline_policy={baseline.value}: not among --policies", 2)

  def main() -> None:
    counts = sorted(int(d) for d in devices.value)
    config_args = cli.config_args(sys.argv)
    table = {p: guideline_policy(guideline.value, config_args) if p == "guideline"
             else [*config_args, *POLICIES[p]] for p in policies.value}
    skip = {(p, counts[0]) for p in table if p != baseline.value} if baseline_only.value \
        else set()
    rows, failed = run_all(workdir.value, table, counts, seeds.value,
                           runs.cpu_devices(cpu.value, max(counts)),
                           split.split_seed(config.value), skip)
    if rows:
      write_reports(workdir.value, rows, baseline.value)
      files.write_json(os.path.join(workdir.value, "study_runs.json"), rows)
      print(open(os.path.join(workdir.value, "study.md")).read())
    if failed:
      raise MedsegError(f"{len(failed)} run(s) failed: {', '.join(failed)}")

  cli.run(main, check)


if __name__ == "__main__":
  _cli()
