"""The evaluation montage: the PNG on disk is the picture TensorBoard gets, and its panels
hold the slices, their classes in matplotlib's tab10 colours at 45% opacity."""

import matplotlib
import numpy as np
from PIL import Image

from medseg_jax.evaluation import overlay


def test_montage_file_holds_the_returned_picture_of_each_slice_and_its_classes(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, 16, 12, 1)).astype(np.float32)  # 16 along x, 12 along y
  label = np.zeros((2, 16, 12), np.int32)
  label[:, 4:9, 5:11] = 1
  path = str(tmp_path / "eval" / "val_step0000002.png")
  rgb = overlay.write_montage(path, image, label, 1 - label, ["background", "tumour"], "val")
  assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
  np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), rgb)
  assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["val_step0000002.png"]

  scale = overlay.PANEL // 16  # whole pixels per voxel
  tumour = np.array(matplotlib.colormaps["tab10"](1)[:3]) * 255
  def pixel(row, column, x, y):  # voxel (x, y) of a slice: x runs right, y runs up
    top = 2 * overlay.TEXT + overlay.GAP + row * (12 * scale + overlay.GAP)
    left = overlay.GAP + column * (16 * scale + overlay.GAP)
    return rgb[top + (11 - y) * scale + scale // 2, left + x * scale + scale // 2]
  for row in range(2):
    gray = image[row, ..., 0]
    level = (gray - gray.min()) / (gray.max() - gray.min()) * 255
    for x, y in [(0, 0), (5, 7), (15, 11), (8, 10), (3, 2)]:
      inside = label[row, x, y] == 1
      blend = np.round(0.55 * level[x, y] + 0.45 * tumour)
      assert np.abs(pixel(row, 0, x, y) - level[x, y]).max() <= 0.5 + 1e-3
      truth, predicted = (blend, level[x, y]) if inside else (level[x, y], blend)
      assert np.abs(pixel(row, 1, x, y) - truth).max() <= 1.0
      assert np.abs(pixel(row, 2, x, y) - predicted).max() <= 1.0
