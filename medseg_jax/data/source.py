"""Where a run's dataset comes from, where its store goes and how its subjects are split:
the `data.*` settings both kinds of example (slices and volumes) share."""

import dataclasses

from medseg_jax.data import targets


@dataclasses.dataclass(frozen=True)
class Source:
  """The shared `data.*` settings, read once from the config (plain values)."""

  root: str = ""                     # data.root: a Decathlon task directory
  synthetic: bool = False            # data.synthetic: write a synthetic dataset first
  synthetic_volumes: int = 16
  synthetic_shape: tuple = (96, 96, 48)
  cache_dir: str = ""                # data.cache_dir; "" = slice_cache/ beside the dataset
  skip_invalid: bool = False
  preprocess_workers: int = 0
  modalities: tuple = ()             # data.modalities: the channels used
  label_map: tuple = ()              # data.label_map: source label i -> class label_map[i]
  regions: tuple = ()                # data.regions: label sets trained as sigmoid outputs
  regions_class_order: tuple = ()    # data.regions_class_order: the label each region writes
  val_fraction: float = 0.15
  test_fraction: float = 0.15
  split_seed: int = 0                # data.split_seed, or `seed` when it is unset
  fold: int | None = None            # data.fold: the validation fold; None = no folds
  num_folds: int = 5                 # data.num_folds
  samples_per_epoch: int = 0         # data.augment.samples_per_epoch: draws per epoch

  def num_classes(self, labels: list[str]) -> int:
    """The classes trained: `label_map`'s, or dataset.json's `labels`."""
    return (max(self.label_map) + 1) if self.label_map else len(labels)

  def outputs(self, labels: list[str]) -> targets.Classes | targets.Regions:
    """What the network's outputs are: the classes, or `data.regions`."""
    return targets.make(self.num_classes(labels), self.regions, self.regions_class_order)

  def class_names(self, labels: list[str]) -> list[str]:
    """dataset.json's label names; a class `data.label_map` builds from several labels is
    named after them ("oedema+tumour"), one with no source label by its index."""
    if not self.label_map:
      return list(labels)
    sources: dict[int, list[str]] = {}
    for label, target in zip(labels, self.label_map):
      sources.setdefault(target, []).append(label)
    return ["+".join(sources[c]) if c in sources else f"class {c}"
            for c in range(self.num_classes(labels))]
