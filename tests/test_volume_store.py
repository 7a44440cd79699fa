"""The volume store against NIfTI files read with nibabel and preprocessed by hand with
numpy and scipy: volumes, patches, foreground samples, the median spacing, the key and
the atomic build."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tensorstore as ts
from scipy import ndimage

from helpers import REPO
from medseg_jax.data import decathlon, resample, synthetic, volume_store
from medseg_jax.errors import ConfigError, InvalidDatasetError

TARGET = (1.5, 1.5, 1.5)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("v") / "Task98_Volumes")
  return synthetic.write_synthetic_decathlon(root, num_training=3, num_test=0,
                                             shape=(20, 18, 8), seed=5)


def as_ct(source: str, root: str) -> str:
  """A copy of the dataset at `source` whose one modality is named CT."""
  shutil.copytree(source, root)
  path = os.path.join(root, "dataset.json")
  with open(path) as f:
    meta = json.load(f)
  meta["modality"] = {"0": "CT"}
  with open(path, "w") as f:
    json.dump(meta, f)
  return root


def build(root, cache, skip_invalid=False, **settings):
  dataset = decathlon.read_dataset(str(root))
  s = volume_store.check_settings(volume_store.Settings(**settings))
  path = volume_store.store_path(str(cache), dataset, s, skip_invalid)
  volume_store.build(path, dataset, s, skip_invalid, processes=1)
  return volume_store.VolumeStore(path)


def canonical(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(voxels, affine) of a NIfTI file in RAS order, by nibabel."""
  img = nib.as_closest_canonical(nib.load(path))
  return np.asarray(img.dataobj, np.float64), img.affine


def zoom(volume: np.ndarray, shape: tuple) -> np.ndarray:
  return ndimage.zoom(volume, [n / m for n, m in zip(shape, volume.shape)], order=1,
                      mode="nearest", grid_mode=True)


def nonzero_corners(image: np.ndarray) -> tuple[slice, ...]:
  """The box of an image's non-zero voxels, from their coordinates."""
  where = np.argwhere(image != 0)
  return tuple(slice(lo, hi + 1) for lo, hi in zip(where.min(0), where.max(0)))


