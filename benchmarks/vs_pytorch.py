"""medseg_jax's U-Net train step against the same U-Net in PyTorch and MONAI's BasicUNet.

    python benchmarks/vs_pytorch.py          # --size=128 --batch=8 --base_features=32 --depth=4

One process, one CPU device. The same architecture (medseg_jax/models/unet.py:
(3x3 conv + bias + ReLU) x 2 per level, 2x2 max-pool, channels doubling from
--base_features, 2x2 stride-2 transposed convolutions, skip concatenation, 1x1
head, 'same' padding, no norm), the same input, the same per-sample Dice +
cross-entropy loss and the same SGD with momentum 0.9 on every side. Frameworks
take turns in blocks of --block steps for --rounds rounds, so load from other work
on the machine hits them alike; the figures are medians over every timed step.
Needs the benchmark requirements (benchmarks/requirements.txt).
"""

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 2
LR, MOMENTUM = 1e-3, 0.9


# -- medseg_jax --------------------------------------------------------------
def jax_side(images: np.ndarray, labels: np.ndarray, depth: int, base: int):
  """(train step, predict step, parameter count) through medseg_jax's own build path."""
  sys.path.insert(0, REPO)
  import jax
  from medseg_jax import defaults
  from medseg_jax import optim
  from medseg_jax.training import losses, state as state_lib, step as step_lib
  from medseg_jax.models import build_model
  from medseg_jax.parallel import strategies

  cfg = defaults.get_config()
  cfg.model.update({"name": "unet", "depth": depth, "base_features": base})
  cfg.optim.update({"name": "sgd", "momentum": MOMENTUM})
  size = images.shape[1]
  par = strategies.make_parallel("shard_map", 1)
  model = build_model(cfg.model, NUM_CLASSES, size, par.bn_axis_name)
  tx = optim.make_optimizer(cfg, LR)
  state = par.put_state(state_lib.init_state(model, tx, jax.random.key(0), (size, size, 1)))
  params = sum(x.size for x in jax.tree.leaves(state.params))
  batch = par.put_batch({"image": images, "label": labels})
  step, predict = (par.train_step(functools.partial(step_lib.train_step,
                                                     loss_fn=losses.dice_ce_loss)),
                   par.predict_step(step_lib.predict_step))
  rng = jax.random.key(1)
  holder = {"state": state}

  def train_once():
    holder["state"], metrics = step(holder["state"], batch, rng)
    jax.block_until_ready(metrics)

  def infer_once():
    jax.block_until_ready(predict(holder["state"], batch["image"]))

  return train_once, infer_once, params


# -- PyTorch -----------------------------------------------------------------
def torch_unet(depth: int, base: int):
  """medseg_jax's U-Net, layer for layer, in plain PyTorch (NCHW)."""
  from torch import nn

  def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))

  class UNet(nn.Module):

    def __init__(self):
      super().__init__()
      widths = [base * 2**level for level in range(depth + 1)]
      self.down = nn.ModuleList(block(cin, cout) for cin, cout in zip([1] + widths, widths[:-1]))
      self.bottom = block(widths[-2], widths[-1])
      self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                               for i in reversed(range(depth)))
      self.up_blocks = nn.ModuleList(block(2 * widths[i], widths[i])
                                     for i in reversed(range(depth)))
      self.head = nn.Conv2d(base, NUM_CLASSES, 1)
      self.pool = nn.MaxPool2d(2)

    def forward(self, x):
      import torch
      skips = []
      for down in self.down:
        x = down(x)
        skips.append(x)
        x = self.pool(x)
      x = self.bottom(x)
      for up, blk, skip in zip(self.ups, self.up_blocks, reversed(skips)):
        x = blk(torch.cat([skip, up(x)], dim=1))
      return self.head(x)

  return UNet()


def monai_unet(base: int):
  """MONAI's BasicUNet set as close as it goes: ReLU, no norm, no dropout, deconv."""
  from monai.networks.nets import BasicUNet
  features = (base, 2 * base, 4 * base, 8 * base, 16 * base, base)
  return BasicUNet(spatial_dims=2, in_channels=1, out_channels=NUM_CLASSES, features=features,
                   act="relu", norm=None, dropout=0.0, upsample="deconv")


def torch_dice_ce(logits, labels):
  """medseg_jax.losses.dice_ce_loss in PyTorch, averaged over the batch: per-sample soft
  Dice (smooth 1, mean over classes) plus the mean cross-entropy over every pixel or voxel
  (logits [N,K,...spatial], labels [N,...spatial])."""
  import torch
  import torch.nn.functional as F
  axes = tuple(range(2, logits.ndim))
  probs = torch.softmax(logits, dim=1)
  onehot = torch.movedim(F.one_hot(labels, logits.shape[1]), -1, 1).to(probs.dtype)
  intersection = (probs * onehot).sum(axes)
  total = probs.sum(axes) + onehot.sum(axes)
  dice = 1.0 - ((2.0 * intersection + 1.0) / (total + 1.0)).mean(1)
  ce = F.cross_entropy(logits, labels, reduction="none").mean(tuple(a - 1 for a in axes))
  return (dice + ce).mean()


