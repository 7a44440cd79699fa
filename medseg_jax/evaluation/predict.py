"""Inference: NIfTI volumes in, label-map NIfTI volumes out, in the input's space.

The volume loop is handed `run(slices) -> probabilities`: the compiled predict step over
the mesh with a train state (`mesh_run`; `training.modes` restores a run's checkpoint,
`export` reads a model file), or ONNX Runtime on a model file's graph (`export`).
In 3D (`Volumetric` settings) `run` takes windows [N,d,h,w,C] instead: a volume is
normalised and resampled to the target spacing as the volume store prepared the training
volumes, predicted by sliding windows, and its probabilities resampled back to the
input's grid before the argmax.
"""

import dataclasses
import glob
import os
from typing import Callable

import jax
import nibabel as nib
import numpy as np
from absl import logging

from medseg_jax import files
from medseg_jax.data import crop, decathlon, preprocess, resample, volume_store
from medseg_jax.errors import DataError, MedsegError
from medseg_jax.evaluation import postprocess, sliding_window
from medseg_jax.parallel import multihost, strategies

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
  shape = decathlon.read_header(path).shape
  channels = shape[3] if len(shape) == 4 else 1
  if len(shape) not in (3, 4) or channels != num_modalities:
    raise DataError(f"{path}: shape {shape} does not have the {num_modalities} modalities "
                    "the model was trained on")


def output_paths(inputs: list[str], input_arg: str, output: str, overwrite: bool,
                 probabilities: bool = False) -> list[tuple[str, str | None]]:
  """(label map, probability map or None) per input.

  OUTPUT itself for a single input when it is named *.nii[.gz], else OUTPUT/<input name>;
  probability maps go beside as <name>_probs.nii.gz.
  """
  if not os.path.isdir(input_arg) and output.endswith(NIFTI_SUFFIXES):
    labels = [output]
  else:
    labels = [os.path.join(output, os.path.basename(p)) for p in inputs]
  paths = [(p, _probs_path(p) if probabilities else None) for p in labels]
  existing = [p for pair in paths for p in pair if p and os.path.exists(p)]
  if existing and not overwrite:
    raise MedsegError(f"{existing[0]}: exists (pass --overwrite to replace it)")
  return paths


def _probs_path(label_path: str) -> str:
  stem = label_path[:-len(".gz")] if label_path.endswith(".gz") else label_path
  return stem[:-len(".nii")] + "_probs.nii.gz"


def read_run_info(workdir: str) -> dict:
  """WORKDIR/data_info.json: what the run's model was trained on (modalities, classes)."""
  return files.read_json(os.path.join(workdir, "data_info.json"),
                         "what a training run's model was trained on; --workdir must hold "
                         "a training run")


def plan(input_path: str, output: str, info: dict, overwrite: bool = False,
         probabilities: bool = False) -> list[tuple[str, tuple[str, str | None]]]:
  """(input, (label map, probability map or None)) for every volume under `input_path`,
  each input checked (header only) before anything is computed or written."""
  inputs = find_inputs(input_path)
  outputs = output_paths(inputs, input_path, output, overwrite, probabilities)
  for path in inputs:
    check_input(path, len(info["modalities"]))
  return list(zip(inputs, outputs))


Run = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Volumetric:
  """The 3D preprocessing and inference of a run (its data_info.json and config)."""

  modalities: tuple              # data.modalities: the channels used, by name or index
  schemes: tuple[str, ...]       # each channel's normalisation (mri | ct)
  ct_statistics: dict | None     # the training foreground's CT statistics
  target_spacing: tuple          # mm, the voxel spacing the network was trained at
  windows: sliding_window.Windows
  crop_nonzero: bool = False     # data.crop_to_nonzero: predict inside the non-zero box


def volumetric(info: dict, modalities, windows: sliding_window.Windows,
               crop_nonzero: bool = False) -> Volumetric:
  """`Volumetric` from what a 3D run records in data_info.json (or a model file in
  model.json), `data.modalities`, the sliding-window settings and `data.crop_to_nonzero`."""
  return Volumetric(modalities=tuple(modalities), schemes=tuple(info["normalisation"]),
                    ct_statistics=info["ct_statistics"],
                    target_spacing=tuple(info["target_spacing"]), windows=windows,
                    crop_nonzero=crop_nonzero)


def argmax(probs: np.ndarray) -> np.ndarray:
  """The labels of class probabilities [..., C] (`data.targets` turns regions' into labels)."""
  return np.argmax(probs, axis=-1)


