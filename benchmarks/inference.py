"""Inference speed of the thesis-size U-Net and FCN: slices/s, ms per slice, s per volume.

    python benchmarks/inference.py [--models=unet_brats,fcn_brats] [--repeats=5] [--mirror]

Per slice: the compiled predict step on one batch (the config's per-device batch),
median of `--repeats`. Per volume: the whole predict path on one synthetic
240x240x155 BRATS-shaped NIfTI volume (read, preprocess, every slice, resize back,
reorient, write), after a warm-up on the same volume; with `--mirror` also with
test-time mirroring (`evaluation.mirror`: every slice's 4 flips), and their ratio.
"""

import argparse
import functools
import importlib.util
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from medseg_jax import kinds  # noqa: E402
from medseg_jax.data import targets  # noqa: E402
from medseg_jax.evaluation import predict  # noqa: E402
from medseg_jax.training import settings, setup, step  # noqa: E402
from medseg_jax.data import preprocess, synthetic  # noqa: E402
from medseg_jax.parallel import strategies  # noqa: E402

VOLUME_SHAPE = (240, 240, 155)

CLASSES = targets.Classes(2)  # the benchmarked networks predict two classes


def load_config(name: str):
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def volume_seconds(probabilities, volume_path: str, run) -> float:
  """Seconds of the whole predict path on the volume, after one warm-up pass (which
  compiles the padded last batch)."""
  times = []
  with tempfile.TemporaryDirectory() as out:
    for _ in range(2):
      start = time.perf_counter()
      probs = probabilities(volume_path, run)
      predict.write_prediction(volume_path, probs, os.path.join(out, "pred.nii.gz"))
      times.append(time.perf_counter() - start)
  return times[-1]


def bench(name: str, repeats: int, volume_path: str, mirror: bool) -> dict:
  cfg = load_config(name)
  par = strategies.make_parallel("shard_map", 1)
  batch = cfg.train.per_device_batch_size
  state = setup.build_state(settings.read(cfg), par, 2, 1, optax.constant_schedule(0.0),
                            jax.random.key(0))
  state = par.put_state(state)
  predict_fn = par.predict_step(functools.partial(step.predict_step, outputs=CLASSES))
  size = cfg.data.image_size
  images = np.random.default_rng(0).normal(size=(batch, size, size, 1)).astype(np.float32)
  put = lambda: par.put_batch({"image": images})["image"]
  start = time.perf_counter()
  jax.block_until_ready(predict_fn(state, put()))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(predict_fn(state, put()))
    times.append(time.perf_counter() - start)
  per_batch = float(np.median(times))
  run = predict.mesh_run(par, predict_fn, state, batch)
  cfg.data.modalities = ()
  plain = functools.partial(predict.predict_volume, preprocess.settings_from_config(cfg.data),
                            ("T1w",))
  params = sum(x.size for x in jax.tree.leaves(state.params))
  row = {"config": name, "size": size, "batch": batch, "params_m": params / 1e6,
         "compile_s": compile_s, "ms_per_slice": 1000 * per_batch / batch,
         "slices_per_s": batch / per_batch, "s_per_volume": volume_seconds(plain, volume_path, run)}
  if mirror:
    cfg.evaluation.mirror = True
    mirrored = kinds.from_config(cfg).probabilities({"modalities": ["T1w"]}, batch)
    row["s_per_volume_mirrored"] = volume_seconds(mirrored, volume_path, run)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="unet_brats,fcn_brats")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--mirror", action="store_true", help="also time mirrored prediction")
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    image, _ = synthetic.make_phantom(np.random.default_rng(0), VOLUME_SHAPE)
    volume_path = os.path.join(tmp, "volume.nii.gz")
    nib.save(nib.Nifti1Image(image[..., 0], np.diag([-1.0, -1.0, 1.0, 1.0])), volume_path)
    rows = [bench(name, args.repeats, volume_path, args.mirror)
            for name in args.models.split(",")]
  print(f"{'config':11} {'size':>4} {'batch':>5} {'params M':>8} {'compile s':>9} "
        f"{'ms/slice':>8} {'slices/s':>8} {'s/volume':>8}")
  for r in rows:
    print(f"{r['config']:11} {r['size']:>4} {r['batch']:>5} {r['params_m']:>8.1f} "
          f"{r['compile_s']:>9.1f} {r['ms_per_slice']:>8.0f} {r['slices_per_s']:>8.2f} "
          f"{r['s_per_volume']:>8.1f}")
    if "s_per_volume_mirrored" in r:
      print(f"  mirrored (4 flips per slice): {r['s_per_volume_mirrored']:.1f} s/volume, "
            f"{r['s_per_volume_mirrored'] / r['s_per_volume']:.2f}x")


if __name__ == "__main__":
  main()
