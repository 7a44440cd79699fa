"""Reading a Medical Segmentation Decathlon task: dataset.json, and the one NIfTI reader
(every volume the package reads is reoriented to RAS here)."""

import contextlib
import dataclasses
import json
import os

import nibabel as nib
import numpy as np

from medseg_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Case:
  """One labelled subject: paths of its image and label volumes."""

  name: str
  image: str
  label: str


@dataclasses.dataclass(frozen=True)
class Dataset:
  root: str
  name: str
  modalities: tuple[str, ...]   # index -> name, as in dataset.json "modality"
  labels: tuple[str, ...]       # label value -> name
  training: tuple[Case, ...]
  test: tuple[str, ...]         # unlabelled images
  tensor_size: str = ""         # "3D" or "4D" as dataset.json declares it ("" if absent)


def read_dataset(root: str) -> Dataset:
  """Parses `root/dataset.json`; a missing or malformed file is a DataError naming it.

  The contents (an empty training list, missing volumes) are checked by `validate`."""
  path = os.path.join(root, "dataset.json")
  if not os.path.isfile(path):
    raise DataError(f"{path}: not found (data.root must be a Decathlon task directory)")
  try:
    with open(path) as f:
      meta = json.load(f)
    modalities = _indexed_names(meta["modality"])
    labels = _indexed_names(meta["labels"])
    training = tuple(_case(root, entry) for entry in meta["training"])
    test = tuple(_resolve(root, p) for p in meta.get("test", []))
    tensor_size = str(meta.get("tensorImageSize", "")).upper()
  except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
    raise DataError(f"{path}: not a valid Decathlon dataset.json ({type(e).__name__}: {e})")
  return Dataset(root=root, name=str(meta.get("name", os.path.basename(root))),
                 modalities=modalities, labels=labels, training=training, test=test,
                 tensor_size=tensor_size)


def _indexed_names(mapping: dict) -> tuple[str, ...]:
  """{"0": "FLAIR", "1": "T1w"} -> ("FLAIR", "T1w")."""
  indices = sorted(int(k) for k in mapping)
  if indices != list(range(len(indices))):
    raise ValueError(f"keys must be 0..n-1, got {sorted(mapping)}")
  return tuple(str(mapping[str(i)]) for i in indices)


def _resolve(root: str, rel: str) -> str:
  return os.path.normpath(os.path.join(root, rel))


def _case(root: str, entry: dict) -> Case:
  image = _resolve(root, entry["image"])
  name = os.path.basename(image).split(".nii")[0]
  return Case(name=name, image=image, label=_resolve(root, entry["label"]))


@dataclasses.dataclass(frozen=True)
class Volume:
  """A volume in the closest canonical (RAS) orientation, with what is needed to go back."""

  data: np.ndarray                  # [X,Y,Z] or [X,Y,Z,M], canonical voxel order
  affine: np.ndarray                # the file's original affine
  shape: tuple[int, ...]            # the file's original shape
  spacing: tuple[float, float, float]  # voxel size in mm along the canonical axes


def load_nifti(path: str) -> Volume:
  """Loads a NIfTI volume reoriented to the closest canonical (RAS) orientation; its voxels
  are read here, so a damaged or truncated file fails here."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  with _nifti_errors(path):
    img = nib.load(path)
    canonical = nib.as_closest_canonical(img)
    data = np.asarray(canonical.dataobj)
  spacing = tuple(float(z) for z in np.sqrt((canonical.affine[:3, :3] ** 2).sum(axis=0)))
  return Volume(data=data, affine=img.affine, shape=tuple(img.shape), spacing=spacing)


def read_header(path: str) -> nib.Nifti1Image:
  """The file opened without reading its voxels (shape and affine from the header)."""
  with _nifti_errors(path):
    return nib.load(path)


def canonical_shape(path: str) -> tuple[int, ...]:
  """The spatial shape `load_nifti` would return, read from the header alone."""
  img = read_header(path)
  ornt = nib.orientations.io_orientation(img.affine)
  shape = [0, 0, 0]
  for axis, (target, _) in enumerate(ornt):
    shape[int(target)] = img.shape[axis]
  return tuple(shape)


def canonical_spacing(path: str) -> tuple[float, float, float]:
  """The voxel size in mm `load_nifti` would return (along the canonical axes), read from
  the header alone."""
  img = read_header(path)
  ornt = nib.orientations.io_orientation(img.affine)
  sizes = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
  spacing = [0.0, 0.0, 0.0]
  for axis, (target, _) in enumerate(ornt):
    spacing[int(target)] = float(sizes[axis])
  return tuple(spacing)


@contextlib.contextmanager
def _nifti_errors(path: str):
  """Any failure to read `path` becomes one DataError naming it."""
  try:
    yield
  except Exception as e:  # nibabel, gzip and zlib raise many types for damaged files
    raise DataError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from e
