"""medseg_jax's 3D U-Net against MONAI in PyTorch: the train step, and sliding-window
inference of one volume.

    python3 benchmarks/vs_monai3d.py --json     # quickstart_3d's shape, then patch 48³ base 16
    python3 benchmarks/vs_monai3d.py --settings= --convs= --plan=plans/TASK/plan_3d.py

One process; JAX on one CPU device, PyTorch and ONNX Runtime with one thread per core
(`--torch_threads` sets both). Networks of the
same shape (configs/quickstart_3d.py: depth 3, instance norm, 2 classes; patch, batch and
base features per setting):
- medseg_jax: `UNet3D` through the project's build path (shard_map on 1 device, Adam of
  `optim.make_optimizer`, `losses.dice_ce_loss`); medseg_jax_xla: the same step with
  XLA's own kernel gradient in every convolution (`conv3d_cpu`'s rule switched off);
- pytorch: the same network layer for layer in PyTorch (`torch_twins.unet3d`);
- monai: `monai.networks.nets.DynUNet` (`torch_twins.dynunet3d`) set as close as it goes
  (kernel 3, instance norm with affine, leaky ReLU 0.01, two convolutions per level,
  transposed-convolution upsampling); it downsamples by a strided first convolution
  (stride = the level's pooling factors), not a max-pool, and its convolutions have no
  bias.
Train step: forward, backward and Adam (lr 2e-3, optax's and torch's defaults are equal)
on the same random patches and labels, loss Dice + cross-entropy per sample as
`losses.dice_ce_loss`. Inference of a synthetic volume: `evaluation.sliding_window`
around the JAX predict step (`predict.mesh_run`) against
`monai.inferers.sliding_window_inference` around the twin with the JAX weights copied,
the same window, overlap, Gaussian (MONAI's sigma_scale = our gaussian_sigma) and windows
per batch; also our `sliding_window` around the twin, which separates the stitching from
the network, and around ONNX Runtime on the graph of the same predict step
(`export.onnx_graph`); and the largest differences between the probability volumes (MONAI
once more with our importance map: both floor the Gaussian at 1e-3, ours after scaling it
to a maximum of 1, MONAI unscaled, its maximum below 1 for an even patch). Before timing,
the twin must have JAX's parameter count, and the twin's and ONNX Runtime's probabilities
must equal JAX's within 1e-4 on a batch of windows, or the run stops with an error. The
inference network is quickstart_3d's (window 32³, 2 per batch) or, with `--plan`, that of
a planned 3D config file (`python -m medseg_jax.plan`): its depth, widths and their cap,
per-level pooling factors (anisotropic ones included), `data.patch_size` as the window and
its evaluation batch on one device as windows per batch. Last, single 3x3x3
convolutions forward (`--convs`), XLA's against PyTorch's. Sides take turns in blocks
(`--block` calls per side per round), so a change of the shared machine's load falls on
every side alike; figures are medians.
Needs the benchmark requirements (benchmarks/requirements.txt) and, for inference, the
ONNX extra (README).
"""

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import time
from importlib import metadata
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_twins  # noqa: E402  (benchmarks/)
from vs_pytorch import torch_dice_ce, torch_train_once  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 2
LR = 2e-3  # configs/quickstart_3d.py: adam, optim.lr
TOLERANCE = 1e-4  # the twin's and ONNX Runtime's probabilities against JAX's
TRAIN_SETTINGS = {"quickstart_3d": dict(patch=32, batch=2, base=8, depth=3),
                  "p48_b16": dict(patch=48, batch=2, base=16, depth=3)}


# -- PyTorch's sides ---------------------------------------------------------------
def to_torch(images: np.ndarray):
  """[N,D,H,W,C] numpy -> [N,C,D,H,W] tensor."""
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, 1)))


