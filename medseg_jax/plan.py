"""Plans a new dataset from its data: `python -m medseg_jax.plan --data=ROOT`.

Reads the Decathlon task at ROOT (dataset.json and its training cases) and writes, into
`--output` (default plans/<ROOT's name>):
- its fingerprint (`fingerprint.json`, planning/fingerprint.py): per case spacing, shape,
  shape inside its non-zero box and class voxels; per channel the foreground's intensity
  statistics. A fingerprint already there is reused while the dataset is unchanged.
- `plan_2d.py` and `plan_3d.py` (or one of them, `--configurations`): config files for
  `--config` (planning/planner.py), fitted to each device's memory (`--memory`, or the
  device's own) on `--num_devices` devices.
docs/new_dataset.md tells the rest.
"""

import os
import time

import numpy as np
from absl import flags, logging

from medseg_jax import cli
from medseg_jax.data import decathlon
from medseg_jax.data.pool import worker_count
from medseg_jax.errors import ConfigError
from medseg_jax.planning import fingerprint, written


def default_output(root: str) -> str:
  """plans/<the dataset directory's name>."""
  return os.path.join("plans", os.path.basename(os.path.normpath(root)))


def summary(found: dict) -> str:
  """The fingerprint in a few lines: cases, median spacing and shapes, intensities."""
  cases = found["cases"]
  spacing = np.median([c["spacing"] for c in cases], axis=0)
  shape = np.median([c["shape"] for c in cases], axis=0)
  cropped = np.median([c["cropped_shape"] for c in cases], axis=0)
  stats = found["intensities"]
  lines = [f"{found['dataset']}: {len(cases)} training cases, modalities "
           f"{', '.join(found['modalities'])}, classes {', '.join(found['labels'])}",
           f"  median spacing {_numbers(spacing)} mm, shape {_numbers(shape)}, "
           f"non-zero box {_numbers(cropped)}"]
  for c, name in enumerate(found["modalities"]):
    lines.append(f"  {name} foreground: mean {stats['mean'][c]:.4g}, std {stats['std'][c]:.4g}, "
                 f"0.5-99.5% [{stats['percentile_00_5'][c]:.4g}, "
                 f"{stats['percentile_99_5'][c]:.4g}]")
  return "\n".join(lines)


def _numbers(values) -> str:
  return " x ".join(f"{v:g}" for v in values)


def write_plans(found: dict, root: str, output: str, machine, time_budget=None,
                configurations=written.CONFIGURATIONS) -> list[tuple[str, float]]:
  """plan_2d.py and/or plan_3d.py (`configurations`) of fingerprint `found` in `output`;
  their paths and the seconds each took to plan."""
  from medseg_jax.planning import planner  # pylint: disable=import-outside-toplevel
  header = {"fingerprint_sha256": written.fingerprint_hash(found),
            "num_devices": machine.num_devices, "memory_budget": machine.budget_source}
  if time_budget:
    header["time_budget_seconds"] = time_budget.seconds
  peak = planner.peak_fn(found)
  texts = []  # every plan is made before any is written: a failure writes none
  makers = {"2d": (2, planner.plan_2d), "3d": (3, planner.plan_3d)}
  for dims, make in (makers[c] for c in written.CONFIGURATIONS if c in configurations):
    start = time.perf_counter()
    path = os.path.join(output, f"plan_{dims}d.py")
    choices = make(found, os.path.abspath(root), machine, peak, time_budget)
    title = (f"The {dims}D plan of {found['dataset']} for {machine.num_devices} device(s), "
             f"made by `python -m medseg_jax.plan`;\ntrain it with `python -m "
             f"medseg_jax.main --config={path} --workdir=runs/{found['dataset']}_{dims}d`.")
    texts.append((path, written.render(choices, title, header), time.perf_counter() - start))
  for path, text, _ in texts:
    written.write(path, text)
  return [(path, seconds) for path, _, seconds in texts]


def budget_seconds(text: str) -> float:
  """Seconds of a `--budget` such as 600, 600s, 10m or 1.5h."""
  units = {"s": 1, "m": 60, "h": 3600}
  number, unit = (text[:-1], text[-1]) if text[-1] in units else (text, "s")
  try:
    seconds = float(number) * units[unit]
  except ValueError:
    seconds = -1
  if not seconds > 0:
    raise ConfigError(f"--budget={text}: a positive time, e.g. 600, 600s, 10m or 1.5h")
  return seconds


