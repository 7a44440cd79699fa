"""A model of data-parallel step time on N GPUs, calibrated against the thesis's cluster.

    python benchmarks/scaling_model.py        # --gpu_tflops=6.8 --latency_us=5

Synchronous data parallelism at a fixed per-GPU batch (weak scaling): every step each
GPU computes its gradients (time T), then a ring all-reduce averages them:

    all-reduce(N) = 2 (N - 1) / N * bytes / bandwidth + 2 (N - 1) * latency
    step(N)       = T + all-reduce(N) - min(all-reduce(N), overlap * backward share * T)
    speed-up(N)   = N * T / step(N),   efficiency(N) = speed-up(N) / N

`overlap` is the fraction of the backward pass behind which the all-reduce can run
(0: none; Horovod-style bucketed all-reduce starts as the last layers' gradients are
ready). The gradient bytes are the float32 parameters of the thesis models as
medseg_jax builds them (U-Net base 64, depth 4; FCN-8s with VGG-16 widths, fc 4096;
1 input channel, 2 classes); T is the FLOPs of one train step at the thesis's batch
per GPU (XLA's cost analysis of medseg_jax's step, no GPU needed) divided by an
assumed sustained GTX 1080 Ti throughput (--gpu_tflops). The effective ring bandwidth
and the overlap are then fitted to the thesis's figures at 18 GPUs: U-Net 17.5x (97%),
FCN 10.4x (58%).
"""

import argparse
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THESIS_GPUS = 18
THESIS_SPEEDUP = {"unet": 17.5, "fcn": 10.4}    # on 18 GTX 1080 Ti over InfiniBand
THESIS_UNET_HOURS = 21 + 40 / 60             # U-Net, 1 GPU, 100 epochs
THESIS_SLICES = 33_880                        # brain tumour train+val slices
THESIS_SETTINGS = {  # thesis batch per GPU; image sizes of configs/*_brats.py
    "unet": {"batch": 7, "size": 240},
    "fcn": {"batch": 10, "size": 224},
}
BACKWARD_SHARE = 2.0 / 3.0   # backward ~ 2x forward FLOPs: 2/3 of a train step