def torch_probabilities(model, device: str = "cpu"):
  """windows [N,d,h,w,C] numpy -> softmax probabilities [N,d,h,w,K] numpy, by `model` on
  `device`."""
  import torch
  def run(windows: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
      out = torch.softmax(model(to_torch(windows).to(device)), dim=1).cpu().numpy()
    return np.moveaxis(out, 1, -1)
  return run


def torch_side(model, images: np.ndarray, labels: np.ndarray) -> dict:
  """A PyTorch network's train step (Adam, as the config's optimizer) and parameter count."""
  import torch
  x, y = to_torch(images), torch.from_numpy(labels.astype(np.int64))
  opt = torch.optim.Adam(model.parameters(), lr=LR)
  return dict(fn=torch_train_once(model, opt, x, y),
              count=sum(p.numel() for p in model.parameters()))


# -- a setting: patch (an edge, or (D,H,W)), batch, base, depth; pooling, max_features ---
def window(s: dict) -> tuple:
  """The patch (D,H,W) of setting `s`."""
  patch = s["patch"]
  return tuple(patch) if isinstance(patch, (tuple, list)) else (patch,) * 3


def shape_keywords(s: dict) -> dict:
  """`torch_twins.unet3d`'s and `dynunet3d`'s keywords for the pooling and width cap of
  setting `s`."""
  return dict(pooling=s.get("pooling", ()), max_features=s.get("max_features", 0))


def plan_setting(path: str) -> dict:
  """The inference setting of a planned 3D config file: its U-Net, `data.patch_size` as
  the window, its evaluation batch on one device as windows per batch."""
  from medseg_jax import config_schema
  from medseg_jax.training import setup
  cfg = config_schema.load_config(path)
  m = cfg.model
  found = (m.name, m.norm, m.compute_dtype, cfg.data.spatial_dims, m.kwargs.to_dict())
  if found != ("unet3d", "instance", "float32", 3, {}):
    sys.exit(f"error: --plan={path}: the PyTorch twin is unet3d, instance norm, float32, 3D, "
             f"no model.kwargs; the file has (model.name, model.norm, model.compute_dtype, "
             f"data.spatial_dims, model.kwargs) = {found}")
  return dict(patch=tuple(int(n) for n in cfg.data.patch_size),
              batch=setup.eval_batch(cfg, 1), base=m.base_features, depth=m.depth,
              pooling=torch_twins.level_factors(m.depth, m.pooling),
              max_features=m.max_features)


# -- medseg_jax -----------------------------------------------------------------------
def jax_build(s: dict) -> tuple:
  """(parallel strategy, host train state) of UNet3D through the project's build path."""
  sys.path.insert(0, REPO)
  import jax
  from configs import quickstart_3d
  from medseg_jax import optim
  from medseg_jax.models import build_model
  from medseg_jax.parallel import strategies
  from medseg_jax.training import state as state_lib
  cfg = quickstart_3d.get_config()
  cfg.model.update({"depth": s["depth"], "base_features": s["base"],
                    **shape_keywords(s)})
  par = strategies.make_parallel("shard_map", 1)
  model = build_model(cfg.model, NUM_CLASSES, window(s)[0], par.bn_axis_name)
  state = state_lib.init_state(model, optim.make_optimizer(cfg, LR), jax.random.key(0),
                               window(s) + (1,))
  return par, state


def jax_train(s: dict, images: np.ndarray, labels: np.ndarray, shifted: bool = True) -> dict:
  """medseg_jax's train step, compiled ahead (its compile time kept), parameter count; with
  `shifted` False, XLA's own kernel gradient for every convolution (the project's rule,
  `conv3d_cpu.use_shifted`, switched off while tracing, as benchmarks/conv3d_cpu.py does)."""
  import jax
  from medseg_jax.models import conv3d_cpu
  from medseg_jax.training import losses, step as step_lib
  par, state = jax_build(s)
  count = sum(x.size for x in jax.tree.leaves(state.params))
  state, batch = par.put_state(state), par.put_batch({"image": images, "label": labels})
  rng = jax.random.key(1)
  step = par.train_step(functools.partial(step_lib.train_step, loss_fn=losses.dice_ce_loss))
  rule = conv3d_cpu.MAX_VOXELS
  conv3d_cpu.MAX_VOXELS = rule if shifted else 0
  try:
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
  finally:
    conv3d_cpu.MAX_VOXELS = rule
  holder = {"state": state}

  def train_once():
    holder["state"], metrics = compiled(holder["state"], batch, rng)
    jax.block_until_ready(metrics)

  return dict(fn=train_once, compile_s=compile_s, count=count)


def jax_predictor(s: dict) -> tuple:
  """(run: windows [N,d,h,w,1] -> probabilities, as validation and prediction run them;
  the train state on the host)."""
  from medseg_jax.data import targets
  from medseg_jax.evaluation import predict
  from medseg_jax.training import step as step_lib
  par, state = jax_build(s)
  predict_fn = functools.partial(step_lib.predict_step, outputs=targets.Classes(NUM_CLASSES))
  run = predict.mesh_run(par, par.predict_step(predict_fn), par.put_state(state), s["batch"])
  return run, state


def onnx_predictor(state, s: dict, threads: int) -> tuple:
  """(run: windows -> probabilities by ONNX Runtime with `threads` threads, on the graph of
  the project's predict step with `state` that `export.onnx_graph` writes; export s)."""
  from medseg_jax.data import targets
  from medseg_jax.export import onnx_graph
  from medseg_jax.training import step as step_lib
  start = time.perf_counter()
  graph = onnx_graph.forward_graph(functools.partial(step_lib.predict_step, state,
                                                     outputs=targets.Classes(NUM_CLASSES)),
                                   window(s) + (1,))
  export_s = time.perf_counter() - start
  sess = onnx_graph.session(graph, threads)
  return (lambda windows: onnx_graph.run(sess, windows, s["batch"])), export_s


# -- timing -----------------------------------------------------------------------
def interleave(fns: dict, rounds: int, block: int, loads: list, warmup: bool = True) -> dict:
  """name -> (median wall s, median process CPU s) of `block` calls per round, the sides
  taking turns, after one warm-up call each (if `warmup`); the 1-minute load average is
  appended to `loads` every round. CPU time counts every thread of the process, waiting
  threads that spin included; under load it moves less than the wall time."""
  for fn in fns.values() if warmup else ():
    fn()
  times = {name: [] for name in fns}
  for _ in range(rounds):
    loads.append(os.getloadavg()[0])
    for name, fn in fns.items():
      for _ in range(block):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        times[name].append((time.perf_counter() - start, time.process_time() - cpu))
  return {name: tuple(float(x) for x in np.median(t, axis=0)) for name, t in times.items()}


def train_setting(name: str, args, loads: list) -> dict:
  """The train step of the three networks at setting `name`, timed in alternation."""
  s = TRAIN_SETTINGS[name]
  rng = np.random.default_rng(0)
  shape = (s["batch"],) + (s["patch"],) * 3
  images = rng.normal(size=shape + (1,)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, shape).astype(np.uint8)  # stored as uint8
  depth, base = s["depth"], s["base"]
  sides = {"medseg_jax": jax_train(s, images, labels),
           "medseg_jax_xla": jax_train(s, images, labels, shifted=False),
           "pytorch": torch_side(torch_twins.unet3d(depth, base, **shape_keywords(s)),
                                 images, labels),
           "monai": torch_side(torch_twins.dynunet3d(depth, base, **shape_keywords(s)),
                               images, labels)}
  counts = {side: d["count"] for side, d in sides.items() if side != "medseg_jax_xla"}
  if counts["medseg_jax"] != counts["pytorch"]:
    sys.exit(f"error: parameter counts differ: {counts}")
  medians = interleave({side: d["fn"] for side, d in sides.items()}, args.rounds,
                       args.block, loads)
  return dict(setting=name, **s, params=counts, steps=args.rounds * args.block,
              compile_s={side: d["compile_s"] for side, d in sides.items() if "compile_s" in d},
              median_s={side: m[0] for side, m in medians.items()},
              median_cpu_s={side: m[1] for side, m in medians.items()})


# -- sliding-window inference -----------------------------------------------------------
def phantom(shape: tuple) -> np.ndarray:
  """A synthetic head volume [D,H,W,1] (data.synthetic), z-scored."""
  from medseg_jax.data import synthetic
  image, _ = synthetic.make_phantom(np.random.default_rng(0), shape)
  return ((image - image.mean()) / image.std()).astype(np.float32)


def monai_run(model, volume: np.ndarray, s: dict, overlap: float, sigma: float,
              weight_map=None, device: str = "cpu"):
  """() -> MONAI's sliding_window_inference of `volume` (put on `device`) around `model`:
  probabilities [D,H,W,K] numpy; its own Gaussian map unless `weight_map` [d,h,w] is
  given."""
  import torch
  from monai.inferers import sliding_window_inference
  x = to_torch(volume[None]).to(device)
  roi_map = None if weight_map is None else torch.from_numpy(weight_map.astype(np.float32))
  def predictor(windows):
    return torch.softmax(model(windows), dim=1)
  def call():
    with torch.inference_mode():
      out = sliding_window_inference(x, window(s), s["batch"], predictor,
                                     overlap=overlap, mode="gaussian", sigma_scale=sigma,
                                     padding_mode="constant", cval=0.0,
                                     roi_weight_map=roi_map)
    return np.moveaxis(out[0].cpu().numpy(), 0, -1)
  return call


@dataclasses.dataclass(frozen=True)
class Nets:
  """The network of the inference sides, with the same weights in each runtime."""

  run_jax: Callable  # windows [N,d,h,w,1] -> probabilities [N,d,h,w,K], all three
  twin: Any  # the PyTorch twin
  run_twin: Callable
  run_onnx: Callable
  params: int  # parameters, the same in JAX and the twin (checked)
  onnx_export_s: float


def predictors(s: dict, threads: int) -> Nets:
  """The JAX run, the PyTorch twin with the same weights and its run, and ONNX Runtime's
  run with `threads` threads; stops with an error unless the twin has JAX's parameter
  count."""
  import jax
  from medseg_jax.errors import MedsegError
  run_jax, state = jax_predictor(s)
  model = torch_twins.unet3d(s["depth"], s["base"], **shape_keywords(s))
  torch_twins.copy_unet3d_weights(model, jax.tree.map(np.asarray, state.params))
  model.eval()
  counts = {"medseg_jax": sum(x.size for x in jax.tree.leaves(state.params)),
            "pytorch": sum(p.numel() for p in model.parameters())}
  if counts["medseg_jax"] != counts["pytorch"]:
    sys.exit(f"error: parameter counts differ: {counts}")
  try:
    run_onnx, export_s = onnx_predictor(state, s, threads)
  except MedsegError as e:
    sys.exit(f"error: {e}")
  return Nets(run_jax, model, torch_probabilities(model), run_onnx, counts["medseg_jax"],
              export_s)


def check_against_jax(nets: Nets, s: dict) -> dict:
  """The largest difference of the twin's and ONNX Runtime's probabilities from JAX's on
  one batch of random windows (JAX compiles there); stops with an error past TOLERANCE."""
  windows = np.random.default_rng(1).normal(
      size=(s["batch"],) + window(s) + (1,)).astype(np.float32)
  expected = nets.run_jax(windows)
  diffs = {side: float(np.abs(run(windows) - expected).max())
           for side, run in (("twin", nets.run_twin), ("onnx", nets.run_onnx))}
  if bad := {side: d for side, d in diffs.items() if not d <= TOLERANCE}:
    sys.exit(f"error: probabilities differ from JAX's by {bad} (> {TOLERANCE})")
  return diffs


def inference(shape: tuple, s: dict, nets: Nets, args, loads: list) -> dict:
  """One volume by sliding windows: ours around JAX, MONAI's around the twin (the JAX
  weights copied), ours around the twin, ours around ONNX Runtime; times and the
  differences of the results."""
  from medseg_jax.evaluation import sliding_window
  windows = sliding_window.Windows(patch=window(s), overlap=args.overlap,
                                   gaussian_sigma=args.sigma, batch=s["batch"])
  volume = phantom(shape)
  calls = {"medseg_jax": lambda: windows.apply(volume, nets.run_jax),
           "monai": monai_run(nets.twin, volume, s, args.overlap, args.sigma),
           "ours_on_twin": lambda: windows.apply(volume, nets.run_twin),
           "ours_onnx": lambda: windows.apply(volume, nets.run_onnx)}
  out = {}
  fns = {name: (lambda name=name, fn=fn: out.__setitem__(name, fn())) for name, fn in
         calls.items()}
  medians = interleave(fns, args.infer_rounds, 1, loads, warmup=False)
  # MONAI with our importance map (untimed): what is left is float32 against float64 sums.
  out["monai_our_map"] = monai_run(nets.twin, volume, s, args.overlap, args.sigma,
                                   sliding_window.gaussian_map(window(s), args.sigma))()
  differ = lambda a, b: float(np.abs(out[a] - out[b]).max())
  return dict(volume=list(shape), **s, overlap=args.overlap, sigma=args.sigma,
              windows=len(sliding_window.window_corners(shape, window(s), args.overlap)),
              median_s={name: m[0] for name, m in medians.items()},
              median_cpu_s={name: m[1] for name, m in medians.items()},
              calls=args.infer_rounds,
              max_abs_diff={"jax_vs_monai": differ("medseg_jax", "monai"),
                            "stitching_only": differ("ours_on_twin", "monai"),
                            "stitching_our_map": differ("ours_on_twin", "monai_our_map"),
                            "network_only": differ("medseg_jax", "ours_on_twin"),
                            "onnx_vs_jax": differ("ours_onnx", "medseg_jax")},
              argmax_differs=float(np.mean(out["medseg_jax"].argmax(-1)
                                           != out["monai"].argmax(-1))))


def inference_part(shapes: list, args, loads: list) -> tuple:
  """(the network of the inference: its setting, parameters, export time and differences
  from JAX on one batch; a row of `inference` per volume shape)."""
  s = plan_setting(args.plan) if args.plan else TRAIN_SETTINGS["quickstart_3d"]
  nets = predictors(s, args.torch_threads or os.cpu_count())
  network = dict(setting=s, params=nets.params, onnx_export_s=nets.onnx_export_s,
                 max_abs_diff=check_against_jax(nets, s))
  return network, [inference(shape, s, nets, args, loads) for shape in shapes]


# -- one convolution ---------------------------------------------------------------------
def conv_forward(spec: str, batch: int, repeats: int, loads: list) -> dict:
  """One 3x3x3 'same' convolution without bias, edge³ x C_in -> C_out (`spec` is
  "edge:cin:cout") on `batch` examples, forward only: XLA's against PyTorch's."""
  import jax
  import torch
  edge, cin, cout = (int(n) for n in spec.split(":"))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, edge, edge, edge, cin)).astype(np.float32)
  k = rng.normal(size=(3, 3, 3, cin, cout)).astype(np.float32)
  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")))
  xj, kj = jax.device_put(x), jax.device_put(k)
  xt, kt = to_torch(x), torch.from_numpy(np.ascontiguousarray(k.transpose(4, 3, 0, 1, 2)))
  def torch_conv():
    with torch.inference_mode():
      torch.nn.functional.conv3d(xt, kt, padding=1)
  medians = interleave({"xla": lambda: jax.block_until_ready(conv(xj, kj)),
                        "pytorch": torch_conv}, repeats, 1, loads)
  return dict(edge=edge, cin=cin, cout=cout, batch=batch,
              median_s={name: m[0] for name, m in medians.items()},
              median_cpu_s={name: m[1] for name, m in medians.items()})


