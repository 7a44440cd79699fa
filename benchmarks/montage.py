"""The evaluation montage: time to compose and write one PNG, against drawing the same
panels as a matplotlib figure.

    python benchmarks/montage.py [--repeats=15]

Four rows (a validation's montage) of 64x64 slices (the quickstart's) and of 256x256
slices; medians of `--repeats` writes each, after one unmeasured write.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import matplotlib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from medseg_jax.evaluation import overlay  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def figure_montage(path, image, label, pred, class_names, title):
  """The same panels as a matplotlib figure (imshow per panel, titles, a legend)."""
  colours = plt.get_cmap("tab10")
  fig, axes = plt.subplots(len(image), 3, figsize=(7.5, 2.6 * len(image) + 0.6), dpi=80,
                           squeeze=False)
  for r in range(len(image)):
    for c, mask in enumerate((None, label[r], pred[r])):
      axes[r, c].imshow(image[r, ..., 0].T, cmap="gray", origin="lower")
      if mask is not None:
        rgba = np.zeros(mask.shape + (4,), np.float32)
        rgba[mask == 1] = colours(1)[:3] + (0.45,)
        axes[r, c].imshow(rgba.transpose(1, 0, 2), origin="lower")
      axes[r, c].set_axis_off()
  fig.legend(handles=[matplotlib.patches.Patch(color=colours(1), label=class_names[1])])
  fig.suptitle(title)
  fig.savefig(path)
  plt.close(fig)


def median_seconds(write, size, repeats, directory):
  """Smooth images with a little noise, and a disc of foreground per slice."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[:size, :size] / size
  image = np.stack([np.sin(8 * x + i) + np.cos(5 * y) + 0.1 * rng.normal(size=x.shape)
                    for i in range(4)])[..., None].astype(np.float32)
  label = np.stack([(x - 0.45 - 0.02 * i) ** 2 + (y - 0.5) ** 2 < 0.15 ** 2
                    for i in range(4)]).astype(np.int32)
  args = (image, label, 1 - label, ["background", "tumour"], "val, step 2")
  write(os.path.join(directory, "warm.png"), *args)
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    write(os.path.join(directory, f"{i}.png"), *args)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  print("| slices | overlay.write_montage | matplotlib figure | ratio |")
  print("|---|---|---|---|")
  with tempfile.TemporaryDirectory() as directory:
    for size in (64, 256):
      ours = median_seconds(overlay.write_montage, size, args.repeats, directory)
      figure = median_seconds(figure_montage, size, args.repeats, directory)
      print(f"| 4 x {size}x{size} | {1000 * ours:.1f} ms | {1000 * figure:.1f} ms | "
            f"{figure / ours:.1f}x |")


if __name__ == "__main__":
  main()