def time_budget_of(seconds: float, found: dict, num_devices: int):
  """A time budget of `seconds` with a timer of this dataset's train steps on
  `num_devices` of this process's devices; None for no budget (0)."""
  if not seconds:
    return None
  import jax  # pylint: disable=import-outside-toplevel
  from medseg_jax.planning import planner, timing  # pylint: disable=import-outside-toplevel
  classes, channels = len(found["labels"]), len(found["modalities"])
  devices = min(num_devices, jax.local_device_count())
  return planner.TimeBudget(seconds, lambda cfg: timing.step_seconds(
      cfg, classes, channels, devices)[0])


def machine_of(memory_gib: float, num_devices: int):
  """The devices a plan is for: their count (0 = every device JAX sees) and memory."""
  import jax  # pylint: disable=import-outside-toplevel
  from medseg_jax.planning import memory, planner  # pylint: disable=import-outside-toplevel
  budget, source = memory.device_budget(memory_gib)
  return planner.Machine(budget, source, num_devices or jax.device_count())


def main() -> None:
  if not _DATA.value:
    raise ConfigError("--data is required: a Decathlon task directory")
  if error := written.configurations_error(_CONFIGURATIONS.value):
    raise ConfigError(error)
  seconds = budget_seconds(_BUDGET.value) if _BUDGET.value else 0.0
  started = time.perf_counter()
  dataset = decathlon.read_dataset(_DATA.value)
  output = _OUTPUT.value or default_output(_DATA.value)
  found, status = fingerprint.load_or_compute(dataset, output, worker_count(_WORKERS.value))
  path = os.path.join(output, fingerprint.FILE)
  logging.info({"new": "Wrote %s", "unchanged": "The dataset is as %s found it",
                "changed": "The dataset changed since %s: fingerprinted again"}[status], path)
  print(summary(found))
  machine = machine_of(_MEMORY.value, _NUM_DEVICES.value)
  time_budget = time_budget_of(seconds, found, machine.num_devices)
  print(f"planning for {machine.num_devices} device(s), each {machine.budget / 2**30:.2f} "
        f"GiB ({machine.budget_source})" + (f", a training time of {time_budget.seconds:g} s"
                                            if time_budget else ""), flush=True)
  fingerprinted = time.perf_counter() - started
  costs = [f"fingerprint {fingerprinted:.0f} s"]
  for written_path, took in write_plans(found, _DATA.value, output, machine, time_budget,
                                       _CONFIGURATIONS.value):
    print(f"wrote {written_path}")
    costs.append(f"{os.path.basename(written_path)} {took:.0f} s")
  total = time.perf_counter() - started
  share = f", {total / time_budget.seconds:.0%} of the budget" if time_budget else ""
  print(f"planning took {total:.0f} s ({', '.join(costs)}{share})")


_DATA = flags.DEFINE_string("data", None, "The dataset: a Decathlon task directory.")
_OUTPUT = flags.DEFINE_string("output", None, "Where the fingerprint and the plans go; "
                              "default plans/<the dataset directory's name>.")
_MEMORY = flags.DEFINE_float("memory", 0.0, "GiB a train step may use on each device; 0 = "
                             "75% of an accelerator's memory, or half the free RAM shared by "
                             "the CPU devices.", lower_bound=0.0)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices the plan trains on, over every "
                                    "host; 0 = the devices JAX sees here.", lower_bound=0)
_BUDGET = flags.DEFINE_string("budget", "", "The training run's wall time, e.g. 10m, 600s, "
                              "1.5h: each plan's network and steps are chosen by timing its "
                              "train step here; empty = nnU-Net's 1000 epochs.")
_CONFIGURATIONS = flags.DEFINE_list("configurations", list(written.CONFIGURATIONS),
                                    "The plans to make: 2d, 3d or both.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Processes reading the cases; 0 = every core.",
                                lower_bound=0)

if __name__ == "__main__":
  cli.run(main)
