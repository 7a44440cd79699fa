"""PNG montages of slices: image, ground truth, and prediction overlaid with a legend."""

import numpy as np

from medseg_jax import files


def pick_slices(label: np.ndarray, volume: np.ndarray, count: int = 4) -> np.ndarray:
  """Fixed rows to show: in each of the first `count` volumes, its slice with most foreground."""
  rows = []
  for v in np.unique(volume)[:count]:
    members = np.flatnonzero(volume == v)
    foreground = (label[members] > 0).sum(axis=(1, 2))
    rows.append(members[np.argmax(foreground)] if foreground.any()
                else members[len(members) // 2])
  return np.array(rows, np.int64)


def write_montage(path: str, image: np.ndarray, label: np.ndarray, pred: np.ndarray,
                  class_names: list[str], title: str) -> np.ndarray:
  """One row per slice: image, truth overlay, prediction overlay. Written atomically;
  returns the picture as an RGB array [H,W,3] (for TensorBoard)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel

  colours = plt.get_cmap("tab10")
  rows = len(image)
  fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows + 0.6), dpi=80, squeeze=False)
  for r in range(rows):
    gray = image[r, ..., 0]
    for c, (name, mask) in enumerate((("image", None), ("ground truth", label[r]),
                                      ("prediction", pred[r]))):
      ax = axes[r, c]
      ax.imshow(gray.T, cmap="gray", origin="lower")
      if mask is not None:
        ax.imshow(_colour(mask, colours).transpose(1, 0, 2), origin="lower")
      ax.set_axis_off()
      if r == 0:
        ax.set_title(name)
  legend = [Patch(color=colours(i), label=n) for i, n in enumerate(class_names) if i > 0]
  fig.legend(handles=legend, loc="lower center", ncol=max(1, len(legend)))
  fig.suptitle(title)
  fig.canvas.draw()  # drawn once: the same picture goes to the file and to TensorBoard
  rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  with files.atomic_path(path) as tmp:
    plt.imsave(tmp, rgb, format="png")
  return rgb


def _colour(mask: np.ndarray, colours) -> np.ndarray:
  """RGBA overlay: class i > 0 in colour i at 45% opacity, background transparent."""
  rgba = np.zeros(mask.shape + (4,), np.float32)
  for c in np.unique(mask):
    if c > 0:
      rgba[mask == c] = colours(int(c))[:3] + (0.45,)
  return rgba
