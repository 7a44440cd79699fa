"""Each thesis config trains end to end on a dataset with its task's structure: a 4D
four-modality brain set with Decathlon Task01's modality names and labels 0-3, and a 3D
single-modality heart set with labels 0-1 (small slices, two steps, one validation, the
test split). The FCN configs start from a VGG-16 file of the same structure."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

import helpers
from medseg_jax import config
from medseg_jax.data import synthetic
from medseg_jax.errors import ConfigError
from test_pretrained import vgg_arrays, write_h5, write_mat

# Task01_BrainTumour's and Task02_Heart's dataset.json entries.
BRAIN = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
         "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor",
                    "3": "enhancing tumour"}}
HEART = {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"}}
SHAPE = (40, 40, 12)
VOLUMES = 8


def _case(rng, task):
  """A phantom with the task's channels and labels; the brain's tumour core is split into
  a non-enhancing (2) and an enhancing (3) half."""
  image, label = synthetic.make_phantom(rng, SHAPE, synthetic.MODALITIES_4D)
  if task is HEART:
    return image[..., 1], (label > 0).astype(np.uint8)  # one channel, one structure
  right = np.arange(SHAPE[0])[:, None, None] >= SHAPE[0] // 2
  return image, np.where((label == 2) & right, 3, label).astype(np.uint8)


def write_task(root, task, seed=0):
  """A Decathlon task directory with `VOLUMES` labelled subjects and one test subject."""
  rng = np.random.default_rng(seed)
  for sub in ("imagesTr", "labelsTr", "imagesTs"):
    os.makedirs(os.path.join(root, sub))
  affine = np.diag([1.0, 1.0, 2.0, 1.0])
  training = []
  for i in range(VOLUMES + 1):
    image, label = _case(rng, task)
    name = f"case_{i:03d}.nii.gz"
    folder = "imagesTr" if i < VOLUMES else "imagesTs"
    nib.save(nib.Nifti1Image(image, affine), os.path.join(root, folder, name))
    if i < VOLUMES:
      nib.save(nib.Nifti1Image(label, affine), os.path.join(root, "labelsTr", name))
      training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
  meta = dict(task, name=os.path.basename(root), tensorImageSize="4D" if task is BRAIN else "3D",
              numTraining=VOLUMES, numTest=1, training=training,
              test=[f"./imagesTs/case_{VOLUMES:03d}.nii.gz"])
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump(meta, f)
  return root


def _imagenet_scaled(layers):
  """Kernels at a trained network's scale (He: std sqrt(2 / fan-in)), conv1_1 for pixels
  of about 58 times a z-scored value, so the activations stay finite through 15 layers."""
  scaled = {}
  for name, (w, b) in layers.items():
    std = np.sqrt(2 / np.prod(w.shape[:3])) / (58.0 if name == "conv1_1" else 1.0)
    scaled[name] = ((w * std).astype(np.float32), (0.01 * b).astype(np.float32))
  return scaled


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
  root = tmp_path_factory.mktemp("decathlon")
  layers = _imagenet_scaled(vgg_arrays())  # base width 4, fc width 8
  write_mat(str(root / "vgg16.mat"), layers)
  write_h5(str(root / "vgg16.h5"), layers)
  return {"brats": write_task(str(root / "Task01_BrainTumour"), BRAIN),
          "heart": write_task(str(root / "Task02_Heart"), HEART, seed=1),
          "mat": str(root / "vgg16.mat"), "h5": str(root / "vgg16.h5")}


# (config, VGG-16 file of the FCN, class names, slices drawn per epoch)
CASES = [("unet_brats", None, ["background", "edema+non-enhancing tumor+enhancing tumour"], 24),
         ("fcn_brats", "mat", ["background", "edema+non-enhancing tumor+enhancing tumour"], 24),
         ("unet_heart", None, ["background", "left atrium"], 35000),
         ("fcn_heart", "h5", ["background", "left atrium"], 35000)]


@pytest.mark.parametrize("name,vgg,classes,draws", CASES, ids=[c[0] for c in CASES])
def test_thesis_config_trains_validates_and_tests(tasks, tmp_path, caplog, name, vgg, classes,
                                                  draws):
  small = ["--config.data.image_size=32", "--config.data.slices_per_volume=4",
           "--config.model.base_features=4", "--config.model.fc_features=8",
           "--config.data.preprocess_workers=1", "--config.parallel.num_devices=1",
           "--config.train.num_steps=2", "--config.train.eval_every_steps=2",
           "--config.checkpoint.every_steps=2", "--config.monitor.system_interval_seconds=0",
           f"--config.data.cache_dir={tmp_path / 'cache'}"]
  task = tasks["heart" if "heart" in name else "brats"]
  weights = str(tmp_path / os.path.basename(tasks[vgg])) if vgg else None
  if vgg:
    shutil.copy(tasks[vgg], weights)
  init = [f"--config.model.init_from={weights}"] if vgg else []
  cfg = helpers.config(*small, f"--config.data.root={task}", *init,
                       path=f"configs/{name}.py")
  config.check(cfg)  # as main does before any data work
  caplog.set_level("INFO")
  result = helpers.train(cfg, str(tmp_path / "run"))
  with open(tmp_path / "run" / "data_info.json") as f:
    info = json.load(f)
  # Brain: the T1w channel of the four, every tumour label one class; heart: MRI.
  assert info["modalities"] == list((BRAIN if "brats" in name else HEART)["modality"].values())
  assert info["channels"] == 1 and info["samples_per_epoch"] == draws
  with open(tmp_path / "run" / "eval" / "val_metrics.json") as f:
    assert json.load(f)["step"] == 2  # the one validation
  assert len(result["per_class"]) == len(classes) and 0 <= result["dice"] <= 1
  assert helpers.class_names(cfg, info) == classes
  assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")
          if "loss" in json.loads(line)] == [2]
  if vgg:  # 13 convolutions and fc6/fc7 from the file; the six score/upscore layers new
    assert f"model.init_from={weights}: 15 layers loaded" in caplog.text
    # Once trained, the run no longer needs the VGG-16 file: only a fresh start reads it.
    os.remove(weights)
    with pytest.raises(ConfigError, match=f"model.init_from={weights}: no such file"):
      config.check(cfg)
    config.check(cfg, starts_fresh=False)
    helpers.evaluate(cfg, str(tmp_path / "run"), "best")


@pytest.mark.parametrize("name,classes", [
    ("unet3d_brats", ["background", "edema+non-enhancing tumor+enhancing tumour"]),
    ("unet3d_heart", ["background", "left atrium"])])
def test_3d_config_trains_validates_and_tests(tasks, tmp_path, name, classes):
  """The 3D configs on the same tasks: volumes at the median spacing, patches, windows."""
  small = ["--config.data.patch_size=(16, 16, 8)", "--config.model.depth=1",
           "--config.model.base_features=4", "--config.data.preprocess_workers=1",
           "--config.parallel.num_devices=1", "--config.train.num_steps=2",
           "--config.train.eval_every_steps=2", "--config.checkpoint.every_steps=2",
           "--config.monitor.system_interval_seconds=0", "--config.evaluation.mirror=False",
           f"--config.data.cache_dir={tmp_path / 'cache'}"]
  task = tasks["heart" if "heart" in name else "brats"]
  cfg = helpers.config(*small, f"--config.data.root={task}", path=f"configs/{name}.py")
  config.check(cfg)
  result = helpers.train(cfg, str(tmp_path / "run"))
  with open(tmp_path / "run" / "data_info.json") as f:
    info = json.load(f)
  assert info["spatial_dims"] == 3 and info["target_spacing"] == [1.0, 1.0, 2.0]
  assert info["channels"] == 1 and info["samples_per_epoch"] == 500
  assert len(result["per_class"]) == len(classes) and 0 <= result["dice"] <= 1
  assert helpers.class_names(cfg, info) == classes
  assert sum(c["support"] for c in result["per_class"]) == (
      info["volumes"]["test"] * np.prod(SHAPE))
