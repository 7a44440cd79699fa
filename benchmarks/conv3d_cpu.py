"""The 3D U-Net train step on XLA's CPU backend, and its 3x3x3 convolutions part by part.

    python3 benchmarks/conv3d_cpu.py                      # patch 32^3, base 16, depth 3, batch 2
    python3 benchmarks/conv3d_cpu.py --patch=48 --base=8

For every distinct 3x3x3 convolution shape of the network (and how often it occurs), the
median time of its forward pass, input gradient and kernel gradient as XLA computes them,
and of the kernel gradient as matrix products over shifted inputs
(`medseg_jax.models.conv3d_cpu.kernel_gradient`); then the whole train step (forward,
backward, SGD update) with XLA's kernel gradients everywhere ("xla") and with the shifted
one where `conv3d_cpu.use_shifted` takes it ("auto"), and its forward pass and loss alone
("forward only"). One CPU device, float32, jit,
medians of --repeats runs after one warm-up, the variants compared timed in alternation
(the machine may be shared).
"""

import argparse
import functools
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Which 3x3x3 convolutions of the step take the shifted kernel gradient, as
# conv3d_cpu.MAX_VOXELS: none, or those conv3d_cpu's rule takes.
RULES = {"xla": 0, "auto": None}


def alternating_medians(calls: dict, repeats: int) -> dict:
  """name -> median wall time of the compiled `fn(*args)` in `calls` (name -> (fn, args)),
  each called once to compile, then called in turn `repeats` times, so that a change of
  the shared machine's load falls on every call alike."""
  import jax
  import numpy as np
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def conv_shapes(patch: int, base: int, depth: int, channels: int) -> dict:
  """(edge, C_in, C_out) -> count, for every 3x3x3 convolution of UNet3D on batch patches."""
  shapes, c = {}, channels
  def add(edge, cin, cout):
    shapes[(edge, cin, cout)] = shapes.get((edge, cin, cout), 0) + 1
  for level in range(depth + 1):
    out = base * 2**level
    add(patch // 2**level, c, out)
    add(patch // 2**level, out, out)
    c = out
  for level in reversed(range(depth)):
    out = base * 2**level
    add(patch // 2**level, 2 * out, out)
    add(patch // 2**level, out, out)
  return shapes


def measure_convs(args) -> list[dict]:
  """Forward, input gradient and kernel gradient (XLA's and shifted) per conv shape."""
  import jax
  import numpy as np
  from medseg_jax.models import conv3d_cpu
  conv = jax.jit(conv3d_cpu._xla_conv)  # pylint: disable=protected-access
  input_grad = jax.jit(lambda x, k, g: jax.vjp(lambda v: conv3d_cpu._xla_conv(v, k), x)[1](g))  # pylint: disable=protected-access
  kernel_grad = jax.jit(lambda x, k, g: jax.vjp(lambda w: conv3d_cpu._xla_conv(x, w), k)[1](g))  # pylint: disable=protected-access
  shifted = jax.jit(conv3d_cpu.kernel_gradient)
  rng = np.random.default_rng(0)
  rows = []
  for (edge, cin, cout), count in conv_shapes(args.patch, args.base, args.depth, 1).items():
    x = rng.normal(size=(args.batch, edge, edge, edge, cin)).astype(np.float32)
    k = rng.normal(size=(3, 3, 3, cin, cout)).astype(np.float32)
    g = rng.normal(size=(args.batch, edge, edge, edge, cout)).astype(np.float32)
    calls = dict(forward=(conv, (x, k)), input_grad=(input_grad, (x, k, g)),
                 kernel_grad=(kernel_grad, (x, k, g)), shifted=(shifted, (x, g)))
    rows.append(dict(edge=edge, cin=cin, cout=cout, count=count,
                     used=conv3d_cpu.use_shifted(x.shape, k.shape),
                     **alternating_medians(calls, args.repeats)))
  return rows


def step_inputs(args) -> tuple:
  """(train state of UNet3D with SGD, a batch of random patches and binary labels)."""
  import jax
  import numpy as np
  import optax
  from medseg_jax.models import unet3d
  from medseg_jax.training import state as state_lib
  model = unet3d.UNet3D(num_classes=2, depth=args.depth, base_features=args.base,
                        norm="instance")
  shape = (args.patch,) * 3 + (1,)
  state = state_lib.init_state(model, optax.sgd(1e-2, momentum=0.9), jax.random.key(0), shape)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(args.batch,) + shape).astype(np.float32),
           "label": rng.integers(0, 2, (args.batch,) + shape[:3]).astype(np.uint8)}
  return state, batch


def forward_only(args):
  """(compiled loss of the train step without its gradients, its arguments)."""
  import jax
  import jax.numpy as jnp
  from medseg_jax.training import losses
  def loss(state, batch):
    logits = state.apply_fn({"params": state.params}, batch["image"], train=True)
    return jnp.mean(losses.dice_ce_loss(logits, batch["label"].astype(jnp.int32)))
  state, batch = step_inputs(args)
  return jax.jit(loss).lower(state, batch).compile(), (state, batch)


def build_step(args, rule: str):
  """(compiled train step, its arguments, compile s) of UNet3D under one of RULES."""
  import jax
  from medseg_jax.models import conv3d_cpu
  from medseg_jax.training import losses, step
  state, batch = step_inputs(args)
  fn = jax.jit(functools.partial(step.train_step, loss_fn=losses.dice_ce_loss,
                                 reduce_mean=lambda v: v))
  measured_rule = conv3d_cpu.MAX_VOXELS
  # The rule is read while tracing: trace the "xla" step with it switched off.
  conv3d_cpu.MAX_VOXELS = measured_rule if RULES[rule] is None else RULES[rule]
  try:
    start = time.perf_counter()
    compiled = fn.lower(state, batch, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - start
  finally:
    conv3d_cpu.MAX_VOXELS = measured_rule
  return compiled, (state, batch, jax.random.key(1)), compile_s


def measure_steps(args) -> dict:
  """rule -> (compile s, median step s), and 'forward only' -> (None, median s), timed in
  alternation."""
  built = {rule: build_step(args, rule) for rule in RULES}
  calls = {rule: b[:2] for rule, b in built.items()}
  calls["forward only"] = forward_only(args)
  medians = alternating_medians(calls, args.repeats)
  return {name: (built[name][2] if name in built else None, medians[name]) for name in calls}


def print_tables(args, rows: list[dict], steps: dict) -> None:
  print(f"load average {os.getloadavg()[0]:.1f}; patch {args.patch}^3, base {args.base}, "
        f"depth {args.depth}, batch {args.batch}, float32, medians of {args.repeats}")
  print("| edge | C_in→C_out | × | forward s | input grad s | kernel grad s (XLA) "
        "| kernel grad s (shifted) | shifted used |")
  print("|---|---|---|---|---|---|---|---|")
  totals = dict(forward=0.0, input_grad=0.0, kernel_grad=0.0, shifted=0.0)
  for r in rows:
    print(f"| {r['edge']}³ | {r['cin']}→{r['cout']} | {r['count']} | {r['forward']:.4f} | "
          f"{r['input_grad']:.4f} | {r['kernel_grad']:.4f} | {r['shifted']:.4f} | "
          f"{'yes' if r['used'] else 'no'} |")
    for key in totals:
      totals[key] += r["count"] * r[key]
  print(f"| all | | | {totals['forward']:.3f} | {totals['input_grad']:.3f} | "
        f"{totals['kernel_grad']:.3f} | {totals['shifted']:.3f} | |")
  print()
  print("| train step, kernel gradient | compile s | median s |")
  print("|---|---|---|")
  for rule, (compile_s, step_s) in steps.items():
    compiled = "" if compile_s is None else f"{compile_s:.2f}"
    print(f"| {rule} | {compiled} | {step_s:.3f} |")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--patch", type=int, default=32)
  p.add_argument("--base", type=int, default=16)
  p.add_argument("--depth", type=int, default=3)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, REPO)
  print_tables(args, measure_convs(args), measure_steps(args))


if __name__ == "__main__":
  main()
