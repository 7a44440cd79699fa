"""medseg_jax's 3D U-Net against MONAI in PyTorch: the train step, and sliding-window
inference of one volume.

    python3 benchmarks/vs_monai3d.py --json     # quickstart_3d's shape, then patch 48³ base 16

One process; JAX on one CPU device, PyTorch with one thread per core. Networks of the
same shape (configs/quickstart_3d.py: depth 3, instance norm, 2 classes; patch, batch and
base features per setting):
- medseg_jax: `UNet3D` through the project's build path (shard_map on 1 device, Adam of
  `optim.make_optimizer`, `losses.dice_ce_loss`); medseg_jax_xla: the same step with
  XLA's own kernel gradient in every convolution (`conv3d_cpu`'s rule switched off);
- pytorch: the same network layer for layer in PyTorch (`twin`);
- monai: `monai.networks.nets.DynUNet` set as close as it goes (kernel 3, instance norm
  with affine, leaky ReLU 0.01, two convolutions per level, transposed-convolution
  upsampling); it downsamples by a stride-2 first convolution, not a max-pool, and its
  convolutions have no bias.
Train step: forward, backward and Adam (lr 2e-3, optax's and torch's defaults are equal)
on the same random patches and labels, loss Dice + cross-entropy per sample as
`losses.dice_ce_loss`. Inference of a synthetic volume: `evaluation.sliding_window`
around the JAX predict step (`predict.mesh_run`) against
`monai.inferers.sliding_window_inference` around the twin with the JAX weights copied,
the same window, overlap, Gaussian (MONAI's sigma_scale = our gaussian_sigma) and windows
per batch; also our `sliding_window` around the twin, which separates the stitching from
the network, and the largest differences between the probability volumes (MONAI once more
with our importance map: both floor the Gaussian at 1e-3, ours after scaling it to a
maximum of 1, MONAI unscaled, its maximum below 1 for an even patch). Last, single 3x3x3
convolutions forward (`--convs`), XLA's against PyTorch's. Sides take turns in blocks
(`--block` calls per side per round), so a change of the shared machine's load falls on
every side alike; figures are medians.
Needs the benchmark requirements (benchmarks/requirements.txt).
"""

import argparse
import functools
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_pytorch import torch_dice_ce, torch_train_once  # noqa: E402  (benchmarks/)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 2
LR = 2e-3  # configs/quickstart_3d.py: adam, optim.lr
NEGATIVE_SLOPE = 0.01  # models/unet3d.py
FLAX_EPS = 1e-6  # nn.InstanceNorm's epsilon
TRAIN_SETTINGS = {"quickstart_3d": dict(patch=32, batch=2, base=8, depth=3),
                  "p48_b16": dict(patch=48, batch=2, base=16, depth=3)}


# -- the networks in PyTorch ------------------------------------------------------
def twin(depth: int, base: int, num_classes: int = NUM_CLASSES, channels: int = 1):
  """medseg_jax's UNet3D layer for layer in PyTorch (NCDHW), random weights."""
  from torch import nn

  def block(cin, cout):
    layers = []
    for c in (cin, cout):
      layers += [nn.Conv3d(c, cout, 3, padding=1),
                 nn.InstanceNorm3d(cout, eps=FLAX_EPS, affine=True),
                 nn.LeakyReLU(NEGATIVE_SLOPE)]
    return nn.Sequential(*layers)

  class UNet3D(nn.Module):

    def __init__(self):
      super().__init__()
      widths = [base * 2**level for level in range(depth + 1)]
      self.blocks = nn.ModuleList(  # encoder, bottom, decoder: ConvBlock3D_0, _1, ...
          [block(cin, cout) for cin, cout in zip([channels] + widths, widths)]
          + [block(2 * widths[i], widths[i]) for i in reversed(range(depth))])
      self.ups = nn.ModuleList(nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2)
                               for i in reversed(range(depth)))  # ConvTranspose_0 deepest
      self.head = nn.Conv3d(base, num_classes, 1)
      self.pool = nn.MaxPool3d(2)

    def forward(self, x):
      import torch
      skips = []
      for blk in self.blocks[:depth]:
        x = blk(x)
        skips.append(x)
        x = self.pool(x)
      x = self.blocks[depth](x)
      for up, blk, skip in zip(self.ups, self.blocks[depth + 1:], reversed(skips)):
        x = blk(torch.cat([skip, up(x)], dim=1))
      return self.head(x)

  return UNet3D()


