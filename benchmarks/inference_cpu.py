"""CPU inference in three runtimes, side by side: JAX, ONNX Runtime on the exported graph, and
the same network in PyTorch; per slice batch and per volume, plus the ONNX export itself.

    python3 benchmarks/inference_cpu.py    # --configs=quickstart,unet_brats,fcn_brats

For each config (the quickstart U-Net, the thesis-size U-Net and FCN-8s of configs/), the
network with the weights of `init_state` (biases drawn at random instead of zeros, so the
check below covers them), 1 channel, 2 classes, on one CPU device:
  jax          the project's predict step (training/step.py), compiled by the shard_map
               strategy on one device, as --mode=predict runs it;
  onnxruntime  medseg_jax.export.onnx_graph: `session` on `forward_graph` of the same step;
  pytorch      the same network in PyTorch (benchmarks/torch_twins.py), weights copied.
Before timing, ONNX Runtime's and PyTorch's probabilities must equal JAX's within 1e-4 on
one batch, or the run stops with an error. Every side maps float32 NHWC numpy images to
NHWC numpy probabilities (PyTorch's NCHW transposes included).
Per batch: one batch of the config's eval batch. Per volume: every slice of one volume of
the dataset's shape (quickstart: its synthetic 96x96x48 volume, 48 slices resized to
64x64; thesis: 240x240x155, 155 slices), in runs of the eval batch (JAX pads the last one
to the compiled batch, as --mode=predict does; the others take it short); reading,
normalising and writing NIfTI are the same numpy code for all and left out
(benchmarks/inference.py times that whole path).
The sides take turns, in --rounds rounds of --block calls each (per volume: one call, the
batches having warmed every side up), so load from other work on the machine hits them
alike; each block of batches starts with one untimed call, so no side pays for the
threads of the side before it. Medians. PyTorch and ONNX
Runtime run --threads threads within an operation; XLA's CPU runtime runs one per core.
Needs the benchmark and ONNX requirements (benchmarks/requirements.txt, README).
"""

import argparse
import functools
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import inference  # noqa: E402  (benchmarks/inference.py: load_config)
import torch_twins  # noqa: E402
from medseg_jax.data import targets  # noqa: E402
from medseg_jax.evaluation import predict  # noqa: E402
from medseg_jax.export import onnx_graph  # noqa: E402
from medseg_jax.parallel import strategies  # noqa: E402
from medseg_jax.training import settings, setup, step  # noqa: E402

NUM_CLASSES = 2
CLASSES = targets.Classes(NUM_CLASSES)
TOLERANCE = 1e-4
THESIS_SLICES = 155  # Task01_BrainTumour volumes are 240x240x155


def volume_slices(cfg) -> int:
  """The slices of one volume along the config's slice axis."""
  if cfg.data.synthetic:
    return int(cfg.data.synthetic_shape[cfg.data.slice_axis])
  return THESIS_SLICES


def jax_state(cfg, par: strategies.Parallel):
  """The train state of `cfg` on the host, its biases drawn from N(0, 0.1)."""
  state = setup.build_state(settings.read(cfg), par, NUM_CLASSES, 1,
                            optax.constant_schedule(0.0), jax.random.key(0))
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p + rng.normal(0, 0.1, p.shape).astype(np.float32)
      if path[-1].key == "bias" else p, state.params)
  return state.replace(params=params)


def jax_side(state, par: strategies.Parallel, batch: int):
  """(probabilities of one batch, probabilities of a volume's slices) with the project's
  compiled predict step."""
  predict_fn = par.predict_step(functools.partial(step.predict_step, outputs=CLASSES))
  placed = par.put_state(state)

  def one_batch(images):
    return np.asarray(predict_fn(placed, par.put_batch({"image": images})["image"]))

  def volume(slices):
    return predict._run_batched(par, predict_fn, placed, slices, batch)  # pylint: disable=protected-access

  return one_batch, volume


def onnx_side(state, size: int, batch: int, threads: int):
  """(the two functions as for JAX, export seconds, graph bytes, session seconds)."""
  start = time.perf_counter()
  graph = onnx_graph.forward_graph(functools.partial(step.predict_step, state, outputs=CLASSES),
                                   (size, size, 1))
  export_s = time.perf_counter() - start
  start = time.perf_counter()
  sess = onnx_graph.session(graph, threads)
  session_s = time.perf_counter() - start
  return ((lambda images: onnx_graph.run(sess, images, batch),
           lambda slices: onnx_graph.run(sess, slices, batch)),
          export_s, len(graph), session_s)


def torch_side(cfg, params, batch: int):
  """(the two functions as for JAX) of the same network in PyTorch."""
  params = jax.tree.map(np.asarray, params)
  m = cfg.model
  if m.name == "unet":
    model = torch_twins.unet(params, m.depth, m.base_features, NUM_CLASSES)
  else:
    model = torch_twins.fcn(params, m.base_features, m.fc_features, NUM_CLASSES)
  one_batch = torch_twins.predictor(model)

  def volume(slices):
    return np.concatenate([one_batch(slices[s:s + batch])
                           for s in range(0, len(slices), batch)])

  return one_batch, volume


def check_same(name: str, sides: dict, images: np.ndarray) -> dict[str, float]:
  """Largest difference of each side's probabilities from JAX's, on `images` and on its
  first 3 (another batch size); exits with an error line past TOLERANCE."""
  expected = sides["jax"][0](images)
  diffs = {}
  for side in ("onnxruntime", "pytorch"):
    whole, part = sides[side][0](images), sides[side][0](images[:3])
    diffs[side] = float(max(np.abs(whole - expected).max(),
                            np.abs(part - expected[:3]).max()))
  if bad := {s: d for s, d in diffs.items() if not d <= TOLERANCE}:
    sys.exit(f"error: {name}: probabilities differ from JAX's by {bad} (> {TOLERANCE})")
  return diffs