def allreduce_seconds(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
  """Ring all-reduce of `nbytes` over `n` workers: bandwidth term plus 2(n-1) hops."""
  if n <= 1:
    return 0.0
  return 2.0 * (n - 1) / n * nbytes / bandwidth + 2.0 * (n - 1) * latency


def step_seconds(compute: float, comm: float, overlap: float = 0.0,
                 backward_share: float = BACKWARD_SHARE) -> float:
  """Compute plus the part of the all-reduce not hidden behind the backward pass."""
  hidden = min(comm, overlap * backward_share * compute)
  return compute + comm - hidden


def speedup(n: int, compute: float, nbytes: float, bandwidth: float, latency: float,
            overlap: float = 0.0) -> float:
  """Throughput on n GPUs over one GPU at the same per-GPU batch."""
  comm = allreduce_seconds(nbytes, n, bandwidth, latency)
  return n * compute / step_seconds(compute, comm, overlap)


def fit(models: dict, n: int, targets: dict, latency: float,
        overlaps=(0.0,)) -> tuple[float, float, float]:
  """(bandwidth, overlap, RMS efficiency error) minimising the squared error of the
  efficiencies at n GPUs; `models` maps name -> (compute s, gradient bytes). The
  bandwidth is searched on a log grid from 10 MB/s to 100 GB/s, 1% apart."""
  best = (math.inf, 0.0, 0.0)
  for overlap in overlaps:
    bandwidth = 1e7
    while bandwidth <= 1e11:
      err = sum((speedup(n, c, b, bandwidth, latency, overlap) / n - targets[m] / n) ** 2
                for m, (c, b) in models.items())
      best = min(best, (err, bandwidth, overlap))
      bandwidth *= 1.01
  err, bandwidth, overlap = best
  return bandwidth, overlap, math.sqrt(err / len(models))


def thesis_models() -> dict:
  """name -> {params, bytes, flops}: the thesis-size models' float32 gradients and the
  FLOPs of one medseg_jax train step at the thesis's batch per GPU."""
  import functools  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from medseg_jax import defaults  # pylint: disable=import-outside-toplevel
  from medseg_jax import optim  # pylint: disable=import-outside-toplevel
  from medseg_jax.training import losses, state, step
  from medseg_jax.models import build_model  # pylint: disable=import-outside-toplevel

  out = {}
  for name, setting in THESIS_SETTINGS.items():
    cfg = defaults.get_config()
    cfg.model.name = name
    size, batch = setting["size"], setting["batch"]
    model = build_model(cfg.model, 2, size)
    tx = optim.make_optimizer(cfg, 1e-5)

    def init(model=model, tx=tx, size=size):
      params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)))["params"]
      return state.TrainState.create(apply_fn=model.apply, params=params, model_state={},
                                     tx=tx)
    shapes = jax.eval_shape(init)
    fn = functools.partial(step.train_step, loss_fn=losses.dice_ce_loss,
                           reduce_mean=lambda tree: tree)
    batch_shapes = {"image": jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32),
                    "label": jax.ShapeDtypeStruct((batch, size, size), jnp.int32)}
    cost = jax.jit(fn).lower(shapes, batch_shapes, jax.random.key(0)).cost_analysis()
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes.params))
    out[name] = {"params": params, "bytes": 4 * params, "flops": float(cost["flops"]),
                 "batch": batch, "size": size}
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gpu_tflops", type=float, default=6.8,
                 help="sustained FP32 TFLOP/s of one GTX 1080 Ti in training (peak 11.3)")
  p.add_argument("--latency_us", type=float, default=5.0, help="per ring hop")
  p.add_argument("--max_gpus", type=int, default=64)
  p.add_argument("--json", action="store_true", help="also print one JSON line")
  args = p.parse_args()
  latency = args.latency_us * 1e-6
  models = thesis_models()
  for m in models.values():
    m["compute_s"] = m["flops"] / (args.gpu_tflops * 1e12)
  pairs = {k: (m["compute_s"], m["bytes"]) for k, m in models.items()}
  fits = {"no_overlap": fit(pairs, THESIS_GPUS, THESIS_SPEEDUP, latency),
          "overlap": fit(pairs, THESIS_GPUS, THESIS_SPEEDUP, latency,
                         [i / 20 for i in range(21)])}
  print(f"sustained GPU throughput {args.gpu_tflops} TFLOP/s (assumed), ring hop latency "
        f"{args.latency_us} us")
  for k, m in models.items():
    print(f"{k:5} {m['params'] / 1e6:6.1f} M params, {m['bytes'] / 2**20:6.1f} MiB gradients, "
          f"{m['flops'] / 1e12:.2f} TFLOP per step (batch {m['batch']}, {m['size']}x{m['size']})"
          f" -> {m['compute_s'] * 1e3:.0f} ms compute, "
          f"{m['bytes'] / m['compute_s'] / 1e9:.2f} GB of gradients per compute-second")
  unet = models["unet"]
  train_slices = round(0.7 * THESIS_SLICES)  # the configs' split: 70% train
  hours = 100 * (train_slices // unet["batch"]) * unet["compute_s"] / 3600
  print(f"check: 100 U-Net epochs of {train_slices} slices on one GPU -> {hours:.1f} h "
        f"(thesis: {THESIS_UNET_HOURS:.1f} h)")
  result = {"unet_100_epochs_h": hours, "gpu_tflops": args.gpu_tflops,
            "latency_us": args.latency_us, "models": models, "fits": {}}
  for label, (bandwidth, overlap, rms) in fits.items():
    rows = {k: [speedup(n, c, b, bandwidth, latency, overlap)
                for n in range(1, args.max_gpus + 1)] for k, (c, b) in pairs.items()}
    result["fits"][label] = {"bandwidth_GBps": bandwidth / 1e9, "overlap": overlap,
                             "rms_efficiency_error": rms, "speedup": rows}
    print(f"\nfit '{label}': effective ring bandwidth {bandwidth / 1e9:.2f} GB/s, overlap "
          f"{overlap:.2f}; RMS error in efficiency at {THESIS_GPUS} GPUs {rms * 100:.1f} points")
    for k in pairs:
      s = rows[k][THESIS_GPUS - 1]
      print(f"  {k:5} at {THESIS_GPUS}: model {s:5.1f}x ({s / THESIS_GPUS:4.0%}), "
            f"thesis {THESIS_SPEEDUP[k]}x ({THESIS_SPEEDUP[k] / THESIS_GPUS:4.0%})")
    print(f"  {'N':>3} " + " ".join(f"{k + ' x':>9} {'eff':>5}" for k in pairs))
    for n in (1, 2, 4, 8, 12, 16, 18, 24, 32, 48, 64):
      if n <= args.max_gpus:
        print(f"  {n:3} " + " ".join(f"{rows[k][n - 1]:9.1f} {rows[k][n - 1] / n:5.0%}"
                                     for k in pairs))
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
