"""Every kind of bad input in one dataset: all reported at once, each naming its file."""

import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import REPO
from medseg_jax.errors import InvalidDatasetError
from test_data import config, phantom, write_task
import helpers

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
SHAPE = (12, 12, 8)


def _bad_task(root):
  """Two good subjects and one of each per-subject problem; returns {subject: message}."""
  good = [(f"good{i}",) + phantom(i, SHAPE) + (AFFINE,) for i in range(2)]
  image, label = phantom(5, SHAPE)
  nan_image = image.copy()
  nan_image[3, 3, 3] = np.nan
  wrong_labels = label.copy()
  wrong_labels[0, 0, 0] = 7
  shifted = AFFINE.copy()
  shifted[0, 3] = 5.0
  bad = [("nolabel", image, label, AFFINE), ("noimage", image, label, AFFINE),
         ("garbage", image, label, AFFINE), ("truncated", image, label, AFFINE),
         ("shape", image, label[:, :, :6], AFFINE), ("nan", nan_image, label, AFFINE),
         ("labels", image, wrong_labels, AFFINE),
         ("fourd", np.stack([image, image], -1), label, AFFINE),
         ("thin", image[:, :, :3], label[:, :, :3], AFFINE)]
  write_task(root, good + bad, tensor_size="3D")
  nib.save(nib.Nifti1Image(label, shifted), os.path.join(root, "labelsTr", "affine.nii.gz"))
  nib.save(nib.Nifti1Image(image, AFFINE), os.path.join(root, "imagesTr", "affine.nii.gz"))
  with open(os.path.join(root, "dataset.json")) as f:
    meta = json.load(f)
  meta["training"].append({"image": "./imagesTr/affine.nii.gz",
                           "label": "./labelsTr/affine.nii.gz"})
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump(meta, f)
  os.remove(os.path.join(root, "labelsTr", "nolabel.nii.gz"))
  os.remove(os.path.join(root, "imagesTr", "noimage.nii.gz"))
  with open(os.path.join(root, "imagesTr", "garbage.nii.gz"), "wb") as f:
    f.write(b"not a volume at all")
  path = os.path.join(root, "imagesTr", "truncated.nii.gz")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  return {"labelsTr/nolabel.nii.gz": "label file not found",
          "imagesTr/noimage.nii.gz": "image file not found",
          "imagesTr/garbage.nii.gz": "cannot read as NIfTI",
          "imagesTr/truncated.nii.gz": "cannot read as NIfTI",
          "labelsTr/shape.nii.gz": "does not match its image",
          "labelsTr/affine.nii.gz": "affine differs",
          "imagesTr/nan.nii.gz": "1 non-finite intensities",
          "labelsTr/labels.nii.gz": "label values [7] are outside dataset.json labels 0..2",
          "imagesTr/fourd.nii.gz": "declares tensorImageSize 3D",
          "imagesTr/thin.nii.gz": "3 slices along axis 2, fewer than data.slices_per_volume=5"}


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bad") / "TaskBad")
  return root, _bad_task(root)


def test_every_problem_is_reported_at_once_and_nothing_is_built(bad_dir, tmp_path):
  root, expected = bad_dir
  cfg = config(root, tmp_path, image_size=12, slices_per_volume=5, preprocess_workers=2)
  with pytest.raises(InvalidDatasetError) as caught:
    helpers.load_splits(cfg, str(tmp_path / "w"))
  assert caught.value.exit_code == 2
  lines = str(caught.value).splitlines()[1:]
  assert len(lines) == len(expected), lines
  for path, message in expected.items():
    line = next((l for l in lines if os.path.join(root, path) + ":" in l), None)
    assert line is not None and message in line, (path, lines)
  assert not any("good" in l for l in lines)
  assert not os.listdir(tmp_path / "cache")  # no store, no temporary directory left


def test_skip_invalid_leaves_the_bad_subjects_out(bad_dir, tmp_path):
  root, expected = bad_dir
  cfg = config(root, tmp_path, image_size=12, slices_per_volume=5, skip_invalid=True)
  sets, info = helpers.load_splits(cfg, str(tmp_path / "w"))
  assert sets["train"].names == ["good0", "good1"] and len(sets["train"]) == 10
  assert len(info["skipped"]) == len(expected)


def test_dataset_level_problems_are_reported_together(tmp_path):
  root = write_task(str(tmp_path / "T"), [])
  cfg = config(root, tmp_path, modalities=("T1w", "T9"), label_map=(0, 1))
  with pytest.raises(InvalidDatasetError) as caught:
    helpers.load_splits(cfg, str(tmp_path / "w"))
  message = str(caught.value)
  assert "the 'training' list is empty" in message
  assert "data.modalities names 'T9'" in message
  assert "data.label_map=[0, 1] has 2 entries for the 3 labels" in message


def test_3d_image_where_4d_is_declared(tmp_path):
  image, label = phantom(0, SHAPE, ("T1w", "T2w"))
  root = write_task(str(tmp_path / "T"), [("a", image, label, AFFINE),
                                          ("b", image[..., 0], label, AFFINE)],
                    modalities=("T1w", "T2w"), tensor_size="4D")
  cfg = config(root, tmp_path, image_size=12, slices_per_volume=2)
  with pytest.raises(InvalidDatasetError, match=r"b.nii.gz: a 3D image .* declares "
                                                "tensorImageSize 4D"):
    helpers.load_splits(cfg, str(tmp_path / "w"))


def test_the_run_fails_with_exit_code_2_and_the_list(bad_dir, tmp_path):
  root, expected = bad_dir
  proc = subprocess.run(
      [sys.executable, "-m", "medseg_jax.data.validate", "--config=configs/quickstart.py",
       f"--config.data.root={root}", "--config.data.slices_per_volume=5"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.startswith("error: 10 problem(s)")
  assert all(p in proc.stderr for p in expected)


def test_a_gzip_truncated_at_the_end_is_caught(tmp_path):
  image, label = phantom(1, SHAPE)
  root = write_task(str(tmp_path / "T"), [("a", image, label, AFFINE)])
  path = os.path.join(root, "imagesTr", "a.nii.gz")
  with gzip.open(path, "rb") as f:
    raw = f.read()
  with gzip.open(path, "wb") as f:
    f.write(raw[:-100])  # a whole gzip stream whose voxel data ends early
  cfg = config(root, tmp_path, image_size=12, slices_per_volume=2)
  with pytest.raises(InvalidDatasetError, match="a.nii.gz: cannot read as NIfTI"):
    helpers.load_splits(cfg, str(tmp_path / "w"))