def copy_weights(model, params: dict) -> None:
  """Sets the twin's weights to those of UNet3D's Flax `params`."""
  import torch
  as_tensor = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable copy
  def conv(layer, p, transposed=False):
    kernel = np.asarray(p["kernel"])
    if transposed:  # the up-convolution applies kernel[1 - i]; torch's flips it back
      kernel = kernel[::-1, ::-1, ::-1].transpose(3, 4, 0, 1, 2)
    else:
      kernel = kernel.transpose(4, 3, 0, 1, 2)
    layer.weight.data, layer.bias.data = as_tensor(kernel), as_tensor(p["bias"])
  for i, blk in enumerate(model.blocks):
    p = params[f"ConvBlock3D_{i}"]
    for j in range(2):
      conv(blk[3 * j], p[f"Conv_{j}"])
      norm = p[f"InstanceNorm_{j}"]
      blk[3 * j + 1].weight.data = as_tensor(norm["scale"])
      blk[3 * j + 1].bias.data = as_tensor(norm["bias"])
  for i, up in enumerate(model.ups):
    conv(up, params[f"ConvTranspose_{i}"], transposed=True)
  conv(model.head, params["Conv_0"])


def dynunet(depth: int, base: int):
  """MONAI's DynUNet as close to UNet3D as it goes (nnU-Net's blocks)."""
  from monai.networks.nets import DynUNet
  return DynUNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES,
                 kernel_size=[3] * (depth + 1), strides=[1] + [2] * depth,
                 upsample_kernel_size=[2] * depth,
                 filters=[base * 2**level for level in range(depth + 1)],
                 norm_name=("INSTANCE", {"affine": True}),
                 act_name=("leakyrelu", {"inplace": True, "negative_slope": NEGATIVE_SLOPE}),
                 res_block=False, deep_supervision=False)


def to_torch(images: np.ndarray):
  """[N,D,H,W,C] numpy -> [N,C,D,H,W] tensor."""
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, 1)))


def torch_probabilities(model):
  """windows [N,d,h,w,C] numpy -> softmax probabilities [N,d,h,w,K] numpy."""
  import torch
  def run(windows: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
      return np.moveaxis(torch.softmax(model(to_torch(windows)), dim=1).numpy(), 1, -1)
  return run


def torch_side(model, images: np.ndarray, labels: np.ndarray) -> dict:
  """A PyTorch network's train step (Adam, as the config's optimizer) and parameter count."""
  import torch
  x, y = to_torch(images), torch.from_numpy(labels.astype(np.int64))
  opt = torch.optim.Adam(model.parameters(), lr=LR)
  return dict(fn=torch_train_once(model, opt, x, y),
              count=sum(p.numel() for p in model.parameters()))


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
  cfg.model.update({"depth": s["depth"], "base_features": s["base"]})
  par = strategies.make_parallel("shard_map", 1)
  model = build_model(cfg.model, NUM_CLASSES, s["patch"], par.bn_axis_name)
  state = state_lib.init_state(model, optim.make_optimizer(cfg, LR), jax.random.key(0),
                               (s["patch"],) * 3 + (1,))
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
  the Flax params, as numpy)."""
  import jax
  from medseg_jax.evaluation import predict
  from medseg_jax.training import step as step_lib
  par, state = jax_build(s)
  params = jax.tree.map(np.asarray, state.params)
  run = predict.mesh_run(par, par.predict_step(step_lib.predict_step), par.put_state(state),
                         s["batch"])
  return run, params


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
  sides = {"medseg_jax": jax_train(s, images, labels),
           "medseg_jax_xla": jax_train(s, images, labels, shifted=False),
           "pytorch": torch_side(twin(s["depth"], s["base"]), images, labels),
           "monai": torch_side(dynunet(s["depth"], s["base"]), images, labels)}
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


def monai_run(model, volume: np.ndarray, s: dict, args, weight_map=None):
  """() -> MONAI's sliding_window_inference of `volume` around `model`: probabilities
  [D,H,W,K] numpy; its own Gaussian map unless `weight_map` [d,h,w] is given."""
  import torch
  from monai.inferers import sliding_window_inference
  x = to_torch(volume[None])
  roi_map = None if weight_map is None else torch.from_numpy(weight_map.astype(np.float32))
  def predictor(windows):
    return torch.softmax(model(windows), dim=1)
  def call():
    with torch.inference_mode():
      out = sliding_window_inference(x, (s["patch"],) * 3, s["batch"], predictor,
                                     overlap=args.overlap, mode="gaussian",
                                     sigma_scale=args.sigma, padding_mode="constant", cval=0.0,
                                     roi_weight_map=roi_map)
    return np.moveaxis(out[0].numpy(), 0, -1)
  return call


def predictors(s: dict) -> tuple:
  """(JAX run, the PyTorch twin with the same weights, its run), each run once on a batch
  of windows (JAX compiles there); and the two runs' max abs difference on that batch."""
  run_jax, params = jax_predictor(s)
  model = twin(s["depth"], s["base"])
  copy_weights(model, params)
  model.eval()
  run_torch = torch_probabilities(model)
  windows = np.random.default_rng(1).normal(
      size=(s["batch"],) + (s["patch"],) * 3 + (1,)).astype(np.float32)
  return run_jax, model, run_torch, float(np.abs(run_jax(windows) - run_torch(windows)).max())


