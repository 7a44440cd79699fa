"""Decathlon datasets on disk, read back with nibabel: slices, splits, the slice store, the loader."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from medseg_jax import defaults
from medseg_jax.data import decathlon, loader, preprocess, split, synthetic
from medseg_jax.errors import ConfigError, DataError
import helpers


def write_task(root, subjects, modalities=("T1w",), tensor_size=None, labels=3):
  """A Decathlon directory from (name, image array, label array, affine) tuples."""
  for sub in ("imagesTr", "labelsTr"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  training = []
  for name, image, label, affine in subjects:
    nib.save(nib.Nifti1Image(image, affine), os.path.join(root, "imagesTr", f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), os.path.join(root, "labelsTr", f"{name}.nii.gz"))
    training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
  meta = {"name": "Task", "modality": {str(i): m for i, m in enumerate(modalities)},
          "labels": {str(i): f"l{i}" for i in range(labels)}, "training": training, "test": []}
  if tensor_size:
    meta["tensorImageSize"] = tensor_size
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump(meta, f)
  return root


def config(root, tmp_path, **data):
  cfg = defaults.get_config()
  cfg.data.root, cfg.data.cache_dir = str(root), str(tmp_path / "cache")
  cfg.data.preprocess_workers = 1
  cfg.data.val_fraction = cfg.data.test_fraction = 0.0
  for key, value in data.items():
    setattr(cfg.data, key, value)
  return cfg


def phantom(seed, shape, modalities=("T1w",)):
  image, label = synthetic.make_phantom(np.random.default_rng(seed), shape, modalities)
  return (image if len(modalities) > 1 else image[..., 0]), label


def zscore(x):
  """Reference: z-score over the non-zero voxels, by hand."""
  inside = x != 0
  out = np.zeros_like(x, dtype=np.float64)
  out[inside] = (x[inside] - x[inside].mean()) / x[inside].std()
  return out


def all_rows(data):
  return np.asarray(data.image), np.asarray(data.label)


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
  np.testing.assert_allclose(np.abs(np.diag(image.affine))[:3], synthetic.SPACING)
  values = set(np.unique(np.asarray(label.dataobj)).tolist())
  assert values <= {0, 1, 2} and {1, 2} & values


def test_same_seed_same_data(tmp_path):
  a = synthetic.write_synthetic_decathlon(str(tmp_path / "a"), 2, 0, (24, 24, 8), seed=5)
  b = synthetic.write_synthetic_decathlon(str(tmp_path / "b"), 2, 0, (24, 24, 8), seed=5)
  for sub in ("imagesTr", "labelsTr"):
    x = nib.load(os.path.join(a, sub, "phantom_001.nii.gz")).get_fdata()
    y = nib.load(os.path.join(b, sub, "phantom_001.nii.gz")).get_fdata()
    np.testing.assert_array_equal(x, y)


def test_an_anisotropic_ct_dataset_of_several_shapes(tmp_path):
  """Read back with nibabel: the spacing asked for, shapes within the jitter, and CT-like
  values: air outside the head, the tumour brighter and the oedema darker than tissue."""
  root = synthetic.write_synthetic_decathlon(str(tmp_path / "ct"), 3, 0, (40, 40, 10), seed=2,
                                             spacing=(0.8, 0.8, 3.0), shape_jitter=0.2,
                                             modality="CT")
  meta = json.load(open(os.path.join(root, "dataset.json")))
  assert meta["modality"] == {"0": "CT"}
  shapes = set()
  for entry in meta["training"]:
    image = nib.load(os.path.join(root, entry["image"]))
    label = np.asarray(nib.load(os.path.join(root, entry["label"])).dataobj)
    np.testing.assert_allclose(image.header.get_zooms()[:3], (0.8, 0.8, 3.0))
    assert all(0.8 * 40 - 1 <= n <= 1.2 * 40 + 1 for n in image.shape[:2])
    assert 0.8 * 10 - 1 <= image.shape[2] <= 1.2 * 10 + 1
    shapes.add(image.shape)
    data = np.asarray(image.dataobj)
    assert abs(np.median(data[0]) + 1000) < 50  # the first plane is air
    tissue = np.median(data[(label == 0) & (np.abs(data - 40) < 30)])
    assert data[label == 2].mean() > tissue > data[label == 1].mean()
  assert len(shapes) == 3


def test_canonical_reorientation_flips_lps_to_ras(dataset_dir):
  path = os.path.join(dataset_dir, "labelsTr", "phantom_000.nii.gz")
  raw = np.asarray(nib.load(path).dataobj)
  volume = decathlon.load_nifti(path)
  assert volume.affine[0, 0] < 0 and volume.shape == raw.shape
  assert volume.spacing == synthetic.SPACING
  np.testing.assert_array_equal(volume.data, raw[::-1, ::-1, :])  # x and y flipped to RAS


def test_3d_anisotropic_odd_slices_match_nibabel(tmp_path):
  """Stored slices equal the file read with nibabel, flipped to RAS and z-scored by hand."""
  affine = np.diag([-0.7, 1.3, 3.1, 1.0])  # x flipped (to RAS: reversed), anisotropic
  subjects = [(f"s{i}",) + phantom(i, (21, 17, 9)) + (affine,) for i in range(3)]
  root = write_task(str(tmp_path / "T"), subjects)
  cfg = config(root, tmp_path, image_size=21, resize="pad_crop", slice_selection="all")
  sets, info = helpers.load_splits(cfg, str(tmp_path / "w"))
  data = sets["train"]
  assert info["slices"]["train"] == 27 and data.image.shape == (27, 21, 21, 1)
  images, labels = all_rows(data)
  for v, name in enumerate(data.names):
    raw_image = nib.load(os.path.join(root, "imagesTr", f"{name}.nii.gz")).get_fdata()
    raw_label = np.asarray(nib.load(os.path.join(root, "labelsTr", f"{name}.nii.gz")).dataobj)
    ref_image = np.moveaxis(zscore(raw_image[::-1]), 2, 0)   # [9,21,17]
    ref_label = np.moveaxis(raw_label[::-1], 2, 0)
    rows = data.volume == v
    # pad_crop: the 17 columns sit in the middle of 21 (2 before, 2 after), zeros around.
    np.testing.assert_allclose(images[rows, :, 2:19, 0], ref_image, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(labels[rows, :, 2:19], ref_label)
    assert not images[rows][:, :, :2].any() and not labels[rows][:, :, 19:].any()
    np.testing.assert_allclose(data.spacing[v], [3.1, 0.7, 1.3], rtol=1e-6)


def test_4d_modalities_central_slices_and_label_map(tmp_path):
  modalities = synthetic.MODALITIES_4D
  affine = np.diag([1.0, 1.0, 2.0, 1.0])
  subjects = [(f"s{i}",) + phantom(i, (16, 16, 11), modalities) + (affine,) for i in range(2)]
  root = write_task(str(tmp_path / "T"), subjects, modalities, tensor_size="4D")
  cfg = config(root, tmp_path, image_size=16, modalities=("T2w", "FLAIR"),
               label_map=(0, 1, 1), slices_per_volume=5)
  sets, _ = helpers.load_splits(cfg, str(tmp_path / "w"))
  images, labels = all_rows(sets["train"])
  assert images.shape == (10, 16, 16, 2)
  for v, name in enumerate(sets["train"].names):
    raw = nib.load(os.path.join(root, "imagesTr", f"{name}.nii.gz")).get_fdata()
    raw_label = np.asarray(nib.load(os.path.join(root, "labelsTr", f"{name}.nii.gz")).dataobj)
    rows = sets["train"].volume == v
    for c, m in enumerate((3, 0)):  # T2w, FLAIR; central 5 of 11 slices are 3..7
      ref = np.moveaxis(zscore(raw[..., m]), 2, 0)[3:8]
      np.testing.assert_allclose(images[rows, ..., c], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(labels[rows], np.moveaxis(raw_label > 0, 2, 0)[3:8])


def test_foreground_selection_percentile_and_resize(tmp_path):
  affine = np.eye(4)
  label = np.zeros((12, 12, 10), np.uint8)
  label[4:8, 4:8, 3:5] = 1                        # foreground on slices 3 and 4 only
  image = np.random.default_rng(0).gamma(2.0, 10.0, (12, 12, 10)).astype(np.float32)
  root = write_task(str(tmp_path / "T"), [("a", image, label, affine)], labels=2)
  cfg = config(root, tmp_path, image_size=6, slice_selection="foreground",
               empty_slice_fraction=0.25, normalisation="percentile",
               clip_percentiles=(5.0, 95.0))
  sets, _ = helpers.load_splits(cfg, str(tmp_path / "w"))
  images, labels = all_rows(sets["train"])
  # Empty slices 0,1,2,5..9 (8 of them); a quarter, evenly spaced: 0 and 9.
  kept = [0, 3, 4, 9]
  lo, hi = np.percentile(image, [5.0, 95.0])
  ref = (np.clip(image, lo, hi) - lo) / (hi - lo)
  # 12 -> 6 with linear interpolation on the pixel-centre grid: means of 2x2 blocks.
  ref = ref.reshape(6, 2, 6, 2, 10).mean(axis=(1, 3))
  np.testing.assert_allclose(images[..., 0], np.moveaxis(ref, 2, 0)[kept], atol=1e-5)
  assert labels[1:3].sum() == 2 * 4 and labels[[0, 3]].sum() == 0  # nearest: 4x4 -> 2x2


def test_split_is_by_subject_recorded_and_stable(dataset_dir, tmp_path):
  cfg = config(dataset_dir, tmp_path, image_size=16, slices_per_volume=4)
  cfg.data.val_fraction = cfg.data.test_fraction = 0.2
  sets, info = helpers.load_splits(cfg, str(tmp_path / "a"))
  with open(tmp_path / "a" / "split.json") as f:
    recorded = json.load(f)
  names = [n for s in split.SPLITS for n in recorded[s]]
  assert sorted(names) == [f"phantom_{i:03d}" for i in range(6)]  # each subject exactly once
  assert info["volumes"] == {"train": 4, "val": 1, "test": 1}
  assert sets["train"].image.shape == (16, 16, 16, 1)
  for s in split.SPLITS:  # each slice's subject is its split's
    assert sets[s].names == recorded[s] and len(sets[s]) == 4 * len(recorded[s])
  again, _ = helpers.load_splits(cfg, str(tmp_path / "b"))  # another run, the same seed
  assert {s: again[s].names for s in split.SPLITS} == recorded
  cfg.seed = 1  # a resumed run keeps its recorded split even if the seed changed
  resumed, _ = helpers.load_splits(cfg, str(tmp_path / "a"))
  assert {s: resumed[s].names for s in split.SPLITS} == recorded
  np.testing.assert_allclose(sets["val"].spacing, [[2.0, 2.0, 2.0]])


def test_store_is_reused_and_invalidated(dataset_dir, tmp_path):
  cfg = config(dataset_dir, tmp_path, image_size=16, slices_per_volume=4)
  cache = tmp_path / "cache"
  first, _ = helpers.load_splits(cfg, str(tmp_path / "w1"))
  (store_dir,) = os.listdir(cache)
  marker = os.path.getmtime(cache / store_dir / "meta.json")
  again, _ = helpers.load_splits(cfg, str(tmp_path / "w2"))  # another run, same settings
  assert os.listdir(cache) == [store_dir]
  assert os.path.getmtime(cache / store_dir / "meta.json") == marker
  np.testing.assert_array_equal(np.asarray(again["train"].label), np.asarray(first["train"].label))
  cfg.data.normalisation = "percentile"  # any preprocessing setting: a new store
  helpers.load_splits(cfg, str(tmp_path / "w3"))
  assert len(os.listdir(cache)) == 2
  os.utime(os.path.join(dataset_dir, "labelsTr", "phantom_002.nii.gz"))  # a changed file
  helpers.load_splits(cfg, str(tmp_path / "w4"))
  assert len(os.listdir(cache)) == 3
  assert not [n for n in os.listdir(cache) if n.startswith(".")]


def test_store_is_built_by_several_processes(dataset_dir, tmp_path):
  one = config(dataset_dir, tmp_path, image_size=16, slices_per_volume=4)
  sets_one, _ = helpers.load_splits(one, str(tmp_path / "w1"))
  two = config(dataset_dir, tmp_path / "two", image_size=16, slices_per_volume=4,
               preprocess_workers=2)
  sets_two, _ = helpers.load_splits(two, str(tmp_path / "w2"))
  assert sets_two["train"].names == sets_one["train"].names
  np.testing.assert_array_equal(np.asarray(sets_two["train"].image),
                                np.asarray(sets_one["train"].image))


def _store_set(dataset_dir, tmp_path):
  cfg = config(dataset_dir, tmp_path, image_size=8, slices_per_volume=5)
  return helpers.load_splits(cfg, str(tmp_path / "w"))[0]["train"]  # 30 slices


def test_two_processes_read_disjoint_shards_covering_the_epoch(dataset_dir, tmp_path):
  data = _store_set(dataset_dir, tmp_path)
  images = np.asarray(data.image)
  ids = lambda batch: [int(np.argmin(np.abs(images - x).sum(axis=(1, 2, 3))))
                       for x in batch["image"]]
  whole = [ids(b) for b in loader.train_batches(data, 6, seed=1, epoch=3)]
  parts = [[ids(b) for b in loader.train_batches(data, 6, 1, 3, p, 2)] for p in range(2)]
  assert len(whole) == 5 and sorted(sum(whole, [])) == list(range(30))  # an epoch, once each
  for i, batch in enumerate(whole):
    assert not set(parts[0][i]) & set(parts[1][i])
    assert parts[0][i] + parts[1][i] == batch
  np.testing.assert_array_equal(sum(whole, []), loader.epoch_order(30, 1, 3))


@pytest.mark.parametrize("offset", [12, 7])
def test_resume_mid_epoch_sees_the_same_batches(dataset_dir, tmp_path, offset):
  data = _store_set(dataset_dir, tmp_path)
  order = loader.epoch_order(len(data), 4, 2)
  full = list(loader.train_batches(data, 4, seed=4, epoch=2, prefetch=0))
  resumed = list(loader.train_batches(data, 4, 4, 2, offset=offset))
  starts = range(offset, len(data) - 4 + 1, 4)
  assert len(resumed) == len(starts)
  images, labels = all_rows(data)
  for batch, start in zip(resumed, starts):  # the rows of the order, read independently
    np.testing.assert_array_equal(batch["image"], images[order[start:start + 4]])
    np.testing.assert_array_equal(batch["label"], labels[order[start:start + 4]])
  if offset % 4 == 0:
    for a, b in zip(full[offset // 4:], resumed):
      np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_batches_cover_the_split_with_a_mask(dataset_dir, tmp_path):
  data = _store_set(dataset_dir, tmp_path)
  images, _ = all_rows(data)
  batches = list(loader.eval_batches(data, 8))
  assert len(batches) == 4 and batches[-1]["mask"].sum() == 6
  got = np.concatenate([b["image"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(got, images)


def test_in_memory_slices_load_the_same_way():
  data = loader.SliceSet(np.arange(40, dtype=np.float32).reshape(40, 1, 1, 1),
                           np.zeros((40, 1, 1), np.int32), np.zeros(40, np.int32), ["a"],
                           np.ones((1, 3)))
  whole = [b["image"].ravel() for b in loader.train_batches(data, 8, seed=1, epoch=2)]
  assert len(whole) == 5 and len(np.unique(np.concatenate(whole))) == 40


def test_missing_dataset_json_names_the_file(tmp_path):
  with pytest.raises(DataError, match="dataset.json"):
    decathlon.read_dataset(str(tmp_path))


def test_unwritable_cache_dir_is_one_clear_error(dataset_dir, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  cfg = config(dataset_dir, tmp_path, image_size=8, slices_per_volume=2)
  cfg.data.cache_dir = str(blocker / "cache")
  with pytest.raises(DataError, match="data.cache_dir"):
    helpers.load_splits(cfg, str(tmp_path / "w"))


def test_bad_preprocessing_settings_are_config_errors(dataset_dir, tmp_path):
  from medseg_jax.errors import ConfigError
  for key, value in [("slice_selection", "middle"), ("resize", "stretch"),
                     ("normalisation", "minmax"), ("clip_percentiles", (99.0, 1.0)),
                     ("empty_slice_fraction", 1.5)]:
    cfg = config(dataset_dir, tmp_path, **{key: value})
    with pytest.raises(ConfigError, match=f"data.{key}"):
      preprocess.settings_from_config(cfg.data)


# The data path in order: a module may import only the ones listed before it.
DATA_STAGES = ("targets", "source", "synthetic", "augment", "augment3d", "decathlon", "preprocess", "crop", "resample",
               "pool", "validate", "store", "volume_store", "split", "loader", "patches",
               "volume_loader", "pipeline")


def test_data_stages_import_only_the_stages_below_and_one_module_reads_nifti():
  import ast
  import glob
  package = os.path.join(os.path.dirname(os.path.dirname(__file__)), "medseg_jax")
  modules = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(package, "data", "*.py"))
             if not p.endswith("__init__.py")}
  assert sorted(modules) == sorted(DATA_STAGES)
  for i, name in enumerate(DATA_STAGES):
    with open(modules[name]) as f:
      tree = ast.parse(f.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "medseg_jax.data" for alias in node.names}
    assert imported <= set(DATA_STAGES[:i]), (name, imported - set(DATA_STAGES[:i]))
    reads = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "load"
             and isinstance(n.value, ast.Name) and n.value.id == "nib"]
    assert not reads or name == "decathlon", name  # the one NIfTI reader
  sources = [open(p).read() for p in glob.glob(os.path.join(package, "**", "*.py"), recursive=True)]
  assert sum(s.count("cannot read as NIfTI") for s in sources) == 1


def _four_subjects_one_without_label(tmp_path):
  subjects = [(f"s{i}",) + phantom(i, (16, 16, 6)) + (np.eye(4),) for i in range(4)]
  root = write_task(str(tmp_path / "T"), subjects)
  os.remove(os.path.join(root, "labelsTr", "s2.nii.gz"))
  return root


def test_plan_counts_the_slices_training_uses_when_invalid_subjects_are_skipped(tmp_path):
  root = _four_subjects_one_without_label(tmp_path)
  cfg = config(root, tmp_path, image_size=16, slices_per_volume=0, skip_invalid=True)
  cfg.data.val_fraction = 0.25
  planned = helpers.train_count(cfg, str(tmp_path / "plan"))
  sets, info = helpers.load_splits(cfg, str(tmp_path / "train"))
  # By hand: s2 is left out; of the 3 others one is validation, so 2 x 6 slices train.
  assert "s2" not in sets["train"].names and info["skipped"] == ["s2"]
  assert len(sets["train"]) == 12
  assert planned == 12
  cfg.train.per_device_batch_size, cfg.train.num_epochs = 2, 10
  plan = helpers.epoch_plan(cfg, planned, 3)
  assert (plan.global_batch, plan.steps_per_epoch, plan.num_steps) == (6, 2, 20)
  with pytest.raises(ConfigError, match="global batch 14 exceeds the 12 training slices"):
    helpers.epoch_plan(cfg, planned, 7)


def test_plan_counts_from_headers_what_training_uses_on_a_valid_dataset(dataset_dir, tmp_path):
  for selection, extra in (("central", {"slices_per_volume": 4}), ("all", {}),
                           ("foreground", {"empty_slice_fraction": 0.5})):
    cfg = config(dataset_dir, tmp_path / selection, image_size=8, slice_selection=selection,
                 **extra)
    cfg.data.val_fraction = cfg.data.test_fraction = 0.2
    planned = helpers.train_count(cfg, str(tmp_path / selection / "plan"))
    assert not os.path.exists(tmp_path / selection / "cache")  # from headers: no store built
    sets, _ = helpers.load_splits(cfg, str(tmp_path / selection / "train"))
    assert planned == len(sets["train"]), selection


def test_classes_merged_by_label_map_are_named_after_their_labels():
  cfg = defaults.get_config()
  info = {"labels": ("background", "oedema", "non-enhancing", "enhancing")}
  assert helpers.class_names(cfg, info) == list(info["labels"])
  cfg.data.label_map = (0, 1, 1, 1)
  assert helpers.class_names(cfg, info) == ["background", "oedema+non-enhancing+enhancing"]
  cfg.data.label_map = (0, 2, 2, 1)
  assert helpers.class_names(cfg, info) == ["background", "enhancing", "oedema+non-enhancing"]
  cfg.data.label_map = (0, 3, 3, 3)  # classes 1 and 2 have no source label
  assert helpers.class_names(cfg, info) == ["background", "class 1", "class 2",
                                             "oedema+non-enhancing+enhancing"]


def test_a_longer_epoch_draws_every_slice_equally_often_in_a_seeded_order():
  # 10 slices, 23 draws: by hand each slice 2 or 3 times, 3 slices 3 times (23 = 2*10 + 3).
  order = loader.epoch_order(10, seed=5, epoch=1, draws=23)
  counts = np.bincount(order, minlength=10)
  assert len(order) == 23 and sorted(counts.tolist()) == [2] * 7 + [3] * 3
  np.testing.assert_array_equal(order, loader.epoch_order(10, 5, 1, 23))  # deterministic
  assert not np.array_equal(order, loader.epoch_order(10, 5, 2, 23))      # epochs differ
  assert not np.array_equal(order, loader.epoch_order(10, 6, 1, 23))      # seeds differ
  # Exact multiples draw every slice the same number of times; fewer draws than slices
  # draw each slice at most once.
  assert set(np.bincount(loader.epoch_order(10, 5, 1, 30)).tolist()) == {3}
  assert np.bincount(loader.epoch_order(10, 5, 1, 7), minlength=10).max() == 1
  # One pass (0) is a permutation, as before the option existed.
  np.testing.assert_array_equal(np.sort(loader.epoch_order(10, 5, 1)), np.arange(10))


def test_a_longer_epoch_loads_its_draws_and_resumes_anywhere_in_them():
  data = loader.SliceSet(np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1),
                         np.zeros((10, 1, 1), np.int32), np.zeros(10, np.int32), ["a"],
                         np.ones((1, 3)))
  order = loader.epoch_order(10, 3, 0, 30)
  full = [b["image"].ravel() for b in loader.train_batches(data, 4, 3, 0, draws=30)]
  assert len(full) == 7  # 30 draws, batch 4: 7 full batches, 2 draws dropped
  np.testing.assert_array_equal(np.concatenate(full), order[:28])
  resumed = [b["image"].ravel() for b in loader.train_batches(data, 4, 3, 0, offset=16,
                                                               draws=30)]
  np.testing.assert_array_equal(np.concatenate(resumed), order[16:28])  # past one pass


def test_plan_counts_steps_per_epoch_from_the_draws():
  cfg = defaults.get_config()
  cfg.train.per_device_batch_size, cfg.train.num_epochs = 2, 10
  cfg.data.augment.samples_per_epoch = 35000
  plan = helpers.epoch_plan(cfg, 1200, 8)
  # By hand: 35,000 draws / global batch 16 = 2187 steps per epoch, 21,870 steps.
  assert (plan.epoch_draws, plan.steps_per_epoch, plan.num_steps) == (35000, 2187, 21870)
  cfg.data.augment.samples_per_epoch = 0
  assert helpers.epoch_plan(cfg, 1200, 8).steps_per_epoch == 75  # 1200 // 16
  cfg.data.augment.samples_per_epoch = 10
  with pytest.raises(ConfigError, match="global batch 16 exceeds the data.augment.samples"):
    helpers.epoch_plan(cfg, 1200, 8)
