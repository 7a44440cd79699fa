"""The one seam between 2D and 3D: the kind of data a run trains on, chosen once from
`data.spatial_dims`.

`Slices` (2D) and `Volumes` (3D: whole volumes, patches, sliding windows) own everything
that differs between the two: their settings, building and opening the store, the splits
and their info, the training batches and augmentation, an example's shape and unit, the
evaluator's way of predicting a split, the preprocessing block of a model file, the
prediction of a new volume and their part of the manifest. Every stage above asks the
kind instead of branching on the dimensions.
"""

import ml_collections

from medseg_jax.errors import ConfigError
from medseg_jax.kinds.base import DataKind
from medseg_jax.kinds.slices import Slices
from medseg_jax.kinds.volumes import Volumes

KINDS = {2: Slices, 3: Volumes}  # data.spatial_dims -> kind


def from_config(cfg: ml_collections.ConfigDict) -> DataKind:
  """The kind of data `cfg` trains on, with its settings read from the `data` and
  `evaluation` sections and checked; a bad value is a ConfigError naming its key."""
  dims = cfg.data.spatial_dims
  if isinstance(dims, bool) or dims not in KINDS:
    raise ConfigError(f"data.spatial_dims={dims!r}: must be 2 (slices) or 3 (volumes)")
  return KINDS[dims].from_config(cfg.data, cfg.evaluation)