def predict(probabilities: Callable[[str, Run], np.ndarray],
            planned: list[tuple[str, tuple[str, str | None]]], run: Run,
            post: postprocess.Postprocessing = postprocess.Postprocessing(),
            to_labels: Callable[[np.ndarray], np.ndarray] = argmax) -> None:
  """Predicts every planned volume: `probabilities(path, run)` (`predict_volume` or
  `predict_volume_3d` with the run's settings bound) preprocesses it and sends its slices
  (3D: windows) through `run(examples) -> probabilities` (every process takes part);
  process 0 writes the label map `to_labels` makes of them, post-processed by `post`."""
  if post.active:
    logging.info("Label maps keep the largest connected component of the foreground: %s, "
                 "of classes %s", post.foreground, list(post.classes))
  for src, (labels_dst, probs_dst) in planned:
    probs = probabilities(src, run)
    if jax.process_index() == 0:
      write_prediction(src, probs, labels_dst, probs_dst, post, to_labels)
      logging.info("Wrote %s", labels_dst)


def mesh_run(par: strategies.Parallel, predict_fn: Callable, state, batch: int) -> Run:
  """`run` for `predict`: the compiled `predict_fn` of `par` with `state` (placed on its
  mesh), over global batches of `batch` slices."""
  return lambda slices: _run_batched(par, predict_fn, state, slices, batch)


def predict_volume(settings: preprocess.Settings, modalities: tuple[str, ...], path: str,
                    run: Run) -> np.ndarray:
  """Class probabilities [X,Y,Z,C] in the canonical (RAS) voxel grid of the volume."""
  image = decathlon.load_nifti(path).data
  image = preprocess.select_channels(image, settings.modalities, modalities, path)
  image = preprocess.normalise(image, settings)
  axis = settings.slice_axis
  every = np.arange(image.shape[axis])
  slices, _ = preprocess.to_slices(image, np.zeros(image.shape[:3], np.int32), settings,
                                   keep=every)
  probs = run(slices)                                       # [N,size,size,C]
  in_plane = tuple(int(n) for n in np.delete(np.array(image.shape[:3]), axis))
  return np.moveaxis(preprocess.from_slices(probs, in_plane, settings), 0, axis)


def predict_volume_3d(settings: Volumetric, modalities: tuple[str, ...], path: str,
                      run: Run) -> np.ndarray:
  """Class probabilities [X,Y,Z,C] in the canonical (RAS) voxel grid of the volume, by
  sliding windows at the target spacing (over its non-zero box when the run was trained
  cropped: background outside it)."""
  volume = decathlon.load_nifti(path)
  image = preprocess.select_channels(volume.data, settings.modalities, modalities, path)
  box = crop.region(image, settings.crop_nonzero)
  prepared = volume_store.prepare_image(image[box], volume.spacing, settings.schemes,
                                        settings.ct_statistics, settings.target_spacing)
  probs = settings.windows.apply(prepared, run)
  probs = resample.resample_probabilities(probs, crop.shape_of(box))
  return crop.background_outside(probs, box, image.shape[:3])


def _run_batched(par: strategies.Parallel, predict_fn, state, slices: np.ndarray,
                 batch: int) -> np.ndarray:
  """Runs `predict_fn` over `slices` in padded global batches sharded across the mesh.

  Every process holds all the slices, feeds its own rows of each global batch and gets
  the probabilities of the whole batch back."""
  rows = par.local_rows(batch)
  out = []
  for start in range(0, len(slices), batch):
    chunk = slices[start:start + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:],
                                              chunk.dtype)])
    probs = predict_fn(state, par.put_batch({"image": padded[rows]})["image"])
    out.append(multihost.gather(probs)[:len(chunk)])
  return np.concatenate(out)


def write_prediction(src: str, probs: np.ndarray, labels_dst: str,
                     probs_dst: str | None = None,
                     post: postprocess.Postprocessing = postprocess.Postprocessing(),
                     to_labels: Callable[[np.ndarray], np.ndarray] = argmax) -> None:
  """Writes the labels of `probs` (their argmax, or `to_labels`'s) as uint8,
  post-processed by `post` (and optionally the float32 probabilities [.., C]) with the
  input's shape, affine and spatial header."""
  original = nib.load(src)
  ras_to_original = nib.orientations.ornt_transform(
      nib.orientations.axcodes2ornt(("R", "A", "S")),
      nib.orientations.io_orientation(original.affine))
  probs = nib.orientations.apply_orientation(probs, ras_to_original)
  if probs.shape[:3] != original.shape[:3]:
    raise AssertionError(f"prediction shape {probs.shape[:3]} != input {original.shape[:3]}")
  _save(post(to_labels(probs).astype(np.uint8)), original, labels_dst)
  if probs_dst:
    _save(probs.astype(np.float32), original, probs_dst)


def _save(data: np.ndarray, original: nib.Nifti1Image, path: str) -> None:
  """Saves `data` with `original`'s affine and header (dtype and shape updated), atomically."""
  header = original.header.copy()
  header.set_data_dtype(data.dtype)
  img = nib.Nifti1Image(data, original.affine, header)
  img.header.set_slope_inter(1, 0)
  with files.atomic_path(path) as tmp:
    nib.save(img, tmp)
