"""A synthetic dataset in the Medical Segmentation Decathlon layout, written as real NIfTI.

Brain-like 3D phantoms: an ellipsoidal head with a brighter skull rim, smooth
tissue texture, a multiplicative bias field and noise, and one to three
"tumours" (label 2) each wrapped in an "oedema" shell (label 1) of varied size,
position and contrast. The 4D variant stacks four modalities with different
contrasts, as in Task01_BrainTumour. A "CT" phantom has CT-like intensities instead
(Hounsfield units: air, bone, soft tissue, a hypodense oedema and an enhancing tumour). The
voxel spacing may be anisotropic (the anatomy keeps its size in millimetres) and case
shapes may vary around `shape`. Everything follows from the seed.
"""

import json
import os
import shutil
import tempfile

import nibabel as nib
import numpy as np
from scipy import ndimage

MODALITIES_4D = ("FLAIR", "T1w", "T1gd", "T2w")
LABELS = {"0": "background", "1": "oedema", "2": "tumour"}
# Relative contrast of (oedema, tumour) to healthy tissue in each modality.
CONTRASTS = {"T1w": (-0.25, -0.5), "FLAIR": (0.5, 0.3), "T1gd": (0.05, 0.8), "T2w": (0.6, 0.4)}
SPACING = (1.0, 1.0, 2.0)


def _ellipsoid(grid, centre, radii):
  return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))


def make_phantom(rng: np.random.Generator, shape, modalities=("T1w",), spacing=SPACING):
  """Returns (image [X,Y,Z,M] float32, label [X,Y,Z] uint8) for one subject."""
  grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
  size = np.array(shape, np.float32)
  head_radii = size / 2 * rng.uniform(0.75, 0.9, 3)
  head = _ellipsoid(grid, size / 2 + rng.normal(0, 1, 3), head_radii)
  brain = head < 0.8
  label = np.zeros(shape, np.uint8)
  for _ in range(rng.integers(1, 4)):
    radii = rng.uniform(0.08, 0.2) * size[:2].mean() * rng.uniform(0.7, 1.3, 3)
    radii[2] *= spacing[0] / spacing[2]
    centre = size / 2 + rng.uniform(-0.35, 0.35, 3) * head_radii
    dist = _ellipsoid(grid, centre, radii)
    label[(dist < 2.2) & brain & (label == 0)] = 1
    label[(dist < 1.0) & brain] = 2
  texture = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
  texture /= texture.std() + 1e-6
  bias = 1.0 + 0.2 * np.sin(grid[0] / shape[0] * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 6))
  channels = []
  for name in modalities:
    if name == "CT":
      channels.append(_ct(rng, head, label, texture, shape))
      continue
    oedema, tumour = CONTRASTS[name]
    scale = rng.uniform(0.7, 1.3)
    tissue = 100.0 * (1.0 + 0.05 * texture)
    tissue *= np.select([label == 2, label == 1], [1 + tumour * scale, 1 + oedema * scale], 1.0)
    skull = (head >= 0.8) & (head < 1.0)
    img = np.where(brain, tissue, 0.0) + np.where(skull, 160.0, 0.0)
    img = img * bias + rng.normal(0, 4.0, shape) * (head < 1.0)
    channels.append(np.clip(img, 0, None))
  return np.stack(channels, -1).astype(np.float32), label


def _ct(rng: np.random.Generator, head, label, texture, shape) -> np.ndarray:
  """A CT-like channel in Hounsfield units: air around the head, a bone rim, soft tissue
  near 40 HU, oedema darker and tumour brighter (contrast-enhanced), and noise."""
  tissue = 40.0 + 4.0 * texture + np.select([label == 2, label == 1], [
      rng.uniform(25, 45), -rng.uniform(10, 20)], 0.0)
  img = np.where(head < 0.8, tissue, np.where(head < 1.0, rng.uniform(600, 1000), -1000.0))
  return (img + rng.normal(0, 8.0, shape)).astype(np.float32)


def write_synthetic_decathlon(root: str, num_training: int = 16, num_test: int = 4,
                              shape=(96, 96, 48), multimodal: bool = False, seed: int = 0,
                              spacing=SPACING, shape_jitter: float = 0.0,
                              modality: str = "") -> str:
  """Writes the dataset to `root` (atomically: a half-written dataset never appears there).
  Each case's shape is `shape` scaled by a factor in [1 - `shape_jitter`, 1 + it] per
  axis; `modality` ("CT", "T1w", ...) names the one channel of a 3D dataset."""
  modalities = MODALITIES_4D if multimodal else (modality or "T1w",)
  rng = np.random.default_rng(seed)
  shapes = np.random.default_rng(seed + 1)  # only drawn with a jitter: the default dataset
                                            # stays the one earlier versions wrote
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
  try:
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
      os.makedirs(os.path.join(tmp, sub))
    training, test = [], []
    for i in range(num_training + num_test):
      size = (tuple(int(round(n * f)) for n, f in zip(shape, shapes.uniform(
          1 - shape_jitter, 1 + shape_jitter, 3))) if shape_jitter else tuple(shape))
      affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-like, as BRATS
      affine[:3, 3] = [size[0] / 2, size[1] / 2, -size[2] * spacing[2] / 2]
      image, label = make_phantom(rng, size, modalities, spacing)
      image = image if multimodal else image[..., 0]
      name = f"phantom_{i:03d}.nii.gz"
      if i < num_training:
        _save(image, affine, os.path.join(tmp, "imagesTr", name))
        _save(label, affine, os.path.join(tmp, "labelsTr", name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
      else:
        _save(image, affine, os.path.join(tmp, "imagesTs", name))
        test.append(f"./imagesTs/{name}")
    meta = {"name": "SyntheticBrain", "description": "synthetic brain-tumour phantoms",
            "tensorImageSize": "4D" if multimodal else "3D",
            "modality": {str(i): m for i, m in enumerate(modalities)}, "labels": LABELS,
            "numTraining": num_training, "numTest": num_test,
            "training": training, "test": test}
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
      json.dump(meta, f, indent=2)
    os.replace(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return root


def _save(array: np.ndarray, affine: np.ndarray, path: str) -> None:
  img = nib.Nifti1Image(array, affine)
  img.header.set_xyzt_units("mm")
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  nib.save(img, path)
