"""The evaluation montage: the PNG on disk is the picture TensorBoard gets."""

import matplotlib.image
import numpy as np

from medseg_jax.evaluation import overlay


def test_montage_file_holds_the_returned_picture(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, 16, 16, 1)).astype(np.float32)
  label = np.zeros((2, 16, 16), np.int32)
  label[:, 4:9, 5:12] = 1
  path = str(tmp_path / "eval" / "val_step0000002.png")
  rgb = overlay.write_montage(path, image, label, 1 - label, ["background", "tumour"], "val")
  assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
  written = matplotlib.image.imread(path)  # float RGBA in [0, 1]
  np.testing.assert_array_equal(np.round(written[..., :3] * 255).astype(np.uint8), rgb)
  assert rgb.shape[:2] == (round(80 * (2.6 * 2 + 0.6)), round(80 * 7.5))  # 80 dpi
  assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["val_step0000002.png"]
