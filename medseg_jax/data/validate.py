"""Checking a whole Decathlon dataset against the config, reporting every problem at once.

Each problem is one line naming the file (or dataset.json and the config key) and what
is wrong. The dataset-level checks read only dataset.json; the per-subject checks read
each image and label volume whole (damaged files, non-finite values, label values) and
run in the same pass that preprocesses the slices (`store.build` calls `read_case`), so a
dataset is read once. `python -m medseg_jax.data.validate --config=FILE` runs the checks
alone.
"""

import dataclasses
import os
from typing import Iterable

import numpy as np

from medseg_jax import cli
from medseg_jax.data import decathlon, pool, preprocess
from medseg_jax.errors import ConfigError, DataError, InvalidDatasetError

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
  (image, image_problem), (label, label_problem) = _load(case.image), _load(case.label)
  problems = [p for p in (image_problem, label_problem) if p]
  if problems:
    return problems, None
  problems += _image_problems(case.image, image, dataset, settings)
  problems += _label_problems(case, image, label, dataset, settings)
  if problems:
    return problems, None
  channels = preprocess.select_channels(np.asarray(image.data, np.float32), settings.modalities,
                                        dataset.modalities, case.image)
  if not np.isfinite(channels).all():
    bad = int((~np.isfinite(channels)).sum())
    return [f"{case.image}: {bad} non-finite intensities (NaN or inf)"], None
  classes = preprocess.map_labels(label.data, settings.label_map, case.label)
  return [], CaseData(image=channels, label=classes, spacing=image.spacing,
                      affine=image.affine, shape=image.shape)


def _load(path: str) -> tuple[decathlon.Volume | None, str | None]:
  """(the volume, None), or (None, why it cannot be read)."""
  try:
    return decathlon.load_nifti(path), None
  except DataError as e:
    return None, str(e)


def _image_problems(path: str, image: decathlon.Volume, dataset: decathlon.Dataset,
                    settings: preprocess.Settings) -> list[str]:
  shape = image.shape
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
  depth = image.data.shape[settings.slice_axis]
  if settings.slice_selection == "central" and settings.slices_per_volume > depth:
    return [f"{path}: {depth} slices along axis {settings.slice_axis}, fewer than "
            f"data.slices_per_volume={settings.slices_per_volume}"]
  return []


def _label_problems(case: decathlon.Case, image: decathlon.Volume, label: decathlon.Volume,
                    dataset: decathlon.Dataset, settings: preprocess.Settings) -> list[str]:
  """What stops the label volume from being mapped to classes (`preprocess.map_labels`)."""
  path = case.label
  if label.shape[:3] != image.shape[:3] or len(label.shape) != 3:
    return [f"{path}: shape {label.shape} does not match its image's "
            f"{image.shape} ({case.image})"]
  if not np.allclose(label.affine, image.affine, atol=AFFINE_TOLERANCE):
    return [f"{path}: affine differs from its image's ({case.image}); the two do not overlay"]
  values = label.data
  if not np.isfinite(values).all() or not np.array_equal(values, np.rint(values)):
    return [f"{path}: label values must be whole numbers"]
  values = values.astype(np.int64)
  allowed = len(settings.label_map) if settings.label_map else len(dataset.labels)
  outside = np.unique(values[(values < 0) | (values >= allowed)])
  if outside.size:
    where = (f"data.label_map ({allowed} entries)" if settings.label_map
             else f"dataset.json labels 0..{allowed - 1}")
    return [f"{path}: label values {outside[:5].tolist()} are outside {where}"]
  return []


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
                            pool.pool_map(_check_one, jobs, pool.worker_count(processes))):
    if problems:
      found[case.name] = problems
  return found


def _cli() -> None:
  """python -m medseg_jax.data.validate --config=FILE: the checks alone, no store built."""
  config = cli.config_flag()

  def main() -> None:
    cfg = config.value
    if not cfg.data.root:
      raise ConfigError("data.root: no dataset directory given")
    dataset = decathlon.read_dataset(cfg.data.root)
    found = validate(dataset, preprocess.settings_from_config(cfg.data),
                     cfg.data.preprocess_workers)
    if found:
      raise report([p for ps in found.values() for p in ps], dataset.root)
    print(f"{dataset.root}: {len(dataset.training)} subjects, no problems")

  cli.run(main)


if __name__ == "__main__":
  _cli()