def print_convs(rows: list[dict]) -> None:
  print("\nOne 3×3×3 convolution, forward, median wall s (process CPU s):")
  print("| edge | C_in→C_out | batch | XLA | PyTorch | XLA / PyTorch (CPU s) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    c = r["median_cpu_s"]
    print(f"| {r['edge']}³ | {r['cin']}→{r['cout']} | {r['batch']} | "
          f"{_both(r, 'xla')} | {_both(r, 'pytorch')} | {c['xla'] / c['pytorch']:.1f} |")


# -- report -----------------------------------------------------------------------------
def machine() -> dict:
  """CPU, cores, memory and the versions that matter."""
  import flax
  import jax
  import monai
  import optax
  import torch
  cpu = platform.processor()
  with open("/proc/cpuinfo") as f:
    cpu = next((line.split(":", 1)[1].strip() for line in f
                if line.startswith("model name")), cpu)
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return dict(cpu=cpu, cores=os.cpu_count(), ram_gib=round(ram, 1),
              python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
              optax=optax.__version__, torch=torch.__version__, monai=monai.__version__,
              torch_threads=torch.get_num_threads(), jax_devices=str(jax.devices()),
              onnxruntime=_version("onnxruntime"), jax2onnx=_version("jax2onnx"))


def _version(package: str) -> str:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return "not installed"


def _both(r: dict, side: str) -> str:
  return f"{r['median_s'][side]:.3f} ({r['median_cpu_s'][side]:.3f})"


def print_train(rows: list[dict]) -> None:
  print("\nTrain step, median wall s (process CPU s):")
  print("| setting | patch | batch | base | parameters medseg_jax / pytorch / monai "
        "| JAX compile s (XLA's kernel grads) | medseg_jax | medseg_jax, XLA's kernel "
        "grads | pytorch | monai | medseg_jax / pytorch | medseg_jax / monai |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    m, c, t = r["median_s"], r["params"], r["compile_s"]
    print(f"| {r['setting']} | {r['patch']}³ | {r['batch']} | {r['base']} | "
          f"{c['medseg_jax']:,} / {c['pytorch']:,} / {c['monai']:,} | "
          f"{t['medseg_jax']:.1f} ({t['medseg_jax_xla']:.1f}) | "
          + " | ".join(_both(r, side) for side in ("medseg_jax", "medseg_jax_xla", "pytorch",
                                                   "monai"))
          + f" | {m['medseg_jax'] / m['pytorch']:.2f} | {m['medseg_jax'] / m['monai']:.2f} |")


def describe(network: dict) -> str:
  """The inference network in one line: its shape, parameters, window and export time."""
  s = network["setting"]
  cap = f" (at most {s['max_features']})" if s.get("max_features") else ""
  pooling = " ".join("(" + ",".join(map(str, f)) + ")"
                     for f in torch_twins.level_factors(s["depth"],
                                                        s.get("pooling", ())))
  return (f"unet3d depth {s['depth']}, base {s['base']}{cap}, pooling {pooling}, "
          f"{network['params']:,} parameters; window {'×'.join(map(str, window(s)))}; "
          f"ONNX export {network['onnx_export_s']:.1f} s")


def print_inference(rows: list[dict], network: dict) -> None:
  print(f"\nSliding-window inference of one volume: {describe(network)}. Median wall s "
        f"(process CPU s):")
  print("| volume | windows (batch) | ours + JAX | MONAI + PyTorch twin "
        "| ours + PyTorch twin | ours + ONNX Runtime | ours + JAX / MONAI + twin "
        "| ours + ONNX Runtime / MONAI + twin |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    m = r["median_s"]
    print(f"| {'×'.join(map(str, r['volume']))} | {r['windows']} ({r['batch']}) | "
          + " | ".join(_both(r, side) for side in ("medseg_jax", "monai", "ours_on_twin",
                                                   "ours_onnx"))
          + f" | {m['medseg_jax'] / m['monai']:.2f} | {m['ours_onnx'] / m['monai']:.2f} |")
  d = network["max_abs_diff"]
  print(f"\nNetwork on one batch of windows, max abs diff from JAX: the twin {d['twin']:.1e}, "
        f"ONNX Runtime {d['onnx']:.1e}. Probability volumes:")
  print("| volume | max abs diff: ours + JAX vs MONAI + twin | ours vs MONAI, both on the "
        "twin | the same, MONAI given our map | ours on JAX vs on the twin "
        "| ours on ONNX Runtime vs on JAX | voxels whose argmax differs (JAX vs MONAI) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    d = r["max_abs_diff"]
    print(f"| {'×'.join(map(str, r['volume']))} | {d['jax_vs_monai']:.1e} | "
          f"{d['stitching_only']:.1e} | {d['stitching_our_map']:.1e} | "
          f"{d['network_only']:.1e} | {d['onnx_vs_jax']:.1e} | {r['argmax_differs']:.1e} |")


def load_summary(loads: list) -> dict:
  return dict(start=loads[0], end=os.getloadavg()[0], median=float(np.median(loads)),
              min=min(loads), max=max(loads), samples=len(loads))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--settings", default=",".join(TRAIN_SETTINGS),
                 help=f"train settings, of {sorted(TRAIN_SETTINGS)}")
  p.add_argument("--volumes", default="64x64x32,96x96x64",
                 help="volumes D×H×W for sliding-window inference ('' for none)")
  p.add_argument("--convs", default="32:16:16,48:16:16,16:32:32",
                 help="single convolutions edge:C_in:C_out, forward, batch 2 ('' for none)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--block", type=int, default=2, help="train steps per side per round")
  p.add_argument("--infer_rounds", type=int, default=3, help="inference calls per side")
  p.add_argument("--overlap", type=float, default=0.5, help="evaluation.window_overlap")
  p.add_argument("--sigma", type=float, default=0.125, help="evaluation.gaussian_sigma")
  p.add_argument("--plan", default="",
                 help="a planned 3D config file: its U-Net, patch and evaluation batch for "
                      "the inference (default: the quickstart_3d setting)")
  p.add_argument("--torch_threads", type=int, default=0,
                 help="PyTorch's and ONNX Runtime's threads; 0 = the core count")
  p.add_argument("--json", action="store_true", help="also print one JSON line")
  args = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, REPO)
  import torch
  torch.set_num_threads(args.torch_threads or os.cpu_count())
  torch.manual_seed(0)
  loads = [os.getloadavg()[0]]
  result = dict(machine=machine(), date=time.strftime("%Y-%m-%d %H:%M %Z"), args=vars(args))
  print(json.dumps(result["machine"]))
  print(f"{result['date']}; load average at the start {loads[0]:.1f}; rounds {args.rounds} x {args.block} "
        f"train steps per side, {args.infer_rounds} inference calls per side")
  result["train"] = [train_setting(name, args, loads)
                     for name in args.settings.split(",") if name]
  if result["train"]:
    print_train(result["train"])
  shapes = [tuple(int(n) for n in v.split("x")) for v in args.volumes.split(",") if v]
  result["inference"], result["inference_network"] = [], None
  if shapes:
    result["inference_network"], result["inference"] = inference_part(shapes, args, loads)
    print_inference(result["inference"], result["inference_network"])
  result["network_max_abs_diff"] = (result["inference_network"]
                                    and result["inference_network"]["max_abs_diff"]["twin"])
  result["convs"] = [conv_forward(spec, 2, 7, loads) for spec in args.convs.split(",") if spec]
  if result["convs"]:
    print_convs(result["convs"])
  result["load_average"] = load_summary(loads)
  print("\nload average (1 min): start {start:.1f}, end {end:.1f}, median {median:.1f} "
        "({min:.1f}–{max:.1f}) over {samples} samples".format(**result["load_average"]))
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
