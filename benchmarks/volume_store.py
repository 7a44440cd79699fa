"""Random patch reads from the volume store for several chunkings and image dtypes, and
the cost of resampling a volume (image order 1 against 3, labels per class against
nearest neighbour).

    python benchmarks/volume_store.py   # --shape=160,160,128 --patch=64 --reads=20 --rounds=5

One synthetic four-modality phantom (z-scored as MRI) is written with
`volume_store.create_arrays` once per chunking (16^3, 32^3, 64^3 voxels x all channels)
and image dtype (float32, float16), then every round reads the same `--reads` random
patches of `--patch`^3 voxels (corners uniform, wholly inside the volume) from each
store in turn through `VolumeStore.patch`, each read awaited before the next. The files
were just written, so they are read from the page cache, as in training after the
first epoch. Medians over rounds of the mean time per patch are printed, with the bytes
on disk and the chunks a patch touches on average.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from medseg_jax.data import preprocess, resample, synthetic, volume_store  # noqa: E402

CHUNKS = (16, 32, 64)
DTYPES = ("<f4", "<f2")


def write_store(directory: str, image: np.ndarray, label: np.ndarray, chunk: int,
                dtype: str) -> str:
  path = os.path.join(directory, f"c{chunk}-{dtype[1:]}")
  arrays = volume_store.create_arrays(path, 0, image.shape, 0, chunk=chunk, dtype=dtype)
  arrays[0].write(image.astype(dtype)).result()
  arrays[1].write(label).result()
  with open(os.path.join(path, "meta.json"), "w") as f:
    json.dump({"volumes": [{"stored_shape": list(label.shape)}]}, f)
  return path


def disk_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns)


def chunks_touched(corners: np.ndarray, patch: int, chunk: int) -> float:
  first, last = corners // chunk, (corners + patch - 1) // chunk
  return float(np.prod(last - first + 1, axis=1).mean())


def read_time(store: volume_store.VolumeStore, corners: np.ndarray, patch: int) -> float:
  started = time.perf_counter()
  for corner in corners:
    store.patch(0, corner, (patch,) * 3)
  return (time.perf_counter() - started) / len(corners)


def resample_times(image: np.ndarray, label: np.ndarray) -> dict:
  """Seconds to resample one channel and the label map from spacing (1, 1, 2) to 1.5 mm."""
  shape = resample.target_shape(label.shape, (1.0, 1.0, 2.0), (1.5, 1.5, 1.5))
  channel = image[..., :1]
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  runs = {"image order 1": lambda: resample.resample_image(channel, shape, order=1),
          "image order 3": lambda: resample.resample_image(channel, shape, order=3),
          "label per class (linear, argmax)": lambda: resample.resample_label(label, shape),
          "label nearest": lambda: ndimage.zoom(label, [n / m for n, m in zip(shape, label.shape)],
                                                order=0, mode="nearest", grid_mode=True)}
  return {name: min(_timed(run) for _ in range(3)) for name, run in runs.items()}


def _timed(run) -> float:
  started = time.perf_counter()
  run()
  return time.perf_counter() - started


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="160,160,128")
  parser.add_argument("--patch", type=int, default=64)
  parser.add_argument("--reads", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  shape = tuple(int(n) for n in args.shape.split(","))
  image, label = synthetic.make_phantom(np.random.default_rng(0), shape,
                                        synthetic.MODALITIES_4D)
  image = preprocess.zscore_nonzero(image)
  corners = np.random.default_rng(1).integers(0, np.array(shape) - args.patch + 1,
                                              (args.reads, 3))
  directory = tempfile.mkdtemp(prefix="volume-store-bench-")
  try:
    stores = {(c, d): volume_store.VolumeStore(write_store(directory, image, label, c, d))
              for c in CHUNKS for d in DTYPES}
    times = {key: [] for key in stores}
    for _ in range(args.rounds):
      for key, store in stores.items():
        times[key].append(read_time(store, corners, args.patch))
    print(f"volume {shape} x {image.shape[-1]} channels, {args.reads} random "
          f"{args.patch}^3 patches, median of {args.rounds} rounds")
    print("| chunk | image dtype | ms per patch | chunks touched | MB on disk |")
    print("|---|---|---|---|---|")
    for (chunk, dtype), values in times.items():
      size = disk_bytes(os.path.join(directory, f"c{chunk}-{dtype[1:]}")) / 1e6
      print(f"| {chunk}^3 | {'float32' if dtype == '<f4' else 'float16'} | "
            f"{1e3 * statistics.median(values):.1f} | "
            f"{chunks_touched(corners, args.patch, chunk):.1f} | {size:.1f} |")
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  for name, seconds in resample_times(image, label).items():
    print(f"resample {shape} (1, 1, 2) mm -> 1.5 mm, {name}: {seconds:.2f} s")


if __name__ == "__main__":
  main()
