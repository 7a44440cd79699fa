"""What a network's output channels mean: one seam, chosen once from `data.regions`.

`Classes` (the default): one channel per class, mutually exclusive; softmax
probabilities, the label map is their argmax.

`Regions` (region-based training, as nnU-Net's for BraTS): one channel per declared
region, a set of labels (after `data.label_map`) that may nest or overlap, e.g. the whole
tumour (1, 2, 3), the tumour core (2, 3) and the enhancing tumour (3,). Each channel is a
sigmoid probability that a voxel belongs to its region; a label map is rebuilt by writing,
region after region in the declared order, `data.regions_class_order`'s label where the
region's probability exceeds 0.5, so later regions overwrite earlier ones. Without
`data.regions_class_order`, region r writes the smallest of its labels that no later region
holds: (1, 2, 3), (2, 3), (3,) write 1, 2 and 3.

Both map logits [..., K] to probabilities and probabilities to integer labels, in NumPy or
in JAX (`xp`), and name the label count evaluation's confusion matrix needs.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medseg_jax.errors import ConfigError

THRESHOLD = 0.5  # a region holds a voxel whose probability exceeds this


@dataclasses.dataclass(frozen=True)
class Classes:
  """Mutually exclusive classes: softmax and argmax."""

  num_labels: int

  @property
  def count(self) -> int:
    """The network's output channels."""
    return self.num_labels

  @property
  def regions(self) -> tuple:
    """No regions: evaluation reports the classes alone."""
    return ()

  def probabilities(self, logits: jax.Array) -> jax.Array:
    return jax.nn.softmax(logits, axis=-1)

  def labels_of_logits(self, logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1)  # the softmax's argmax, without computing it

  def labels(self, probs: Any, xp: Any = np) -> Any:
    return xp.argmax(probs, axis=-1)

  def record(self) -> dict:
    """What the run's `data_info.json` and a model file add to describe the outputs."""
    return {}


@dataclasses.dataclass(frozen=True)
class Regions:
  """Overlapping label sets: one sigmoid each, labels rebuilt in the declared order."""

  regions: tuple[tuple[int, ...], ...]
  order: tuple[int, ...]
  num_labels: int

  @property
  def count(self) -> int:
    return len(self.regions)

  def probabilities(self, logits: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(logits)

  def labels_of_logits(self, logits: jax.Array) -> jax.Array:
    return self.labels(jax.nn.sigmoid(logits), jnp)

  def labels(self, probs: Any, xp: Any = np) -> Any:
    out = xp.zeros(probs.shape[:-1], xp.int32)
    for r, label in enumerate(self.order):
      out = xp.where(probs[..., r] > THRESHOLD, label, out)
    return out

  def masks(self, labels: Any, xp: Any = np) -> Any:
    """Float membership [..., R] of integer `labels` in each region."""
    return xp.stack([xp.isin(labels, xp.asarray(r)) for r in self.regions], axis=-1
                    ).astype(xp.float32)

  def record(self) -> dict:
    return {"regions": [list(r) for r in self.regions],
            "regions_class_order": list(self.order), "num_labels": self.num_labels}


def check(regions: tuple, order: tuple) -> None:
  """Raises ConfigError naming `data.regions` or `data.regions_class_order` when they
  cannot describe regions (what the dataset's labels allow is checked by `make`)."""
  if not regions:
    if order:
      raise ConfigError(f"data.regions_class_order={tuple(order)}: needs data.regions")
    return
  for r, region in enumerate(regions):
    if not isinstance(region, (tuple, list)) or not region or not all(
        isinstance(label, int) and label > 0 for label in region):
      raise ConfigError(f"data.regions[{r}]={region!r}: a region is a non-empty tuple of "
                        "foreground labels (positive integers), e.g. (2, 3)")
    if len(set(region)) != len(region):
      raise ConfigError(f"data.regions[{r}]={tuple(region)}: a label is listed twice")
  if order and len(order) != len(regions):
    raise ConfigError(f"data.regions_class_order={tuple(order)}: one label per region "
                      f"({len(regions)} regions)")
  for r, label in enumerate(order or _default_order(regions)):
    if label not in regions[r]:
      raise ConfigError(f"data.regions_class_order={tuple(order)}: label {label} is not in "
                        f"region {r} {tuple(regions[r])}")


def _default_order(regions: tuple) -> tuple[int, ...]:
  """Each region's smallest label that no later region holds."""
  order = []
  for r, region in enumerate(regions):
    later = {label for other in regions[r + 1:] for label in other}
    own = sorted(set(region) - later)
    if not own:
      raise ConfigError(f"data.regions[{r}]={tuple(region)}: every label of it is in a later "
                        "region; set data.regions_class_order")
    order.append(own[0])
  return tuple(order)


def make(num_labels: int, regions: tuple = (), order: tuple = ()) -> Classes | Regions:
  """The outputs of a dataset with `num_labels` labels (after `data.label_map`)."""
  check(regions, order)
  if not regions:
    return Classes(num_labels)
  regions = tuple(tuple(int(label) for label in region) for region in regions)
  for r, region in enumerate(regions):
    if max(region) >= num_labels:
      raise ConfigError(f"data.regions[{r}]={region}: the dataset's labels are "
                        f"0..{num_labels - 1}")
  return Regions(regions, tuple(order) or _default_order(regions), num_labels)


def from_info(info: dict) -> Classes | Regions:
  """The outputs a run's `data_info.json` (or a model file's info) records."""
  if "regions" not in info:
    return Classes(info["num_classes"])
  return make(info["num_labels"], tuple(tuple(r) for r in info["regions"]),
              tuple(info["regions_class_order"]))
