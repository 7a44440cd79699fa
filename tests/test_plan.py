"""The dataset fingerprint (`python -m medseg_jax.plan`) against one computed here with
nibabel and numpy alone, on a small dataset written here: a dataset that changes is
fingerprinted again, and each kind of unusable dataset is one line."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import REPO
from medseg_jax.data import decathlon
from medseg_jax.planning import fingerprint

MODALITIES = {"0": "CT", "1": "PET"}
LABELS = {"0": "background", "1": "liver", "2": "lesion"}


def _case(root, name, rng, shape, spacing, permuted=False):
  """A two-channel image (zero outside a box) and its label; `permuted` stores the axes
  as (z, x, y), with an affine that says so."""
  image = np.zeros(shape + (2,), np.float32)
  image[2:-2, 3:-1, 1:-1] = rng.normal([40.0, 3.0], [10.0, 1.0], (shape[0] - 4, shape[1] - 4,
                                                                  shape[2] - 2, 2))
  label = np.zeros(shape, np.uint8)
  label[4:9, 5:10, 2:5] = 1
  label[6:8, 6:8, 3:4] = 2
  affine = np.diag(list(spacing) + [1.0])
  if permuted:
    image, label = image.transpose(2, 0, 1, 3), label.transpose(2, 0, 1)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = spacing[2], spacing[0], spacing[1], 1
  nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{name}.nii.gz")
  nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{name}.nii.gz")
  return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


def _dataset(root, cases=3, modalities=MODALITIES):
  rng = np.random.default_rng(0)
  (root / "imagesTr").mkdir(parents=True)
  (root / "labelsTr").mkdir()
  shapes = [(16, 14, 8), (18, 14, 9), (16, 16, 8)]
  training = [_case(root, f"case_{i}", rng, shapes[i % 3], (0.8, 0.8, 2.5), permuted=i == 1)
              for i in range(cases)]
  (root / "dataset.json").write_text(json.dumps(
      {"name": "Tiny", "modality": modalities, "labels": LABELS, "training": training,
       "test": []}))
  return root


def _independent(root):
  """The fingerprint's numbers from nibabel and numpy: every foreground voxel pooled (the
  dataset is far below the sampling cap)."""
  meta = json.loads((root / "dataset.json").read_text())
  cases, pooled = [], []
  for entry in meta["training"]:
    image = nib.as_closest_canonical(nib.load(root / entry["image"]))
    label = np.asarray(nib.as_closest_canonical(nib.load(root / entry["label"])).dataobj)
    data = np.asarray(image.dataobj, np.float64)
    nonzero = np.argwhere(np.any(data != 0, axis=-1))
    cases.append({"spacing": [float(z) for z in image.header.get_zooms()[:3]],
                  "shape": list(data.shape[:3]),
                  "cropped_shape": (nonzero.max(0) - nonzero.min(0) + 1).tolist(),
                  "class_voxels": [int((label == c).sum()) for c in range(3)]})
    pooled.append(data[label > 0])
  pooled = np.concatenate(pooled)
  return cases, pooled


def test_the_fingerprint_is_the_data_read_with_nibabel(tmp_path):
  root = _dataset(tmp_path / "Task")
  found, status = fingerprint.load_or_compute(decathlon.read_dataset(str(root)),
                                              str(tmp_path / "plans"))
  assert status == "new" and (tmp_path / "plans" / "fingerprint.json").exists()
  cases, pooled = _independent(root)
  assert [c["name"] for c in found["cases"]] == ["case_0", "case_1", "case_2"]
  for ours, theirs in zip(found["cases"], cases):
    assert ours["shape"] == theirs["shape"] and ours["cropped_shape"] == theirs["cropped_shape"]
    assert ours["class_voxels"] == theirs["class_voxels"]
    np.testing.assert_allclose(ours["spacing"], theirs["spacing"], rtol=1e-6)
  assert found["cases"][1]["shape"] == [18, 14, 9]  # stored as (z, x, y)
  stats = found["intensities"]
  assert stats["voxels"] == len(pooled)
  for key, value in [("mean", pooled.mean(0)), ("std", pooled.std(0)),
                     ("median", np.median(pooled, 0)), ("min", pooled.min(0)),
                     ("max", pooled.max(0)),
                     ("percentile_00_5", np.percentile(pooled, 0.5, axis=0)),
                     ("percentile_99_5", np.percentile(pooled, 99.5, axis=0))]:
    np.testing.assert_allclose(stats[key], value, rtol=1e-5, err_msg=key)
  assert found["modalities"] == ["CT", "PET"] and found["labels"] == list(LABELS.values())


def test_a_dataset_that_changed_is_fingerprinted_again(tmp_path):
  root = _dataset(tmp_path / "Task")
  plans = str(tmp_path / "plans")
  first, _ = fingerprint.load_or_compute(decathlon.read_dataset(str(root)), plans)
  again, status = fingerprint.load_or_compute(decathlon.read_dataset(str(root)), plans)
  assert status == "unchanged" and again == json.loads(json.dumps(first))
  label = nib.load(root / "labelsTr" / "case_2.nii.gz")
  grown = np.asarray(label.dataobj).copy()
  grown[2:12, 2:12, 1:6] = 1
  nib.save(nib.Nifti1Image(grown, label.affine), root / "labelsTr" / "case_2.nii.gz")
  changed, status = fingerprint.load_or_compute(decathlon.read_dataset(str(root)), plans)
  assert status == "changed"
  assert changed["cases"][2]["class_voxels"][1] == int((grown == 1).sum())
  assert changed["intensities"]["voxels"] > first["intensities"]["voxels"]


def _plan(*args):
  return subprocess.run([sys.executable, "-m", "medseg_jax.plan", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("damage,message", [
    ("no_dataset_json", "dataset.json: not found"),
    ("no_label", "labelsTr/case_1.nii.gz: file not found"),
    ("one_case", "1 training case(s); a plan needs at least 2"),
    ("mixed_modalities", "imagesTr/case_0.nii.gz: 2 channels, but dataset.json names 3 "
                         "modalities"),
    ("budget", "--budget=soon: a positive time, e.g. 600, 600s, 10m or 1.5h"),
    ("configurations", "--configurations=2d,4d: choose from 2d,3d")])
def test_an_unusable_dataset_is_one_line_and_writes_nothing(tmp_path, damage, message):
  modalities = dict(MODALITIES, **{"2": "MR"}) if damage == "mixed_modalities" else MODALITIES
  root = _dataset(tmp_path / "Task", cases=1 if damage == "one_case" else 3,
                  modalities=modalities)
  if damage == "no_dataset_json":
    os.remove(root / "dataset.json")
  if damage == "no_label":
    os.remove(root / "labelsTr" / "case_1.nii.gz")
  extra = {"budget": ["--budget=soon"], "configurations": ["--configurations=2d,4d"]}
  proc = _plan(f"--data={root}", f"--output={tmp_path / 'plans'}", "--workers=1",
               *extra.get(damage, []))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert message in lines[0]
  assert not (tmp_path / "plans").exists()