def by_hand(root: str, target: tuple, ct: bool, whole: bool = False, cropped: bool = False
            ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Every training subject (`cropped`: its box of non-zero voxels) normalised (MRI:
  z-score over the non-zero voxels, or `whole` over all; CT: clip to the pooled
  foreground's 0.5/99.5 percentiles, z-score by its mean and std), then resampled: the
  image linearly, the labels per class linearly then argmax."""
  with open(os.path.join(root, "dataset.json")) as f:
    entries = json.load(f)["training"]
  read = [(canonical(os.path.join(root, e["image"])), canonical(os.path.join(root, e["label"])))
          for e in entries]
  pooled = np.concatenate([image[label > 0] for (image, _), (label, _) in read])
  low, high = np.percentile(pooled, [0.5, 99.5])
  out = []
  for (image, affine), (label, _) in read:
    if cropped:
      box = nonzero_corners(image)
      image, label = image[box], label[box]
    if ct:
      normalised = (np.clip(image, low, high) - pooled.mean()) / pooled.std()
    elif whole:
      normalised = (image - image.mean()) / image.std()
    else:
      inside = image != 0
      normalised = np.where(inside, (image - image[inside].mean()) / image[inside].std(), 0)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    shape = tuple(int(np.round(n * s / t)) for n, s, t in zip(image.shape, spacing, target))
    weights = np.stack([zoom((label == c).astype(np.float32), shape) for c in range(3)], -1)
    out.append((zoom(normalised.astype(np.float32), shape), weights.argmax(-1)))
  return out


@pytest.mark.parametrize("modality", ["T1w", "CT"])
def test_volumes_read_back_as_preprocessed_by_hand(dataset_dir, tmp_path, modality):
  root = dataset_dir if modality == "T1w" else as_ct(dataset_dir, str(tmp_path / "ct"))
  opened = build(root, tmp_path / "cache", target_spacing=TARGET)
  assert opened.meta["normalisation"] == [modality.lower().replace("t1w", "mri")]
  expected = by_hand(root, TARGET, ct=modality == "CT")
  assert len(opened.volumes) == len(expected)
  for i, (image, label) in enumerate(expected):
    got_image, got_label = opened.volume(i)
    assert got_image.shape == image.shape + (1,) and got_image.dtype == np.float32
    np.testing.assert_allclose(got_image[..., 0], image, atol=2e-5)
    np.testing.assert_array_equal(got_label, label)
    entry = opened.volumes[i]
    assert entry["original_spacing"] == [1.0, 1.0, 2.0]
    assert entry["stored_shape"] == list(label.shape)
    np.testing.assert_allclose(entry["spacing"], np.array([20, 18, 16]) / label.shape)
    assert entry["class_voxels"] == {str(c): int((label == c).sum()) for c in (1, 2)
                                     if (label == c).any()}


@pytest.mark.parametrize("normalisation", ["mri", "zscore"])
def test_cropped_volumes_are_their_non_zero_box_preprocessed_by_hand(dataset_dir, tmp_path,
                                                                       normalisation):
  opened = build(dataset_dir, tmp_path / "cache", target_spacing=TARGET, crop_nonzero=True,
                 normalisation=normalisation)
  expected = by_hand(dataset_dir, TARGET, ct=False, whole=normalisation == "zscore",
                     cropped=True)
  for i, (image, label) in enumerate(expected):
    got_image, got_label = opened.volume(i)
    np.testing.assert_allclose(got_image[..., 0], image, atol=2e-5)
    np.testing.assert_array_equal(got_label, label)
    entry = opened.volumes[i]
    raw, _ = canonical(os.path.join(dataset_dir, entry["image"]))
    box = nonzero_corners(raw)
    assert entry["crop_box"] == [[s.start, s.stop] for s in box]
    assert np.prod(entry["canonical_shape"]) > np.prod([s.stop - s.start for s in box])
    labels, _ = canonical(os.path.join(dataset_dir, entry["label"]))
    assert entry["label_voxels_outside"] == (labels > 0).sum() - (labels[box] > 0).sum()


def test_a_label_voxel_outside_the_box_is_counted_and_warned_about(dataset_dir, tmp_path,
                                                                     caplog):
  root = str(tmp_path / "outside")
  shutil.copytree(dataset_dir, root)
  with open(os.path.join(root, "dataset.json")) as f:
    label_path = os.path.join(root, json.load(f)["training"][0]["label"])
  img = nib.load(label_path)
  labels = np.asarray(img.dataobj).copy()
  image, _ = canonical(label_path.replace("labelsTr", "imagesTr"))
  assert image[0, 0, 0] == 0 and labels[0, 0, 0] == 0  # a corner outside the head
  labels[0, 0, 0] = 1
  nib.save(nib.Nifti1Image(labels, img.affine, img.header), label_path)
  with caplog.at_level("WARNING"):
    opened = build(root, tmp_path / "cache", target_spacing=TARGET, crop_nonzero=True)
  counts = [v["label_voxels_outside"] for v in opened.volumes]
  assert counts == [1, 0, 0]
  assert "1 label voxels lie outside its non-zero box" in caplog.text


@pytest.mark.parametrize("corner,size", [((2, 3, 1), (6, 5, 4)), ((-3, 4, -2), (8, 8, 8)),
                                         ((10, 9, 8), (8, 16, 9)), ((-20, 0, 0), (4, 4, 4)),
                                         ((0, 0, 0), (14, 12, 11))])
def test_a_patch_is_the_full_array_sliced_with_zeros_outside(dataset_dir, tmp_path, corner,
                                                             size):
  opened = build(dataset_dir, tmp_path / "cache", target_spacing=TARGET)
  image = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(
      opened.path, "image", "1")}}).result().read().result()
  label = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(
      opened.path, "label", "1")}}).result().read().result()
  pad = 25
  padded_image = np.pad(image, [(pad, pad)] * 3 + [(0, 0)])
  padded_label = np.pad(label, pad)
  box = tuple(slice(c + pad, c + pad + s) for c, s in zip(corner, size))
  got_image, got_label = opened.patch(1, corner, size)
  assert got_image.dtype == np.float32 and got_label.dtype == np.uint8
  np.testing.assert_array_equal(got_image, padded_image[box])
  np.testing.assert_array_equal(got_label, padded_label[box])


def test_foreground_samples_are_voxels_of_their_class_capped(dataset_dir, tmp_path):
  opened = build(dataset_dir, tmp_path / "cache", target_spacing=TARGET, foreground_samples=40)
  for i, entry in enumerate(opened.volumes):
    _, label = opened.volume(i)
    found = opened.foreground(i)
    assert sorted(found) == sorted(int(c) for c in np.unique(label[label > 0]))
    for c, coords in found.items():
      count = int((label == c).sum())
      assert entry["class_voxels"][str(c)] == count
      assert len(coords) == min(40, count) and len(np.unique(coords, axis=0)) == len(coords)
      assert (label[tuple(coords.T)] == c).all()


def write_nifti_task(root: str, affines: list[np.ndarray]) -> str:
  """A Decathlon task of one small subject per affine."""
  for sub in ("imagesTr", "labelsTr"):
    os.makedirs(os.path.join(root, sub))
  rng, training = np.random.default_rng(0), []
  for i, affine in enumerate(affines):
    image = rng.uniform(1, 10, (6, 7, 5)).astype(np.float32)
    label = (rng.random((6, 7, 5)) < 0.3).astype(np.uint8)
    for sub, array in (("imagesTr", image), ("labelsTr", label)):
      nib.save(nib.Nifti1Image(array, affine), os.path.join(root, sub, f"s{i}.nii.gz"))
    training.append({"image": f"./imagesTr/s{i}.nii.gz", "label": f"./labelsTr/s{i}.nii.gz"})
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump({"name": "T", "modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "fg"},
               "training": training, "test": []}, f)
  return root


def test_median_spacing_comes_from_the_headers_in_ras_order(tmp_path):
  permuted = np.zeros((4, 4))  # file axes (i, j, k) run along S, R, A (k flipped)
  permuted[2, 0], permuted[0, 1], permuted[1, 2], permuted[3, 3] = 3.0, 0.5, -0.9, 1
  affines = [np.diag([0.8, 0.6, 2.0, 1]), np.diag([-1.0, 0.7, 4.0, 1]), permuted]
  root = write_nifti_task(str(tmp_path / "T"), affines)
  dataset = decathlon.read_dataset(root)
  spacings = resample.dataset_spacings(dataset)
  expected = {"s0": (0.8, 0.6, 2.0), "s1": (1.0, 0.7, 4.0), "s2": (0.5, 0.9, 3.0)}
  for name, spacing in expected.items():
    np.testing.assert_allclose(spacings[name], spacing)
    loaded = decathlon.load_nifti(os.path.join(root, "imagesTr", f"{name}.nii.gz"))
    np.testing.assert_allclose(loaded.spacing, spacing)
  np.testing.assert_allclose(resample.dataset_median_spacing(dataset), (0.8, 0.7, 3.0))
  opened = build(root, tmp_path / "cache")  # target_spacing () = the median
  np.testing.assert_allclose(opened.meta["target_spacing"], (0.8, 0.7, 3.0))


def test_a_failed_build_leaves_nothing_behind(dataset_dir, tmp_path):
  root = str(tmp_path / "broken")
  shutil.copytree(dataset_dir, root)
  with open(os.path.join(root, "labelsTr", "phantom_002.nii.gz"), "wb") as f:
    f.write(b"not a NIfTI file")  # the last subject: the others are already written
  cache = tmp_path / "cache"
  with pytest.raises(InvalidDatasetError, match="phantom_002.nii.gz: cannot read as NIfTI"):
    build(root, cache, target_spacing=TARGET)
  assert os.listdir(cache) == []
  opened = build(root, cache, skip_invalid=True, target_spacing=TARGET)
  assert [v["name"] for v in opened.volumes] == ["phantom_000", "phantom_001"]
  assert list(opened.meta["skipped"]) == ["phantom_002"]
  assert os.listdir(cache) == [os.path.basename(opened.path)]


BUILD = """
import sys
from medseg_jax.data import decathlon, volume_store
from medseg_jax.errors import DataError
dataset = decathlon.read_dataset(sys.argv[1])
settings = volume_store.Settings()
path = volume_store.store_path(sys.argv[2], dataset, settings, False)
try:
  volume_store.build(path, dataset, settings, False, 1)
except DataError as e:
  print(e)
"""


def test_a_build_that_finds_no_room_is_one_error_and_leaves_nothing(dataset_dir, tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  # Files limited to 1 KiB (RLIMIT_FSIZE, EFBIG; Python ignores SIGXFSZ): the metadata
  # fits, the first image chunk does not.
  proc = subprocess.run(["bash", "-c", 'ulimit -f 1 && exec "$@"', "bash", sys.executable,
                         "-c", BUILD, dataset_dir, str(cache)], capture_output=True,
                        text=True, timeout=120, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "disk full (File too large) while writing the volume store" in proc.stdout, proc.stdout
  assert os.listdir(cache) == []


def test_the_key_changes_with_every_setting_and_file(dataset_dir, tmp_path):
  root = str(tmp_path / "d")
  shutil.copytree(dataset_dir, root)
  dataset = decathlon.read_dataset(root)

  def path(skip_invalid=False, **changes):
    return volume_store.store_path("c", dataset, volume_store.Settings(**changes), skip_invalid)

  variants = [{}, {"target_spacing": TARGET}, {"target_spacing": (1.5, 1.5, 2.0)},
              {"normalisation": "ct"}, {"normalisation": "mri"},
              {"ct_clip_percentiles": (1.0, 99.0)}, {"foreground_samples": 5},
              {"modalities": ("T1w",)}, {"label_map": (0, 1, 1)}]
  paths = [path(**v) for v in variants] + [path(skip_invalid=True)]
  assert len(set(paths)) == len(paths)
  assert path(target_spacing=TARGET) == path(target_spacing=TARGET)
  os.utime(os.path.join(root, "imagesTr", "phantom_001.nii.gz"), ns=(1, 1))
  assert path() != paths[0]


@pytest.mark.parametrize("change,key", [({"target_spacing": (1.0, 1.0)}, "data.target_spacing"),
                                        ({"target_spacing": (1.0, 0, 1.0)}, "data.target_spacing"),
                                        ({"normalisation": "CT"}, "data.volume_normalisation"),
                                        ({"ct_clip_percentiles": (99.5, 0.5)},
                                         "data.ct_clip_percentiles"),
                                        ({"foreground_samples": 0}, "data.foreground_samples")])
def test_bad_settings_are_config_errors_naming_the_key(change, key):
  with pytest.raises(ConfigError, match=f"^{key}="):
    volume_store.check_settings(volume_store.Settings(**change))