def inference(shape: tuple, nets: tuple, args, loads: list) -> dict:
  """One volume by sliding windows: ours around JAX, MONAI's around the twin (the JAX
  weights copied), ours around the twin; times and the differences of the results."""
  from medseg_jax.evaluation import sliding_window
  s = TRAIN_SETTINGS["quickstart_3d"]
  run_jax, model, run_torch, _ = nets
  windows = sliding_window.Windows(patch=(s["patch"],) * 3, overlap=args.overlap,
                                   gaussian_sigma=args.sigma, batch=s["batch"])
  volume = phantom(shape)
  calls = {"medseg_jax": lambda: windows.apply(volume, run_jax),
           "monai": monai_run(model, volume, s, args),
           "ours_on_twin": lambda: windows.apply(volume, run_torch)}
  out = {}
  fns = {name: (lambda name=name, fn=fn: out.__setitem__(name, fn())) for name, fn in
         calls.items()}
  medians = interleave(fns, args.infer_rounds, 1, loads, warmup=False)
  # MONAI with our importance map (untimed): what is left is float32 against float64 sums.
  out["monai_our_map"] = monai_run(model, volume, s, args, sliding_window.gaussian_map(
      (s["patch"],) * 3, args.sigma))()
  differ = lambda a, b: float(np.abs(out[a] - out[b]).max())
  return dict(volume=list(shape), **s, overlap=args.overlap, sigma=args.sigma,
              windows=len(sliding_window.window_corners(shape, (s["patch"],) * 3,
                                                        args.overlap)),
              median_s={name: m[0] for name, m in medians.items()},
              median_cpu_s={name: m[1] for name, m in medians.items()},
              calls=args.infer_rounds,
              max_abs_diff={"jax_vs_monai": differ("medseg_jax", "monai"),
                            "stitching_only": differ("ours_on_twin", "monai"),
                            "stitching_our_map": differ("ours_on_twin", "monai_our_map"),
                            "network_only": differ("medseg_jax", "ours_on_twin")},
              argmax_differs=float(np.mean(out["medseg_jax"].argmax(-1)
                                           != out["monai"].argmax(-1))))


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
              torch_threads=torch.get_num_threads(), jax_devices=str(jax.devices()))


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


def print_inference(rows: list[dict], network_diff: float) -> None:
  print("\nSliding-window inference of one volume, median wall s (process CPU s):")
  print("| volume | windows (batch) | ours + JAX | MONAI + PyTorch twin "
        "| ours + PyTorch twin | ours + JAX / MONAI + twin |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    m = r["median_s"]
    print(f"| {'×'.join(map(str, r['volume']))} | {r['windows']} ({r['batch']}) | "
          + " | ".join(_both(r, side) for side in ("medseg_jax", "monai", "ours_on_twin"))
          + f" | {m['medseg_jax'] / m['monai']:.2f} |")
  print(f"\nNetwork, JAX against the twin on one batch of windows: max abs diff "
        f"{network_diff:.1e}. Probability volumes:")
  print("| volume | max abs diff: ours + JAX vs MONAI + twin | ours vs MONAI, both on the "
        "twin | the same, MONAI given our map | ours on JAX vs on the twin "
        "| voxels whose argmax differs (JAX vs MONAI) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    d = r["max_abs_diff"]
    print(f"| {'×'.join(map(str, r['volume']))} | {d['jax_vs_monai']:.1e} | "
          f"{d['stitching_only']:.1e} | {d['stitching_our_map']:.1e} | "
          f"{d['network_only']:.1e} | {r['argmax_differs']:.1e} |")


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
  p.add_argument("--torch_threads", type=int, default=0, help="0 = the core count")
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
  nets = predictors(TRAIN_SETTINGS["quickstart_3d"]) if shapes else None
  result["inference"] = [inference(shape, nets, args, loads) for shape in shapes]
  result["network_max_abs_diff"] = nets and nets[3]
  if shapes:
    print_inference(result["inference"], result["network_max_abs_diff"])
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
