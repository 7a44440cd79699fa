"""Checkpoint inference: NIfTI volumes in, label-map NIfTI volumes out, in the input's space."""

import glob
import json
import os
import tempfile

import jax
import ml_collections
import nibabel as nib
import numpy as np
from absl import logging
from scipy import ndimage

from medseg_jax import checkpoint, parallel, train
from medseg_jax.data import decathlon, preprocess
from medseg_jax.errors import DataError, MedsegError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def find_inputs(path: str) -> list[str]:
  """The NIfTI files named by `path` (a file or a directory of them)."""
  if os.path.isdir(path):
    found = sorted(p for p in glob.glob(os.path.join(path, "*")) if p.endswith(NIFTI_SUFFIXES))
    if not found:
      raise DataError(f"{path}: no .nii or .nii.gz files to predict")
    return found
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file or directory")
  if not path.endswith(NIFTI_SUFFIXES):
    raise DataError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
  return [path]


def check_input(path: str, num_modalities: int) -> None:
  """Reads the header only: a readable 3D or 4D volume with the training modalities."""
  try:
    shape = nib.load(path).shape
  except Exception as e:  # nibabel raises many types for damaged or foreign files
    raise DataError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})")
  channels = shape[3] if len(shape) == 4 else 1
  if len(shape) not in (3, 4) or channels != num_modalities:
    raise DataError(f"{path}: shape {shape} does not have the {num_modalities} modalities "
                    "the model was trained on")


def output_paths(inputs: list[str], input_arg: str, output: str, overwrite: bool) -> list[str]:
  """One output per input: OUTPUT itself for a single file named *.nii[.gz], else OUTPUT/name."""
  if not os.path.isdir(input_arg) and output.endswith(NIFTI_SUFFIXES):
    paths = [output]
  else:
    paths = [os.path.join(output, os.path.basename(p)) for p in inputs]
  existing = [p for p in paths if os.path.exists(p)]
  if existing and not overwrite:
    raise MedsegError(f"{existing[0]}: exists (pass --overwrite to replace it)")
  return paths


def predict(cfg: ml_collections.ConfigDict, workdir: str, input_path: str, output: str,
            step: int | None = None, overwrite: bool = False) -> list[str]:
  """Predicts every volume under `input_path` with the checkpoint at `step` (latest if None)."""
  checkpoint.require_checkpoint(workdir)
  inputs = find_inputs(input_path)
  outputs = output_paths(inputs, input_path, output, overwrite)
  info_path = os.path.join(workdir, "data_info.json")
  if not os.path.isfile(info_path):
    raise MedsegError(f"{info_path}: not found; --workdir must hold a training run")
  with open(info_path) as f:
    info = json.load(f)
  for path in inputs:  # every input is checked before anything is written
    check_input(path, len(info["modalities"]))
  par = parallel.make_parallel(cfg.parallel.strategy, cfg.parallel.num_devices)
  state, _ = train.build_state(cfg, par, info["num_classes"], info["channels"], 1,
                               jax.random.key(0))
  ckpt = checkpoint.Checkpointer(workdir, 0, cfg.checkpoint.max_to_keep)
  state = par.put_state(ckpt.restore(state, par.replicated, step))
  ckpt.close()
  predict_fn = par.predict_step()
  batch = (cfg.train.eval_batch_size or cfg.train.per_device_batch_size) * par.num_devices
  for src, dst in zip(inputs, outputs):
    probs = _predict_volume(cfg, info, src, lambda x: _run_batched(par, predict_fn, state, x, batch))
    _write_label_map(src, probs, dst)
    logging.info("Wrote %s", dst)
  return outputs


def _predict_volume(cfg, info: dict, path: str, run) -> np.ndarray:
  """Class probabilities [X,Y,Z,C] in the canonical (RAS) voxel grid of the volume."""
  image, _, _ = decathlon.load_nifti(path)
  image = preprocess.select_channels(image, tuple(cfg.data.modalities),
                                     tuple(info["modalities"]), path)
  image = preprocess.zscore_nonzero(image)
  axis, size = cfg.data.slice_axis, cfg.data.image_size
  dummy = np.zeros(image.shape[:3], np.int32)
  slices, _ = preprocess.to_slices(image, dummy, axis, 0, size)
  probs = run(slices)                                       # [N,size,size,C]
  in_plane = tuple(np.delete(np.array(image.shape[:3]), axis))
  zoom = (1, in_plane[0] / size, in_plane[1] / size, 1)
  if zoom != (1, 1.0, 1.0, 1):
    probs = ndimage.zoom(probs, zoom, order=1, grid_mode=True, mode="nearest")
  return np.moveaxis(probs, 0, axis)


def _run_batched(par: parallel.Parallel, predict_fn, state, slices: np.ndarray,
                 batch: int) -> np.ndarray:
  """Runs `predict_fn` over `slices` in padded global batches sharded across the mesh."""
  out = []
  for start in range(0, len(slices), batch):
    chunk = slices[start:start + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:],
                                              chunk.dtype)])
    probs = predict_fn(state, par.put_batch({"image": padded})["image"])
    out.append(np.asarray(jax.device_get(probs))[:len(chunk)])
  return np.concatenate(out)


def _write_label_map(src: str, probs: np.ndarray, dst: str) -> None:
  """Writes argmax labels as uint8 with the input's shape, affine and spatial header."""
  original = nib.load(src)
  ras_to_original = nib.orientations.ornt_transform(
      nib.orientations.axcodes2ornt(("R", "A", "S")),
      nib.orientations.io_orientation(original.affine))
  labels = nib.orientations.apply_orientation(np.argmax(probs, -1), ras_to_original)
  header = original.header.copy()
  header.set_data_dtype(np.uint8)
  out = nib.Nifti1Image(labels.astype(np.uint8), original.affine, header)
  out.header.set_slope_inter(1, 0)
  if out.shape != original.shape[:3]:
    raise AssertionError(f"prediction shape {out.shape} != input {original.shape[:3]}")
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".nii.gz" if dst.endswith(".gz") else ".nii",
                             dir=os.path.dirname(os.path.abspath(dst)))
  os.close(fd)
  try:
    nib.save(out, tmp)
    os.replace(tmp, dst)
  except BaseException:
    os.unlink(tmp)
    raise
