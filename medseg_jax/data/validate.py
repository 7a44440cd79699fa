"""Checking a whole Decathlon dataset against the config, reporting every problem at once.

Each problem is one line naming the file (or dataset.json and the config key) and what
is wrong. The dataset-level checks read only dataset.json; the per-subject checks read
each image and label volume whole (damaged files, non-finite values, label values) and
run in the same pass that preprocesses the slices (see `store.py`), so a dataset is read
once. `python -m medseg_jax.data.validate --config=FILE` runs the checks alone.
"""

import dataclasses
import multiprocessing
import os
import sys
from typing import Callable, Iterable, Iterator

import nibabel as nib
import numpy as np

from medseg_jax.data import decathlon, preprocess
from medseg_jax.errors import InvalidDatasetError

AFFINE_TOLERANCE = 1e-3  # mm; image and label affines that differ by more do not overlay


@dataclasses.dataclass
class CaseData:
  """One subject read and checked: canonical (RAS) arrays and what is needed to go back."""

  image: np.ndarray        # [X,Y,Z,C] float32, the configured modalities
  label: np.ndarray        # [X,Y,Z] int32, mapped by data.label_map
  spacing: tuple           # mm along the canonical axes
  affine: np.ndarray       # the image file's original affine
  shape: tuple             # the image file's original shape


def check_dataset(dataset: decathlon.Dataset, settings: preprocess.Settings) -> list[str]:
  """Problems with dataset.json itself and its agreement with the config."""
  where = os.path.join(dataset.root, "dataset.json")
  problems = []
  if not dataset.training:
    problems.append(f"{where}: the 'training' list is empty")
  for m in settings.modalities:
    if not (m in dataset.modalities
            or (isinstance(m, int) and 0 <= m < len(dataset.modalities))):
      problems.append(f"{where}: data.modalities names {m!r}, which is not among the "
                      f"dataset's modalities {list(dataset.modalities)}")
  if settings.label_map and len(settings.label_map) != len(dataset.labels):
    problems.append(f"{where}: data.label_map={list(settings.label_map)} has "
                    f"{len(settings.label_map)} entries for the {len(dataset.labels)} labels "
                    f"{list(dataset.labels)}")
  if dataset.tensor_size not in ("", "3D", "4D"):
    problems.append(f"{where}: tensorImageSize {dataset.tensor_size!r} is neither 3D nor 4D")
  return problems


def read_case(case: decathlon.Case, dataset: decathlon.Dataset,
              settings: preprocess.Settings) -> tuple[list[str], CaseData | None]:
  """(problems, the subject's data if there are none)."""
  problems = [f"{path}: {what} file not found"
              for path, what in ((case.image, "image"), (case.label, "label"))
              if not os.path.isfile(path)]
  if problems:
    return problems, None
  image, image_problem = _read(case.image)
  label, label_problem = _read(case.label)
  problems = [p for p in (image_problem, label_problem) if p]
  if problems:
    return problems, None
  problems += _image_problems(case.image, image, dataset, settings)
  problems += _label_problems(case, image, label, dataset, settings)
  if problems:
    return problems, None
  data = np.asarray(image.canonical.dataobj, np.float32)
  channels = preprocess.select_channels(data, settings.modalities, dataset.modalities,
                                        case.image)
  if not np.isfinite(channels).all():
    bad = int((~np.isfinite(channels)).sum())
    return [f"{case.image}: {bad} non-finite intensities (NaN or inf)"], None
  return [], CaseData(image=channels, label=label.mapped, spacing=image.spacing,
                      affine=image.original.affine, shape=tuple(image.original.shape))


@dataclasses.dataclass
class _Read:
  original: nib.Nifti1Image
  canonical: nib.Nifti1Image
  spacing: tuple
  mapped: np.ndarray | None = None


def _read(path: str) -> tuple[_Read | None, str | None]:
  """The file reoriented to RAS, with its voxels read once (a truncated file fails here)."""
  try:
    original = nib.load(path)
    canonical = nib.as_closest_canonical(original)
    canonical = nib.Nifti1Image(np.asanyarray(canonical.dataobj), canonical.affine,
                                canonical.header)
  except Exception as e:  # nibabel, gzip and zlib raise many types for damaged files
    return None, f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})"
  spacing = tuple(float(z) for z in np.sqrt((canonical.affine[:3, :3] ** 2).sum(axis=0)))
  return _Read(original, canonical, spacing), None


