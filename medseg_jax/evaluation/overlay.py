"""PNG montages of slices: image, ground truth, and prediction overlaid with a legend.

Composed as arrays and lettered with Pillow: every validation writes one, so it is made
in milliseconds (benchmarks/montage.py), not drawn as a figure.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medseg_jax import files

# matplotlib's "tab10" palette (class i in colour i), as RGB bytes.
COLOURS = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
                    (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
                    (188, 189, 34), (23, 190, 207)], np.float32)
OPACITY = 0.45       # of a class's colour over the image
PANEL = 160          # a slice is enlarged by a whole factor to about this many pixels
GAP = 4              # pixels between panels and around them
TEXT = 16            # height of a line of text
COLUMNS = ("image", "ground truth", "prediction")


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
  """One row per slice: image, truth overlay, prediction overlay; a slice's first axis
  runs right and its second up. Written atomically; returns the picture as an RGB array
  [H,W,3] (for TensorBoard)."""
  rows = [[panel(image[r, ..., 0], mask) for mask in (None, label[r], pred[r])]
          for r in range(len(image))]
  height, width = rows[0][0].shape[:2]
  canvas = np.full((2 * TEXT + len(rows) * (height + GAP) + TEXT + 3 * GAP,
                    len(COLUMNS) * (width + GAP) + GAP, 3), 255, np.uint8)
  top = 2 * TEXT + GAP
  for r, panels in enumerate(rows):
    for c, picture in enumerate(panels):
      y, x = top + r * (height + GAP), GAP + c * (width + GAP)
      canvas[y:y + height, x:x + width] = picture
  picture = Image.fromarray(canvas)
  _letter(ImageDraw.Draw(picture), title, width, top + len(rows) * (height + GAP),
          class_names)
  rgb = np.asarray(picture).copy()
  with files.atomic_path(path) as tmp:
    picture.save(tmp, format="PNG", compress_level=1)  # zlib's fastest: most of the time
  return rgb


def panel(gray: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
  """One slice as RGB bytes, its grey values stretched to its own range, the classes of
  `mask` (if any) overlaid, enlarged by a whole factor."""
  low, high = float(gray.min()), float(gray.max())
  level = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
  rgb = np.repeat(level[..., None] * 255.0, 3, axis=-1).astype(np.float32)
  if mask is not None:
    for c in np.unique(mask):
      if c > 0:
        where = mask == c
        rgb[where] = (1 - OPACITY) * rgb[where] + OPACITY * COLOURS[int(c) % len(COLOURS)]
  upright = np.flipud(np.swapaxes(np.round(rgb).astype(np.uint8), 0, 1))
  scale = max(1, PANEL // max(gray.shape))
  return upright.repeat(scale, axis=0).repeat(scale, axis=1)


def _letter(draw: ImageDraw.ImageDraw, title: str, width: int, bottom: int,
            class_names: list[str]) -> None:
  """The title, the column names and, below the rows, a legend of the foreground classes."""
  font = ImageFont.load_default()
  total = len(COLUMNS) * (width + GAP) + GAP
  draw.text(((total - draw.textlength(title, font=font)) / 2, 2), title, fill=0, font=font)
  for c, name in enumerate(COLUMNS):
    x = GAP + c * (width + GAP) + (width - draw.textlength(name, font=font)) / 2
    draw.text((x, TEXT + 2), name, fill=0, font=font)
  x = GAP
  for i, name in enumerate(class_names[1:], start=1):
    colour = tuple(int(v) for v in COLOURS[i % len(COLOURS)])
    draw.rectangle((x, bottom + 3, x + 10, bottom + 13), fill=colour)
    draw.text((x + 14, bottom + 2), name, fill=0, font=font)
    x += 14 + int(draw.textlength(name, font=font)) + 12
