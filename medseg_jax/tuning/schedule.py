"""python -m medseg_jax.tuning.schedule: a config's LR schedule in steps and epochs, printed
and plotted, before any training (and after one guideline action, beside it).

    python -m medseg_jax.tuning.schedule --config=FILE [--num_devices=K] [--plot=lr.png]
        [--train_slices=N] [--after_action=ACTION]
"""

import os
import tempfile

import ml_collections
import numpy as np
from absl import flags

from medseg_jax import cli, optim
from medseg_jax.errors import MedsegError
from medseg_jax.parallel import multihost
from medseg_jax.training import settings, setup
from medseg_jax.tuning import actions


def plot(curves: dict[str, optim.ResolvedSchedule], num_steps: int, path: str,
         title: str) -> None:
  """Writes a PNG of the LR over steps of each labelled schedule, phase starts marked."""
  import matplotlib  # pylint: disable=import-outside-toplevel  (only the plot needs it)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  steps = np.arange(num_steps)
  fig, ax = plt.subplots(figsize=(7, 3.5))
  marked = set()  # a boundary two schedules share is labelled once
  for (label, resolved), colour in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green")):
    values = np.asarray(resolved.schedule(steps))
    ax.plot(steps / resolved.steps_per_epoch, values, color=colour, label=label)
    for phase in resolved.phases[1:]:
      epoch = phase.start / resolved.steps_per_epoch
      ax.axvline(epoch, color=colour, linestyle=":")
      if (epoch, phase.name) not in marked:
        ax.text(epoch, values.max(), f" {phase.name}", va="top", fontsize=8)
        marked.add((epoch, phase.name))
  ax.set_xlabel("epoch")
  ax.set_ylabel("learning rate")
  ax.set_title(title)
  if len(curves) > 1:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def count_train_examples(run: settings.RunSettings) -> int:
  """The training slices (3D: volumes) of the config's dataset, as a run counts them; an
  error that stops the count also names --train_slices, which skips it."""
  try:
    with tempfile.TemporaryDirectory() as tmp:  # synthetic data is written there
      return run.kind.train_count(run.source, tmp, multihost.barrier)
  except MedsegError as e:
    raise type(e)(f"{e}; or give the count with --train_slices=N") from e


def _print_and_plot(cfg: ml_collections.ConfigDict, devices: int, slices: int,
                    action: str | None, png: str | None) -> None:
  after = actions.after_action(cfg, action) if action else None
  run = settings.read(cfg)
  count = slices or count_train_examples(run)
  plan = setup.epoch_plan(run, count, devices)
  resolve = lambda c: optim.resolve_schedule(c, plan.global_batch, plan.steps_per_epoch,
                                             plan.num_steps)
  resolved = resolve(cfg)
  print(f"policy {cfg.lr.policy}, {devices} devices, global batch {plan.global_batch}, "
        f"{count} training {run.kind.counted}, {plan.epoch_draws} drawn per epoch, "
        f"{plan.num_steps} steps")
  print(resolved.describe())
  curves = {"config": resolved}
  if after:
    curves[f"after {action}"] = resolve(after[0])
    print(f"after {action} ({after[1]}):")
    print(curves[f"after {action}"].describe())
  if png:
    plot(curves, plan.num_steps, png, f"{cfg.lr.policy}, k={resolved.k:g}")
    print(f"wrote {os.path.abspath(png)}")


def _cli() -> None:
  config = cli.config_flag()
  devices = flags.DEFINE_integer("num_devices", 1, "Number of devices (workers) k.")
  slices = flags.DEFINE_integer("train_slices", 0,
                                "Training slices (3D: volumes); 0 = count them in the "
                                "config's dataset.")
  png = flags.DEFINE_string("plot", None, "Write the LR over steps to this PNG.")
  action = flags.DEFINE_enum(
      "after_action", None, actions.SCHEDULE_ACTIONS,
      "Also the GreScale schedule after one step of this guideline action (default step "
      "sizes), printed and plotted beside the config's.")
  cli.run(lambda: _print_and_plot(config.value, devices.value, slices.value, action.value,
                                  png.value))


if __name__ == "__main__":
  _cli()
