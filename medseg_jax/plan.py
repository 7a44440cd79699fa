"""Plans a new dataset from its data: `python -m medseg_jax.plan --data=ROOT`.

Reads the Decathlon task at ROOT (dataset.json and its training cases) and writes, into
`--output` (default plans/<ROOT's name>), its fingerprint (`fingerprint.json`,
planning/fingerprint.py): per case spacing, shape, shape inside its non-zero box and
class voxels; per channel the foreground's intensity statistics. A fingerprint already
there is reused while the dataset is unchanged. docs/new_dataset.md tells the rest.
"""

import os

import numpy as np
from absl import flags, logging

from medseg_jax import cli
from medseg_jax.data import decathlon
from medseg_jax.data.pool import worker_count
from medseg_jax.errors import ConfigError
from medseg_jax.planning import fingerprint


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


def main() -> None:
  if not _DATA.value:
    raise ConfigError("--data is required: a Decathlon task directory")
  dataset = decathlon.read_dataset(_DATA.value)
  output = _OUTPUT.value or default_output(_DATA.value)
  found, status = fingerprint.load_or_compute(dataset, output, worker_count(_WORKERS.value))
  path = os.path.join(output, fingerprint.FILE)
  logging.info({"new": "Wrote %s", "unchanged": "The dataset is as %s found it",
                "changed": "The dataset changed since %s: fingerprinted again"}[status], path)
  print(summary(found))


_DATA = flags.DEFINE_string("data", None, "The dataset: a Decathlon task directory.")
_OUTPUT = flags.DEFINE_string("output", None, "Where the fingerprint goes; default "
                              "plans/<the dataset directory's name>.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Processes reading the cases; 0 = every core.",
                                lower_bound=0)

if __name__ == "__main__":
  cli.run(main)