def interleave(sides: dict, kind: int, arg: np.ndarray, rounds: int, block: int,
               warm: bool) -> dict[str, list[float]]:
  """Seconds per call of each side's function `kind` (0 batch, 1 volume) on `arg`, the
  sides taking turns in blocks of `block` calls; if `warm`, after one untimed call of
  each side, and each block after an untimed call."""
  times = {side: [] for side in sides}
  for fns in sides.values():  # compilation, allocators, thread pools
    if warm:
      fns[kind](arg)
  for _ in range(rounds):
    for side, fns in sides.items():
      if warm:
        fns[kind](arg)
      for _ in range(block):
        start = time.perf_counter()
        fns[kind](arg)
        times[side].append(time.perf_counter() - start)
  return times


def bench(name: str, args) -> dict:
  """The figures of one config."""
  cfg = inference.load_config(name)
  par = strategies.make_parallel("shard_map", 1)
  size, batch = cfg.data.image_size, setup.eval_batch(cfg, 1)
  state = jax_state(cfg, par)
  ort_fns, export_s, graph_bytes, session_s = onnx_side(state, size, batch, args.threads)
  sides = {"jax": jax_side(state, par, batch), "onnxruntime": ort_fns,
           "pytorch": torch_side(cfg, state.params, batch)}
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, size, size, 1)).astype(np.float32)
  slices = rng.normal(size=(volume_slices(cfg), size, size, 1)).astype(np.float32)
  diffs = check_same(name, sides, images)
  row = {"config": name, "model": cfg.model.name, "size": size, "batch": batch,
         "slices": len(slices),
         "params_m": sum(p.size for p in jax.tree.leaves(state.params)) / 1e6,
         "export_s": export_s, "graph_mb": graph_bytes / 2**20, "session_s": session_s,
         "max_abs_diff": diffs}
  for kind, label, arg, rounds, block, warm in (
      (0, "batch", images, args.rounds, args.block, True),
      (1, "volume", slices, args.volume_rounds, 1, False)):
    times = interleave(sides, kind, arg, rounds, block, warm)
    row["per_" + label] = {side: float(np.median(t)) for side, t in times.items()}
    row["per_" + label + "_calls"] = len(times["jax"])
  print_config(row)
  return row


def print_config(r: dict) -> None:
  print(f"\n{r['config']}: {r['model']}, {r['size']}x{r['size']}x1, {r['params_m']:.1f} M "
        f"parameters; batch {r['batch']}, volume {r['slices']} slices")
  print(f"  ONNX export {r['export_s']:.1f} s, graph {r['graph_mb']:.1f} MiB, session "
        f"{r['session_s']:.1f} s; largest difference from JAX: " + ", ".join(
            f"{s} {d:.1e}" for s, d in r["max_abs_diff"].items()))
  for label in ("batch", "volume"):
    m = r["per_" + label]
    print(f"  per {label:6} (median of {r['per_' + label + '_calls']}): " + ", ".join(
        f"{s} {t:.3f} s" for s, t in m.items())
          + f"; PyTorch / ONNX Runtime {m['pytorch'] / m['onnxruntime']:.2f}, "
          f"JAX / ONNX Runtime {m['jax'] / m['onnxruntime']:.2f}")


def print_table(rows: list[dict]) -> None:
  print("\n| config | per | JAX s | ONNX Runtime s | PyTorch s | PyTorch / ORT | JAX / ORT |"
        "\n|---|---|---|---|---|---|---|")
  for r in rows:
    for label in ("batch", "volume"):
      m = r["per_" + label]
      what = f"batch of {r['batch']}" if label == "batch" else f"volume ({r['slices']})"
      print(f"| {r['config']} | {what} | {m['jax']:.3f} | {m['onnxruntime']:.3f} | "
            f"{m['pytorch']:.3f} | {m['pytorch'] / m['onnxruntime']:.2f} | "
            f"{m['jax'] / m['onnxruntime']:.2f} |")
  print("\n| config | params M | ONNX export s | graph MiB | session s |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['config']} | {r['params_m']:.1f} | {r['export_s']:.1f} | "
          f"{r['graph_mb']:.1f} | {r['session_s']:.1f} |")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="quickstart,unet_brats,fcn_brats")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--block", type=int, default=3, help="timed batches per side per round")
  p.add_argument("--volume_rounds", type=int, default=3)
  p.add_argument("--threads", type=int, default=0, help="0 = the cores")
  p.add_argument("--json", action="store_true", help="also print one JSON line")
  args = p.parse_args()
  import torch
  cores = len(os.sched_getaffinity(0))
  args.threads = args.threads or cores
  torch.set_num_threads(args.threads)
  print(f"{platform.processor() or platform.machine()}, {cores} cores, load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
        + f"; jax {jax.__version__}, onnxruntime {_version('onnxruntime')}, jax2onnx "
        f"{_version('jax2onnx')}, torch {torch.__version__}; {args.threads} threads for "
        f"ONNX Runtime and PyTorch, XLA's default (one per core) for JAX")
  rows = [bench(name, args) for name in args.configs.split(",")]
  print_table(rows)
  print("load average at the end " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
  if args.json:
    print(json.dumps({"threads": args.threads, "cores": cores, "rows": rows}))


def _version(package: str) -> str:
  from importlib import metadata
  return metadata.version(package)


if __name__ == "__main__":
  main()