def _image_problems(path: str, image: _Read, dataset: decathlon.Dataset,
                    settings: preprocess.Settings) -> list[str]:
  shape = image.original.shape
  declared = dataset.tensor_size
  if len(shape) not in (3, 4):
    return [f"{path}: shape {shape} is neither 3D nor 4D"]
  if declared == "3D" and len(shape) == 4 and shape[3] > 1:
    return [f"{path}: a 4D image {shape}, but dataset.json declares tensorImageSize 3D"]
  if declared == "4D" and len(shape) == 3:
    return [f"{path}: a 3D image {shape}, but dataset.json declares tensorImageSize 4D"]
  channels = shape[3] if len(shape) == 4 else 1
  if channels != len(dataset.modalities):
    return [f"{path}: {channels} channels, but dataset.json lists {len(dataset.modalities)} "
            f"modalities {list(dataset.modalities)}"]
  depth = image.canonical.shape[settings.slice_axis]
  if settings.slice_selection == "central" and settings.slices_per_volume > depth:
    return [f"{path}: {depth} slices along axis {settings.slice_axis}, fewer than "
            f"data.slices_per_volume={settings.slices_per_volume}"]
  return []


def _label_problems(case: decathlon.Case, image: _Read, label: _Read,
                    dataset: decathlon.Dataset, settings: preprocess.Settings) -> list[str]:
  path = case.label
  if label.original.shape[:3] != image.original.shape[:3] or len(label.original.shape) != 3:
    return [f"{path}: shape {label.original.shape} does not match its image's "
            f"{image.original.shape} ({case.image})"]
  if not np.allclose(label.original.affine, image.original.affine, atol=AFFINE_TOLERANCE):
    return [f"{path}: affine differs from its image's ({case.image}); the two do not overlay"]
  values = np.asarray(label.canonical.dataobj)
  if not np.isfinite(values).all() or not np.array_equal(values, np.rint(values)):
    return [f"{path}: label values must be whole numbers"]
  values = values.astype(np.int64)
  allowed = len(settings.label_map) if settings.label_map else len(dataset.labels)
  outside = np.unique(values[(values < 0) | (values >= allowed)])
  if outside.size:
    where = (f"data.label_map ({allowed} entries)" if settings.label_map
             else f"dataset.json labels 0..{allowed - 1}")
    return [f"{path}: label values {outside[:5].tolist()} are outside {where}"]
  label.mapped = (np.asarray(settings.label_map, np.int32)[values] if settings.label_map
                  else values.astype(np.int32))
  return []


def pool_map(fn: Callable, items: list, processes: int) -> Iterator:
  """`fn` over `items` in order, on `processes` worker processes (here when 1).

  Workers are spawned, not forked: the parent may already run JAX's threads."""
  if processes <= 1 or len(items) <= 1:
    yield from map(fn, items)
    return
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(min(processes, len(items))) as pool:
    yield from pool.imap(fn, items)


def worker_count(requested: int) -> int:
  """`data.preprocess_workers`, 0 meaning every CPU core this process may use."""
  return requested or len(os.sched_getaffinity(0))


def report(problems: Iterable[str], root: str) -> InvalidDatasetError:
  problems = list(problems)
  return InvalidDatasetError(f"{len(problems)} problem(s) in the dataset {root} (set "
                             "data.skip_invalid=True to skip bad subjects):\n  "
                             + "\n  ".join(problems))


def _check_one(args) -> list[str]:
  case, dataset, settings = args
  return read_case(case, dataset, settings)[0]


def validate(dataset: decathlon.Dataset, settings: preprocess.Settings,
             processes: int = 0) -> dict[str, list[str]]:
  """Every problem, keyed by subject name ('' for dataset.json)."""
  general = check_dataset(dataset, settings)
  found = {"": general} if general else {}
  jobs = [(case, dataset, settings) for case in dataset.training]
  for case, problems in zip(dataset.training,
                            pool_map(_check_one, jobs, worker_count(processes))):
    if problems:
      found[case.name] = problems
  return found


def _cli() -> None:
  from absl import app  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from medseg_jax import cli  # pylint: disable=import-outside-toplevel
  from medseg_jax.errors import MedsegError  # pylint: disable=import-outside-toplevel

  config = config_flags.DEFINE_config_file("config", None, "Experiment config.",
                                           lock_config=True)

  def main(argv):
    del argv
    cfg = config.value
    try:
      if not cfg.data.root:
        cli.fail("data.root: no dataset directory given", 2)
      dataset = decathlon.read_dataset(cfg.data.root)
      found = validate(dataset, preprocess.settings_from_config(cfg.data),
                       cfg.data.preprocess_workers)
    except MedsegError as e:
      cli.fail(str(e), e.exit_code)
    if found:
      cli.fail(str(report([p for ps in found.values() for p in ps], dataset.root)), 2)
    print(f"{dataset.root}: {len(dataset.training)} subjects, no problems", file=sys.stdout)

  app.run(main, flags_parser=cli.flags_parser())


if __name__ == "__main__":
  _cli()