def torch_train_once(model, opt, x, y):
  """One PyTorch train step of `model` on (x, y) with Dice + CE and optimizer `opt`, as a
  function of no arguments that waits for its result."""
  def train_once():
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = torch_dice_ce(model(x), y)
    loss.backward()
    opt.step()
    loss.item()
  return train_once


def torch_side(model, images: np.ndarray, labels: np.ndarray):
  """(train step, predict step, parameter count) for a PyTorch model."""
  import torch
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  y = torch.from_numpy(labels.astype(np.int64))
  opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  params = sum(p.numel() for p in model.parameters())

  train_once = torch_train_once(model, opt, x, y)

  def infer_once():
    model.eval()
    with torch.inference_mode():
      torch.softmax(model(x), dim=1)

  return train_once, infer_once, params


# -- where medseg_jax's time goes ---------------------------------------------
def profile(fn, steps: int = 3) -> list[tuple[str, float]]:
  """(XLA op kind, share of op time) over `steps` calls of `fn`, from a jax profiler
  trace; op names lose their numeric suffixes (fusion.12 -> fusion)."""
  import collections
  import glob
  import re
  import tempfile
  import jax
  from jax.profiler import ProfileData
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(steps):
      fn()
    jax.profiler.stop_trace()
    data = ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
  kinds = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        # Python frames ($file:line), the executor's spans and pool waits contain the ops.
        if not event.name.startswith("$") and not any(
            word in event.name for word in ("Execute", "Await")):
          kinds[re.sub(r"[.\d]+$", "", event.name)] += event.duration_ns
  total = sum(kinds.values())
  return [(kind, ns / total) for kind, ns in kinds.most_common(8)]


# -- timing ------------------------------------------------------------------
def interleave(sides: dict, kind: int, rounds: int, block: int) -> dict[str, list[float]]:
  """Runs each side's function `kind` (0 train, 1 infer) in alternating blocks."""
  times = {name: [] for name in sides}
  for name, fns in sides.items():  # warm-up: compilation, allocator, thread pools
    for _ in range(2):
      fns[kind]()
  for _ in range(rounds):
    for name, fns in sides.items():
      for _ in range(block):
        start = time.perf_counter()
        fns[kind]()
        times[name].append(time.perf_counter() - start)
  return times


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--base_features", type=int, default=32)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--block", type=int, default=3, help="steps per framework per round")
  p.add_argument("--torch_threads", type=int, default=0, help="0 = the core count")
  p.add_argument("--no_monai", action="store_true")
  p.add_argument("--profile", action="store_true",
                 help="also print where medseg_jax's train step spends its time")
  p.add_argument("--json", action="store_true", help="also print one JSON line")
  args = p.parse_args()

  import torch
  threads = args.torch_threads or os.cpu_count()
  torch.set_num_threads(threads)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, args.size, args.size, 1)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, (args.batch, args.size, args.size)).astype(np.int32)
  torch.manual_seed(0)
  sides = {"medseg_jax": jax_side(images, labels, args.depth, args.base_features),
           "pytorch": torch_side(torch_unet(args.depth, args.base_features), images, labels)}
  if not args.no_monai and args.depth == 4:  # BasicUNet has four pooling levels, fixed
    sides["monai"] = torch_side(monai_unet(args.base_features), images, labels)
  params = {name: fns[2] for name, fns in sides.items()}
  print(f"U-Net depth {args.depth}, base {args.base_features}, {args.size}x{args.size}x1, "
        f"batch {args.batch}, {NUM_CLASSES} classes, Dice+CE, SGD momentum {MOMENTUM}; "
        f"torch {torch.__version__} with {threads} threads ({os.cpu_count()} cores), "
        "jax on 1 CPU device")
  print("parameters: " + ", ".join(f"{n} {c:,}" for n, c in params.items()))
  if params["medseg_jax"] != params["pytorch"]:
    sys.exit(f"error: parameter counts differ: {params}")

  result = {"size": args.size, "batch": args.batch, "base_features": args.base_features,
            "depth": args.depth, "torch_threads": threads, "torch": torch.__version__,
            "params": params, "rounds": args.rounds, "block": args.block}
  for kind, label in ((0, "train"), (1, "infer")):
    times = interleave(sides, kind, args.rounds, args.block)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    result[label] = {name: {"median_s": m, "slices_per_s": args.batch / m,
                            "steps": len(times[name])} for name, m in medians.items()}
    result[label]["ratio_jax_over_pytorch"] = medians["medseg_jax"] / medians["pytorch"]
    print(f"\n{label}: {'framework':10} {'median s':>9} {'slices/s':>9}")
    for name, m in medians.items():
      print(f"{'':7}{name:10} {m:9.4f} {args.batch / m:9.2f}")
    print(f"{'':7}step time medseg_jax / PyTorch = {result[label]['ratio_jax_over_pytorch']:.3f}"
          " (below 1: medseg_jax faster)")
  if args.profile:
    result["jax_train_profile"] = profile(sides["medseg_jax"][0])
    print("\nmedseg_jax train step, share of XLA op time by op kind:")
    for kind, share in result["jax_train_profile"]:
      print(f"  {share:6.1%}  {kind}")
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
