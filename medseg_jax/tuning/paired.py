"""The study's comparison: per policy mean ± std, and against the baseline the paired
difference per seed with a 95% Student t interval, which alone decides the verdict.

Runs with the same seed share the split, the data, the initialisation seed and the batch
order seed, so the per-seed difference to the baseline removes what the seed does to
both; its interval is Student's t on those differences (n − 1 degrees of freedom).

A run stopped by the divergence guard is a result, never left out silently: it enters
with the test Dice of its best-on-validation checkpoint from before it diverged (what an
early-stopped run reports), and a diverged run with no such checkpoint has no Dice: it
is left out of the means and of the interval and counted in the `diverged` column
beside the verdict, which then holds for the remaining pairs.
"""

import math
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
VERDICTS = {"loses": "the interval lies below 0", "wins": "the interval lies above 0",
            "matches": "the interval contains 0"}


def interval(differences: Sequence[float], confidence: float = CONFIDENCE
             ) -> tuple[float, float, float] | None:
  """The mean of paired differences and its two-sided `confidence` interval, Student's t
  on the differences; None for fewer than two."""
  d = np.asarray(differences, np.float64)
  if d.size < 2:
    return None
  half = stats.t.ppf((1 + confidence) / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def verdict(bounds: tuple[float, float, float] | None) -> str:
  """loses, wins or matches by the interval alone; "" without an interval."""
  if bounds is None:
    return ""
  _, low, high = bounds
  return "loses" if high < 0 else "wins" if low > 0 else "matches"


def differences(group: list[dict], base: list[dict], metric: str = "dice") -> list[float]:
  """Per seed present in both with a value, `group`'s metric minus the baseline's."""
  baseline = {r["seed"]: r[metric] for r in base if r.get(metric) is not None}
  return [r[metric] - baseline[r["seed"]] for r in sorted(group, key=lambda r: r["seed"])
          if r.get(metric) is not None and r["seed"] in baseline]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
  """Mean and sample std (n − 1); None where there are too few values."""
  if not values:
    return None, None
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else None


def summarize(rows: list[dict], baseline_policy: str, metrics: Sequence[str]) -> list[dict]:
  """One entry per (policy, devices): runs, diverged runs, mean and std of each metric,
  and the paired Dice difference to `baseline_policy` on the fewest devices."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["policy"], r["devices"]), []).append(r)
  key = (baseline_policy, min(r["devices"] for r in rows))
  table = []
  for (policy, devices), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    entry = {"policy": policy, "devices": devices, "runs": len(group),
             "diverged": sum(bool(r.get("diverged")) for r in group)}
    for m in (*metrics, "train_seconds"):
      entry[m], entry[f"{m}_std"] = _mean_std([r[m] for r in group if r.get(m) is not None])
    pairs = differences(group, groups.get(key, [])) if (policy, devices) != key else []
    bounds = interval(pairs)
    low, high = (None, None) if bounds is None else bounds[1:]
    entry.update(pairs=len(pairs), dice_diff=float(np.mean(pairs)) if pairs else None,
                 dice_diff_low=low, dice_diff_high=high,
                 verdict="baseline" if (policy, devices) == key else verdict(bounds))
    table.append(entry)
  return table


def _cell(value: float | None, std: float | None = None) -> str:
  if value is None:
    return "—"
  return f"{value:.4f}" if std is None else f"{value:.4f} ± {std:.4f}"


def markdown(table: list[dict], rows: list[dict], baseline: str,
             metrics: dict[str, str]) -> str:
  """The summary table, its reading note, and the test Dice of every run per seed."""
  head = ["policy", "devices", "runs", "diverged", *metrics.values(),
          f"paired Δ Dice [{CONFIDENCE:.0%} t interval]", "verdict", "train s"]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for e in table:
    paired = "" if e["dice_diff"] is None else f"{e['dice_diff']:+.4f}"
    if e["dice_diff_low"] is not None:
      paired += f" [{e['dice_diff_low']:+.4f}, {e['dice_diff_high']:+.4f}] (n={e['pairs']})"
    cells = [e["policy"], str(e["devices"]), str(e["runs"]), str(e["diverged"]),
             *[_cell(e[m], e[f"{m}_std"]) for m in metrics], paired, e["verdict"],
             "—" if e["train_seconds"] is None else f"{e['train_seconds']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  note = (f"Test-split metrics, mean ± sample std (n − 1) over seeds. Paired Δ Dice: per "
          f"seed, the policy's test Dice minus the baseline's (`{baseline}` on the fewest "
          "devices) with the same seed and split; the mean over the seeds both have, and its "
          f"{CONFIDENCE:.0%} interval from Student's t on those differences (n − 1 degrees "
          "of freedom). The verdict comes from that interval alone: "
          + "; ".join(f"{k}, {v}" for k, v in VERDICTS.items()) + " (none below two pairs). "
          "A diverged run (stopped by the divergence guard) counts with the test Dice of its "
          "best-on-validation checkpoint from before it diverged; one without such a "
          "checkpoint has no Dice (—) and is left out of the means and the interval.")
  return ("# Scaling study\n\n" + note + "\n\n" + "\n".join(lines) + "\n\n"
          + per_seed(rows) + "\n")


def per_seed(rows: list[dict]) -> str:
  """Test Dice of every run, by seed: the pairs the interval is built from."""
  seeds = sorted({r["seed"] for r in rows})
  cells: dict[tuple, dict[int, str]] = {}
  for r in rows:
    value = _cell(r.get("dice")) + (" (diverged)" if r.get("diverged") else "")
    cells.setdefault((r["devices"], r["policy"]), {})[r["seed"]] = value
  lines = ["Test Dice per seed:", "",
           "| policy | devices | " + " | ".join(f"seed {s}" for s in seeds) + " |",
           "|---" * (2 + len(seeds)) + "|"]
  for (devices, policy), by_seed in sorted(cells.items()):
    lines.append(f"| {policy} | {devices} | "
                 + " | ".join(by_seed.get(s, "") for s in seeds) + " |")
  return "\n".join(lines)
