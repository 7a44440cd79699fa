"""Time reading a full-size VGG-16 file and mapping it into the FCN's parameters.

    python benchmarks/vgg_mapping.py                  # .mat and .h5, 3 repeats each
    python benchmarks/vgg_mapping.py --formats=mat --repeats=5

Writes a VGG-16 with the real shapes (138.4 M float32 values, random) into a temporary
directory in MatConvNet simplenn layout (.mat) and Keras layout (.h5, needs h5py),
then times `pretrained.read_vgg` + `pretrained.into_fcn` into the parameters of
FCN(base 64, fc 4096, 1 input channel, 2 classes), built as zeros from the model's
abstract shapes (initialisation is not timed). Prints the median and every repeat,
and how many parameters were loaded and how many kept their initialisation. The
files are deleted at the end.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS, WIDTHS = (2, 2, 3, 3, 3), (64, 128, 256, 512, 512)


def vgg16_layers(rng):
  """name -> (W [H, W, in, out], b) with VGG-16's shapes, float32."""
  import numpy as np
  layers, cin = {}, 3
  for block, (convs, width) in enumerate(zip(BLOCKS, WIDTHS)):
    for i in range(convs):
      layers[f"conv{block + 1}_{i + 1}"] = (3, 3, cin, width)
      cin = width
  layers.update(fc6=(7, 7, 512, 4096), fc7=(1, 1, 4096, 4096), fc8=(1, 1, 4096, 1000))
  return {name: (rng.standard_normal(shape, dtype=np.float32),
                 rng.standard_normal(shape[-1], dtype=np.float32))
          for name, shape in layers.items()}


def write_mat(path, layers):
  import numpy as np
  import scipy.io
  cells = np.empty((1, len(layers)), dtype=object)
  for i, (name, (w, b)) in enumerate(layers.items()):
    weights = np.empty((1, 2), dtype=object)
    weights[0, 0], weights[0, 1] = w, b.reshape(-1, 1)
    cells[0, i] = {"name": name, "type": "conv", "weights": weights}
  scipy.io.savemat(path, {"layers": cells})


def write_h5(path, layers):
  import h5py
  names = [f"block{b + 1}_conv{i + 1}" for b, n in enumerate(BLOCKS) for i in range(n)]
  names += ["fc1", "fc2", "predictions"]
  with h5py.File(path, "w") as f:
    for theirs, (w, b) in zip(names, layers.values()):
      if not theirs.startswith("block"):
        w = w.reshape(-1, w.shape[-1])
      f[f"{theirs}/{theirs}_W_1:0"], f[f"{theirs}/{theirs}_b_1:0"] = w, b


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--formats", default="mat,h5")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, REPO)
  import jax
  import numpy as np
  from medseg_jax.models.fcn import FCN
  from medseg_jax.models import pretrained

  model = FCN(num_classes=2, base_features=64, fc_features=4096)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 1), np.float32))["params"]
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  total = sum(x.size for x in jax.tree.leaves(params))
  layers = vgg16_layers(np.random.default_rng(0))
  print(f"VGG-16 file: {sum(w.size + b.size for w, b in layers.values()) / 1e6:.1f} M values; "
        f"FCN: {total / 1e6:.1f} M parameters")
  tmp = tempfile.mkdtemp(prefix="vgg_bench_")
  try:
    for fmt in args.formats.split(","):
      path = os.path.join(tmp, f"vgg16.{fmt}")
      started = time.perf_counter()
      (write_mat if fmt == "mat" else write_h5)(path, layers)
      size = os.path.getsize(path) / 2**20
      print(f"{fmt}: wrote {size:.0f} MiB in {time.perf_counter() - started:.1f} s")
      times = []
      for _ in range(args.repeats):
        started = time.perf_counter()
        mapped, loaded, _ = pretrained.into_fcn(pretrained.read_vgg(path), params, 4096)
        times.append(time.perf_counter() - started)
      count = sum(x.size for name in loaded for x in jax.tree.leaves(mapped[name]))
      print(f"{fmt}: read + map median {statistics.median(times):.2f} s "
            f"(repeats {', '.join(f'{t:.2f}' for t in times)}); parameters loaded "
            f"{count:,} in {len(loaded)} layers, initialised {total - count:,}")
      os.remove(path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
