"""What the guideline tuner writes: DIR/guideline.md, .csv, .png and the chosen config."""

import copy
import os
import pprint
import textwrap

import ml_collections

from medseg_jax import files
from medseg_jax.tuning import runs

COLUMNS = {"dice": "Dice", "pixel_accuracy": "pixel acc.", "mean_accuracy": "mean acc.",
           "mean_iou": "mean IoU", "fw_iou": "fw IoU"}


def table_rows(history: list[dict]) -> list[dict]:
  """One row per run: what it changed, the decision, validation and test metrics."""
  rows = []
  for h in history:
    row = {"run": h["run"], "action": h["action"], "changed": h["changed"],
           "decision": h["decision"]}
    for split in ("val", "test"):
      metrics = h["result"].get(split) or {}
      row.update({f"{split}_{m}": metrics.get(m) for m in runs.METRICS})
    rows.append(row)
  return rows


def _cell(value) -> str:
  return "" if value is None else f"{value:.4f}"


def markdown(rows: list[dict], title: str, note: str) -> str:
  head = ("| run | action | changed | decision | val Dice | "
          + " | ".join(f"test {c}" for c in COLUMNS.values()) + " |")
  lines = [head, "|---" * (5 + len(COLUMNS)) + "|"]
  for r in rows:
    cells = [r["run"], r["action"], r["changed"].replace("|", "/"), r["decision"],
             _cell(r["val_dice"])] + [_cell(r[f"test_{m}"]) for m in COLUMNS]
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
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=90)
  plt.close(fig)


def chosen_config(cfg: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """`cfg` with a run's overrides applied."""
  chosen = copy.deepcopy(cfg)
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = chosen
    for part in path:
      node = node[part]
    node[last] = value
  return chosen



def config_source(cfg: ml_collections.ConfigDict, docstring: str) -> str:
  """A config file that `medseg_jax.main --config=` accepts, holding every value of `cfg`."""
  body = pprint.pformat(cfg.to_dict(), indent=1, width=92, sort_dicts=False)
  docstring = textwrap.fill(docstring, 88)
  return (f'"""{docstring}\n"""\n\nimport ml_collections\n\n\ndef get_config():\n'
          f"  return ml_collections.ConfigDict(\n{textwrap.indent(body, '      ')})\n")


def write(workdir: str, history: list[dict], status_line: str, split: str,
          config_text: str) -> str:
  """Writes the table (md, csv), the plot and the chosen config; returns the markdown."""
  rows = table_rows(history)
  note = (f"Result: {status_line}. Decisions use the {split} metrics of each run's tested "
          "checkpoint; the test columns are reported, not used. The first row is the "
          "one-device baseline. The chosen config: `guideline_config.py`.")
  text = markdown(rows, "GreScale guideline", note)
  files.write_text(os.path.join(workdir, "guideline.md"), text)
  files.write_csv(os.path.join(workdir, "guideline.csv"), rows)
  files.write_text(os.path.join(workdir, "guideline_config.py"), config_text)
  if len(rows) > 1:
    plot(os.path.join(workdir, "guideline.png"), rows, split)
  return text
