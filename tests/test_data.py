"""The synthetic Decathlon dataset on disk, read back with nibabel; splits by subject."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from configs import base
from medseg_jax.data import decathlon, pipeline, preprocess, synthetic
from medseg_jax.errors import DataError


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("d") / "Task99_Synthetic")
  return synthetic.write_synthetic_decathlon(root, num_training=6, num_test=2,
                                             shape=(32, 32, 12), seed=3)


def test_layout_and_nifti_files(dataset_dir):
  with open(os.path.join(dataset_dir, "dataset.json")) as f:
    meta = json.load(f)
  assert meta["modality"] == {"0": "T1w"} and len(meta["training"]) == 6
  assert len(meta["test"]) == 2 and meta["numTraining"] == 6
  entry = meta["training"][0]
  image = nib.load(os.path.join(dataset_dir, entry["image"]))
  label = nib.load(os.path.join(dataset_dir, entry["label"]))
  assert image.shape == label.shape == (32, 32, 12)
  assert entry["image"].endswith(".nii.gz")
  np.testing.assert_allclose(np.abs(np.diag(image.affine))[:3], synthetic.SPACING)
  values = set(np.unique(np.asarray(label.dataobj)).tolist())
  assert values <= {0, 1, 2} and {1, 2} & values
  for rel in meta["test"]:
    assert os.path.isfile(os.path.join(dataset_dir, rel))


def test_same_seed_same_data(tmp_path):
  a = synthetic.write_synthetic_decathlon(str(tmp_path / "a"), 2, 0, (24, 24, 8), seed=5)
  b = synthetic.write_synthetic_decathlon(str(tmp_path / "b"), 2, 0, (24, 24, 8), seed=5)
  for sub in ("imagesTr", "labelsTr"):
    x = nib.load(os.path.join(a, sub, "phantom_001.nii.gz")).get_fdata()
    y = nib.load(os.path.join(b, sub, "phantom_001.nii.gz")).get_fdata()
    np.testing.assert_array_equal(x, y)


def test_multimodal_variant_is_4d(tmp_path):
  root = synthetic.write_synthetic_decathlon(str(tmp_path / "m"), 1, 0, (16, 16, 6),
                                             multimodal=True)
  img = nib.load(os.path.join(root, "imagesTr", "phantom_000.nii.gz"))
  assert img.shape == (16, 16, 6, 4)
  data = decathlon.load_nifti(os.path.join(root, "imagesTr", "phantom_000.nii.gz")).data
  picked = preprocess.select_channels(data, ("T1gd", 0), synthetic.MODALITIES_4D, "x")
  assert picked.shape[-1] == 2


def test_canonical_reorientation_flips_lps_to_ras(dataset_dir):
  path = os.path.join(dataset_dir, "labelsTr", "phantom_000.nii.gz")
  raw = np.asarray(nib.load(path).dataobj)
  volume = decathlon.load_nifti(path)
  assert volume.affine[0, 0] < 0 and volume.shape == raw.shape
  assert volume.spacing == synthetic.SPACING
  np.testing.assert_array_equal(volume.data, raw[::-1, ::-1, :])  # x and y flipped to RAS


def test_split_is_by_subject_and_recorded(dataset_dir, tmp_path):
  cfg = base.get_config()
  cfg.data.root, cfg.data.image_size, cfg.data.slices_per_volume = dataset_dir, 16, 4
  cfg.data.val_fraction = cfg.data.test_fraction = 0.2
  sets, info = pipeline.load_splits(cfg, str(tmp_path))
  with open(tmp_path / "split.json") as f:
    split = json.load(f)
  names = [n for s in pipeline.SPLITS for n in split[s]]
  assert sorted(names) == [f"phantom_{i:03d}" for i in range(6)]  # each subject exactly once
  assert info["volumes"] == {"train": 4, "val": 1, "test": 1}
  assert sets["train"].image.shape == (16, 16, 16, 1) and sets["train"].label.shape == (16, 16, 16)
  assert len(set(sets["val"].names) & set(sets["train"].names)) == 0
  # Labels resized with nearest neighbour keep only label values.
  assert set(np.unique(sets["train"].label)) <= {0, 1, 2}
  # 32x32 voxels of 1 mm resized to 16x16 are 2 mm; slices along z stay 2 mm apart.
  np.testing.assert_allclose(sets["val"].spacing, [[2.0, 2.0, 2.0]])


def test_train_batches_are_a_partition_of_the_global_batch():
  data = pipeline.SliceSet(np.arange(40, dtype=np.float32).reshape(40, 1, 1, 1),
                           np.zeros((40, 1, 1), np.int32), np.zeros(40, np.int32), ["a"],
                           np.ones((1, 3)))
  whole = [b["image"].ravel() for b in pipeline.train_batches(data, 8, seed=1, epoch=2)]
  parts = [[b["image"].ravel() for b in pipeline.train_batches(data, 8, 1, 2, p, 2)]
           for p in range(2)]
  for i, batch in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([parts[0][i], parts[1][i]]), batch)
  assert len(whole) == 5 and len(np.unique(np.concatenate(whole))) == 40


def test_missing_dataset_json_names_the_file(tmp_path):
  with pytest.raises(DataError, match="dataset.json"):
    decathlon.read_dataset(str(tmp_path))


def test_non_nifti_file_is_a_data_error(tmp_path):
  bad = tmp_path / "x.nii.gz"
  bad.write_text("not a volume")
  with pytest.raises(DataError, match="x.nii.gz"):
    decathlon.load_nifti(str(bad))


def test_slices_are_preprocessed_once_and_memory_mapped(dataset_dir, tmp_path):
  cfg = base.get_config()
  cfg.data.root, cfg.data.image_size, cfg.data.slices_per_volume = dataset_dir, 16, 4
  first, _ = pipeline.load_splits(cfg, str(tmp_path))
  assert isinstance(first["train"].image, np.memmap)  # each process pages in what it reads
  keys = os.listdir(tmp_path / "slices")
  again, _ = pipeline.load_splits(cfg, str(tmp_path))
  assert os.listdir(tmp_path / "slices") == keys
  np.testing.assert_array_equal(again["val"].label, first["val"].label)
  cfg.data.image_size = 8  # other settings, other slices
  other, _ = pipeline.load_splits(cfg, str(tmp_path))
  assert len(os.listdir(tmp_path / "slices")) == 2 and other["train"].image.shape[1] == 8
