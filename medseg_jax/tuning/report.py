"""What the guideline tuner writes: DIR/guideline.md, .csv, .png and the chosen config
(DIR/guideline_config.py: the source config and the guideline's changes to it)."""

import copy
import importlib.util
import os
import pprint
import textwrap

import ml_collections

from medseg_jax import config_schema, files
from medseg_jax.errors import DataError
from medseg_jax.tuning import runs

COLUMNS = {"dice": "Dice", "pixel_accuracy": "pixel acc.", "mean_accuracy": "mean acc.",
           "mean_iou": "mean IoU", "fw_iou": "fw IoU"}


def table_rows(history: list[dict]) -> list[dict]:
  """One row per run: what it changed, the decision, validation and test metrics."""
  rows = []
  for h in history:
    row = {"run": h["run"], "action": h["action"], "changed": h["changed"],
           "decision": h["decision"],
           "val_dice_by_draw": " / ".join(_cell((d["result"].get("val") or {}).get("dice"))
                                          for d in h.get("draws", []))}
    for split in ("val", "test"):
      metrics = h["result"].get(split) or {}
      row.update({f"{split}_{m}": metrics.get(m) for m in runs.METRICS})
    rows.append(row)
  return rows


def _cell(value) -> str:
  return "" if value is None else f"{value:.4f}"


def markdown(rows: list[dict], title: str, note: str) -> str:
  head = ("| run | action | changed | decision | val Dice | val Dice by draw | "
          + " | ".join(f"test {c}" for c in COLUMNS.values()) + " |")
  lines = [head, "|---" * (6 + len(COLUMNS)) + "|"]
  for r in rows:
    cells = [r["run"], r["action"], r["changed"].replace("|", "/"), r["decision"],
             _cell(r["val_dice"]), r["val_dice_by_draw"]] + [_cell(r[f"test_{m}"])
                                                             for m in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return f"# {title}\n\n{note}\n\n" + "\n".join(lines) + "\n"


def plot(path: str, rows: list[dict], split: str) -> None:
  """Dice per run (the deciding split and test) against the baseline's, as lines."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  tuned = rows[1:]
  x = list(range(1, len(tuned) + 1))
  fig, ax = plt.subplots(figsize=(7, 4))
  for s, colour in (("val", "tab:blue"), ("test", "tab:orange")):
    values = [r[f"{s}_dice"] for r in tuned]
    style = "-o" if s == split else "--s"
    ax.plot(x, [float("nan") if v is None else v for v in values], style, color=colour,
            label=f"{s} Dice" + (" (decides)" if s == split else ""))
    if rows[0][f"{s}_dice"] is not None:
      ax.axhline(rows[0][f"{s}_dice"], color=colour, linestyle=":",
                 label=f"baseline {s} Dice")
  ax.set_xticks(x, [r["run"] for r in tuned], rotation=30, ha="right", fontsize=7)
  ax.set_ylabel("Dice")
  ax.legend(fontsize=8)
  save_figure(fig, path)


def save_figure(fig, path: str) -> None:
  """Writes a matplotlib figure to `path` as a PNG, atomically, and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=90)
  plt.close(fig)


def chosen_config(cfg: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """`cfg` with a run's overrides applied."""
  chosen = copy.deepcopy(cfg)
  for key, value in overrides.items():
    config_schema.assign(chosen, key, value)
  return chosen



# A chosen config as a file: the source config and the changes to it, so that keys added
# to the defaults later reach it through the source (a snapshot of every value would
# stop loading at the next new key).
_CHANGES_FILE = '''"""{docstring}

The source config and the guideline's changes to it: the tuner's command-line overrides
and the chosen run's settings.
"""

import importlib.util
import os

SOURCE = {source!r}  # relative to this file
VARIANT = {variant!r}  # get_config(VARIANT) of the source when set
CHANGES = {changes}


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), SOURCE)
  spec = importlib.util.spec_from_file_location("guideline_source", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(VARIANT) if VARIANT else module.get_config()
  for key, value in CHANGES.items():
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c
'''


def changes(source: ml_collections.ConfigDict, chosen: ml_collections.ConfigDict) -> dict:
  """The values of `chosen` that differ from `source`, by dotted key, in config order."""
  before = config_schema.flatten(source)
  return {k: v for k, v in config_schema.flatten(chosen).items()
          if k not in before or before[k] != v}


def changes_source(config_arg: str, chosen: ml_collections.ConfigDict, docstring: str,
                   directory: str) -> str:
  """A config file for `directory` that `medseg_jax.main --config=` accepts: the config
  `config_arg` (PATH or PATH:VARIANT) with the values in which `chosen` differs from it."""
  path, _, variant = config_arg.partition(":")
  body = pprint.pformat(changes(config_schema.load_config(config_arg), chosen), indent=1,
                        width=88, sort_dicts=False)
  return _CHANGES_FILE.format(
      docstring=textwrap.fill(docstring, 88),
      source=os.path.relpath(os.path.abspath(path), os.path.abspath(directory)),
      variant=variant or None, changes=textwrap.indent(body, " " * 10).lstrip())


def read_changes(path: str) -> tuple[str, dict]:
  """The source config (PATH or PATH:VARIANT, as a path from here) and the changes of a
  chosen config file that `changes_source` wrote."""
  try:
    spec = importlib.util.spec_from_file_location("guideline_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except (OSError, SyntaxError) as e:
    raise DataError(f"{path}: cannot read the guideline's chosen config ({e})") from e
  if not all(hasattr(module, name) for name in ("SOURCE", "VARIANT", "CHANGES")):
    raise DataError(f"{path}: not a chosen config written as its source config and changes "
                    "(SOURCE, VARIANT, CHANGES); run the guideline again")
  source = os.path.normpath(os.path.join(os.path.dirname(path), module.SOURCE))
  return (f"{source}:{module.VARIANT}" if module.VARIANT else source), dict(module.CHANGES)


def compare_line(runs_dir: str, names: list[str]) -> str:
  """A report's pointer to its runs in the dashboard (docs/dashboard.md)."""
  return (f"Watch and compare these runs in the dashboard: `python3 -m medseg_jax.dashboard "
          f"{runs_dir}`, then its page `/compare?runs={','.join(names)}`.\n")


def write(workdir: str, history: list[dict], status_line: str, split: str,
          config_text: str) -> str:
  """Writes the table (md, csv), the plot and the chosen config; returns the markdown."""
  rows = table_rows(history)
  draws = len(history[0].get("draws", [])) if history else 0
  means = (f", each setting's mean over its {draws} validation draws (runs <run>_fold<d>)"
           if draws > 1 else "")
  note = (f"Result: {status_line}. Decisions use the {split} metrics of each run's tested "
          f"checkpoint{means}; the test columns are reported, not used. The first row is the "
          "one-device baseline. The chosen config: `guideline_config.py`.")
  text = markdown(rows, "GreScale guideline", note) + "\n" + compare_line(
      os.path.join(workdir, "runs"), [d["run"] for h in history for d in h.get("draws", [])])
  files.write_text(os.path.join(workdir, "guideline.md"), text)
  files.write_csv(os.path.join(workdir, "guideline.csv"), rows)
  files.write_text(os.path.join(workdir, "guideline_config.py"), config_text)
  if len(rows) > 1:
    plot(os.path.join(workdir, "guideline.png"), rows, split)
  return text
