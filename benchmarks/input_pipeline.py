"""Slices/s of the input pipeline at 256x256: raw store reads, the loader, augmentation, a
naive NIfTI reload.

    python benchmarks/input_pipeline.py            # --volumes=6 --depth=100 --batch=32 --rounds=3

The dataset imitates the thesis's BRATS setting: 4D volumes of four modalities, the T1w
channel kept, 70 central slices per volume, here at 256x256 in-plane. It is written
once into --workdir (synthetic phantoms) with its slice store. Each round measures, one
after the other, over one epoch of the training slices:
- raw: tensorstore reads of the store arrays alone (as many random rows, the same batch),
  each awaited before the next;
- loader: `loader.train_batches` (reads `PREFETCH` batches ahead), and the same with no
  read-ahead;
- data wait: how long a consumer that computes as long as a raw batch read takes (a sleep)
  waits for each batch, with and without read-ahead;
- augment: the jitted on-device augmentation (data.augment, thesis ranges) of one batch,
  on one CPU device;
- naive: every volume reloaded with nibabel, the channel and central slices taken and
  z-scored, then the same batches cut from memory.
Medians over rounds are printed, with the ratios the loader must meet (>= 0.5x raw,
>= 10x naive).
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build(args):
  from medseg_jax import defaults
  from medseg_jax.data import store, synthetic
  from medseg_jax.training import settings
  from medseg_jax.parallel import multihost
  root = os.path.join(args.workdir, "Task01_Bench")
  if not os.path.exists(root):
    synthetic.write_synthetic_decathlon(root, args.volumes, 0, (256, 256, args.depth),
                                        multimodal=True, seed=0)
  cfg = defaults.get_config()
  cfg.data.root, cfg.data.image_size, cfg.data.modalities = root, 256, ("T1w",)
  cfg.data.slices_per_volume, cfg.data.label_map = 70, (0, 1, 1)
  cfg.data.val_fraction = cfg.data.test_fraction = 0.0
  cfg.data.cache_dir = os.path.join(args.workdir, "cache")
  started = time.perf_counter()
  run = settings.read(cfg)
  sets, info = run.kind.load_splits(run.source, os.path.join(args.workdir, "run"),
                                    multihost.barrier)
  print(f"store ready in {time.perf_counter() - started:.1f} s: {len(sets['train'])} slices")
  return cfg, sets["train"], store.Store(info["store"])


def epoch(batches) -> float:
  """Slices/s of consuming every batch of `batches`."""
  start, count = time.perf_counter(), 0
  for batch in batches:
    count += len(batch["image"])
  return count / (time.perf_counter() - start)


def data_wait(batches, step_seconds: float) -> float:
  """Median seconds per batch, after the first, that a consumer computing `step_seconds`
  per batch (a sleep, which like a device step leaves the host's cores free) waits."""
  import numpy as np
  waits = []
  while True:
    start = time.perf_counter()
    batch = next(batches, None)
    waits.append(time.perf_counter() - start)
    if batch is None:
      return float(np.median(waits[1:-1]))
    time.sleep(step_seconds)


def raw_reads(opened, order, batch):
  """Tensorstore reads of the store's arrays alone, each awaited before the next."""
  for start in range(0, len(order) - batch + 1, batch):
    rows = order[start:start + batch]
    image, label = opened.image[rows].read(), opened.label[rows].read()
    yield {"image": image.result(), "label": label.result()}


def naive(cfg, data, order, batch):
  """Reloads every volume from its NIfTI files, then serves the same batches."""
  import numpy as np
  from medseg_jax.data import decathlon, preprocess
  settings = preprocess.settings_from_config(cfg.data)
  dataset = decathlon.read_dataset(cfg.data.root)
  by_name = {c.name: c for c in dataset.training}
  images, labels = [], []
  for name in data.names:
    case = by_name[name]
    image = preprocess.select_channels(decathlon.load_nifti(case.image).data,
                                       settings.modalities, dataset.modalities, case.image)
    label = preprocess.map_labels(decathlon.load_nifti(case.label).data, settings.label_map,
                                  case.label)
    image, label = preprocess.to_slices(preprocess.normalise(image, settings), label, settings)
    images.append(image)
    labels.append(label)
  images, labels = np.concatenate(images), np.concatenate(labels)
  for start in range(0, len(order) - batch + 1, batch):
    rows = order[start:start + batch]
    yield {"image": images[rows], "label": labels[rows]}


def augment_rate(cfg, data, batch, repeats=5) -> float:
  import jax
  import numpy as np
  from medseg_jax.training import settings
  cfg.data.augment.enabled = True
  transform = settings.read(cfg).kind.augmentation()
  # Augmentation alone, compiled on one device as the train step runs it.
  fn = jax.jit(lambda b, rng: transform(rng, b["image"], b["label"]))
  device_batch = jax.device_put({"image": data.image[:batch], "label": data.label[:batch]})
  jax.block_until_ready(fn(device_batch, jax.random.key(0)))  # compile
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(device_batch, jax.random.key(i + 1)))
    times.append(time.perf_counter() - start)
  return batch / float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/medseg_input_bench")
  parser.add_argument("--volumes", type=int, default=6)
  parser.add_argument("--depth", type=int, default=100)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  import numpy as np
  from medseg_jax.data import loader
  cfg, data, opened = build(args)
  rates = {k: [] for k in ("raw", "loader", "loader_no_prefetch", "augment", "naive")}
  waits = {"prefetch": [], "no_prefetch": []}
  epoch(raw_reads(opened, loader.epoch_order(len(data), 0, 99), args.batch))  # warm the OS cache
  for r in range(args.rounds):
    order = loader.epoch_order(len(data), 0, r)
    rates["raw"].append(epoch(raw_reads(opened, order, args.batch)))
    rates["loader"].append(epoch(loader.train_batches(data, args.batch, 0, r)))
    rates["loader_no_prefetch"].append(
        epoch(loader.train_batches(data, args.batch, 0, r, prefetch=0)))
    rates["naive"].append(epoch(naive(cfg, data, order, args.batch)))
    rates["augment"].append(augment_rate(cfg, data, args.batch))
    step = args.batch / rates["raw"][-1]  # a step as long as reading its batch
    waits["prefetch"].append(data_wait(loader.train_batches(data, args.batch, 0, r), step))
    waits["no_prefetch"].append(
        data_wait(loader.train_batches(data, args.batch, 0, r, prefetch=0), step))
    print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))
  median = {k: float(np.median(v)) for k, v in rates.items()}
  print(f"\nslices/s at 256x256, batch {args.batch}, median of {args.rounds} rounds, "
        f"{len(data)} training slices of {len(data.names)} volumes")
  print(f"{'what':<22}{'slices/s':>10}")
  for k, v in median.items():
    print(f"{k:<22}{v:>10.0f}")
  print(f"loader / raw = {median['loader'] / median['raw']:.2f} (needs >= 0.5); "
        f"loader / naive = {median['loader'] / median['naive']:.1f} (needs >= 10); "
        f"prefetch gain = {median['loader'] / median['loader_no_prefetch']:.2f}")
  wait = {k: 1e3 * float(np.median(v)) for k, v in waits.items()}
  print(f"median data wait per batch (after the first) behind a step as long as a raw batch read: with read-ahead "
        f"{wait['prefetch']:.1f} ms, without {wait['no_prefetch']:.1f} ms")


if __name__ == "__main__":
  main()
