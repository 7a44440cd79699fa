"""One command for a machine with one NVIDIA GPU: train steps against PyTorch and MONAI,
sliding-window inference against MONAI's, the memory fit and the plan, on that GPU.

    python3 benchmarks/gpu_suite.py          # --out=benchmarks/results/gpu_suite/

Needs CUDA jax and a CUDA PyTorch and MONAI (and benchmarks/requirements.txt). Without a GPU
(JAX sees no "gpu"/"cuda" device, or torch.cuda.is_available() is False) it prints one line
and exits 0, writing nothing. Otherwise it writes OUT/<UTC date-time>.json and .md (one
Markdown table per kind of figure), rewritten after every part. The parts, in order:
- machine: the GPU, driver, CUDA and cuDNN versions as JAX and PyTorch report them.
- train_2d, train_3d: the project's train step (shard_map on one device) against the same
  network in PyTorch with the same initial weights (torch_twins.unet; torch_twins.unet3d)
  and MONAI's (vs_pytorch.monai_unet's BasicUNet; torch_twins.dynunet3d's DynUNet): in 2D
  vs_pytorch.py's U-Net and SGD at 256², in 3D configs/quickstart_3d.py's network and Adam
  at vs_monai3d.py's quickstart_3d setting and at 96³, base 32, depth 4. Each in float32
  and in bfloat16 compute (`model.compute_dtype`, parameters float32; PyTorch under
  `torch.autocast(dtype=torch.bfloat16)`).
- inference_3d: vs_monai3d.py's inference setting: `evaluation.sliding_window` around the
  predict step against `monai.inferers.sliding_window_inference` around the twin (the
  volume on the GPU) and our stitching around the twin; the largest differences.
- plan: `python -m medseg_jax.plan --budget=5m` of plan_budget.py's synthetic phantoms:
  the planned example, batch, width and steps, and what planning took.
- memory_fit: planning/memory.py's `largest_batch` of `step_peak` within `device_budget()`
  for configs/quickstart.py and configs/quickstart_3d.py, float32 and bfloat16 compute.
Each part runs in its own process group (a fresh GPU; a crash costs that part only) under
a time limit (PARTS) within `--deadline_s`: a part that fails or runs out of time records
its error and the rows it finished, and the suite goes on. Sides take turns
(vs_monai3d.interleave) after a warm-up call each; figures are medians of wall time. The
train and inference parts share the GPU between JAX and PyTorch, so they run with
XLA_PYTHON_CLIENT_PREALLOCATE=false; the plan and the memory fit see JAX's default pool, as
training does. PyTorch runs with cuDNN's autotuner on (XLA tunes its convolutions while
compiling); TF32 is each library's default, recorded under machine.

`--device=cpu --tiny` is a smoke mode: the same code paths on a CPU, with tiny shapes and
one timed call per side, to check them without a GPU; its figures mean nothing.
"""

import argparse
import functools
import json
import os
import platform
import re
import runpy
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]
import memory_fit  # noqa: E402  (benchmarks/)
import plan_budget  # noqa: E402
import torch_twins  # noqa: E402
import vs_monai3d  # noqa: E402
import vs_pytorch  # noqa: E402

DTYPES = ("float32", "bfloat16")
NUM_CLASSES = 2
GIB = 2**30
SETTINGS = {  # part -> {"gpu": ..., "tiny": ...}
    "train_2d": {"gpu": {"u256": dict(size=256, batch=16, base=32, depth=4)},
                 "tiny": {"tiny": dict(size=32, batch=2, base=4, depth=4)}},
    "train_3d": {"gpu": {"quickstart_3d": vs_monai3d.TRAIN_SETTINGS["quickstart_3d"],
                         "p96_b32": dict(patch=96, batch=2, base=32, depth=4)},
                 "tiny": {"tiny": dict(patch=16, batch=1, base=4, depth=2)}},
    "inference_3d": {"gpu": dict(net=vs_monai3d.TRAIN_SETTINGS["quickstart_3d"],
                                 volumes=((64, 64, 32), (96, 96, 64))),
                     "tiny": dict(net=dict(patch=16, batch=2, base=4, depth=2),
                                  volumes=((24, 24, 20),))},
    "plan": {"gpu": dict(num_training=24, **plan_budget.DATASETS["mri"]),
             "tiny": dict(num_training=4, shape=(32, 32, 16))},
    "memory_fit": {"gpu": dict(memory_gib=0, overrides={}),  # 0: the device's own budget
                   "tiny": dict(memory_gib=0.004, overrides={
                       "data.image_size": 32, "model.depth": 2, "model.base_features": 4,
                       "data.patch_size": (8, 8, 8)})},
}
OVERLAP, SIGMA = 0.5, 0.125  # vs_monai3d.py's defaults: evaluation.window_overlap, gaussian_sigma


# -- no GPU, nothing to do ------------------------------------------------------------
def missing_gpu() -> str:
  """'' when JAX and PyTorch both see a GPU, else what they see. Imports torch only once
  JAX has found a GPU, so the answer on a machine without one is quick."""
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this process only looks
  import jax
  platforms = sorted({d.platform for d in jax.devices()})
  if not {"gpu", "cuda"} & set(platforms):
    return f"JAX sees {', '.join(platforms)}"
  import torch
  if not torch.cuda.is_available():
    return f"JAX sees {', '.join(platforms)}, torch {torch.__version__} no CUDA device"
  return ""


# -- machine ----------------------------------------------------------------------------
def machine(args) -> Iterator[dict]:
  """vs_monai3d.machine() and the GPU: its name, driver, CUDA and cuDNN versions."""
  import jax
  import torch
  facts = vs_monai3d.machine()
  device = jax.devices()[0]
  cuda = args.device == "cuda"
  facts.update(
      jax_device=device.device_kind, jax_platform=device.platform,
      jax_compute_capability=getattr(device, "compute_capability", None),
      jax_memory_gib=((device.memory_stats() or {}).get("bytes_limit", 0) / GIB) or None,
      jax_cuda=jax_cuda_versions(), jax_matmul_precision=str(
          jax.config.jax_default_matmul_precision),
      jax_environment=jax.print_environment_info(return_string=True),
      torch_cuda=torch.version.cuda, torch_cudnn=torch.backends.cudnn.version(),
      torch_device=torch.cuda.get_device_name(0) if cuda else "cpu",
      torch_tf32=dict(cudnn=torch.backends.cudnn.allow_tf32,
                      matmul=torch.backends.cuda.matmul.allow_tf32),
      nvidia_smi=nvidia_smi(), platform=platform.platform())
  yield facts


def jax_cuda_versions() -> dict:
  """The versions jaxlib's CUDA plugin reports of CUDA, cuDNN and the driver, {} without
  the plugin (jax._src.lib.cuda_versions: no public API gives them)."""
  from jax._src.lib import cuda_versions
  found = {}
  for name in dir(cuda_versions) if cuda_versions else ():
    if name.endswith("_version") and not name.startswith("_"):
      try:
        found[name] = getattr(cuda_versions, name)()
      except Exception as e:  # pylint: disable=broad-except
        found[name] = f"{type(e).__name__}: {e}"
  return found


def nvidia_smi() -> str:
  command = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"]
  try:
    return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"unavailable: {e}"


# -- train steps -------------------------------------------------------------------------
def jax_config(dims: int, s: dict, dtype: str):
  """vs_pytorch.py's U-Net and SGD (2D) or configs/quickstart_3d.py's network and Adam (3D),
  of setting `s`, computing in `dtype`."""
  from configs import quickstart_3d
  from medseg_jax import defaults
  if dims == 2:
    cfg = defaults.get_config()
    cfg.model.update({"name": "unet", "depth": s["depth"], "base_features": s["base"]})
    cfg.optim.update({"name": "sgd", "momentum": vs_pytorch.MOMENTUM})
  else:
    cfg = quickstart_3d.get_config()
    cfg.model.update({"depth": s["depth"], "base_features": s["base"]})
  cfg.model.compute_dtype = dtype
  return cfg


def jax_train(cfg, images: np.ndarray, labels: np.ndarray, lr: float) -> dict:
  """The project's train step of `cfg`, compiled ahead: a call that waits for its result,
  the compile time, parameter count and the initial parameters (numpy)."""
  import jax
  from medseg_jax import optim
  from medseg_jax.models import build_model
  from medseg_jax.parallel import strategies
  from medseg_jax.training import losses, state as state_lib, step as step_lib
  par = strategies.make_parallel("shard_map", 1)
  model = build_model(cfg.model, NUM_CLASSES, images.shape[1], par.bn_axis_name)
  state = state_lib.init_state(model, optim.make_optimizer(cfg, lr), jax.random.key(0),
                               images.shape[1:])
  params = jax.tree.map(np.asarray, state.params)
  state, batch = par.put_state(state), par.put_batch({"image": images, "label": labels})
  step = par.train_step(functools.partial(step_lib.train_step, loss_fn=losses.dice_ce_loss))
  rng = jax.random.key(1)
  start = time.perf_counter()
  compiled = step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def train_once():
    holder["state"], metrics = compiled(holder["state"], batch, rng)
    jax.block_until_ready(metrics)
  return dict(fn=train_once, compile_s=compile_s, params=params,
              count=sum(x.size for x in jax.tree.leaves(params)))


def torch_train(model, optimizer, images: np.ndarray, labels: np.ndarray, device: str,
                bf16: bool) -> dict:
  """vs_pytorch.torch_train_once of `model` on `device`, under bfloat16 autocast if `bf16`."""
  import torch
  model.to(device)
  x = vs_monai3d.to_torch(images).to(device)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  once = vs_pytorch.torch_train_once(model, optimizer(model.parameters()), x, y)

  def train_once():
    # Autocast changes only the forward ops on its lists; the backward runs each op in its
    # forward's dtype and the optimizer's ops are on no list: the same as autocasting the
    # forward pass and loss alone.
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
      once()
  return dict(fn=train_once, count=sum(p.numel() for p in model.parameters()))


def torch_nets(dims: int, s: dict, params: dict, lr: float) -> tuple:
  """(the twin with `params`, MONAI's network or None, an optimizer of parameters)."""
  import torch
  torch.manual_seed(0)
  if dims == 2:
    twin = torch_twins.unet(params, s["depth"], s["base"], NUM_CLASSES)
    monai = vs_pytorch.monai_unet(s["base"]) if s["depth"] == 4 else None  # 4 levels, fixed
    return twin, monai, lambda p: torch.optim.SGD(p, lr=lr, momentum=vs_pytorch.MOMENTUM)
  twin = torch_twins.unet3d(s["depth"], s["base"])
  torch_twins.copy_unet3d_weights(twin, params)
  monai = torch_twins.dynunet3d(s["depth"], s["base"])
  return twin, monai, lambda p: torch.optim.Adam(p, lr=lr)


def train_row(dims: int, name: str, s: dict, dtype: str, args) -> dict:
  """One setting in one compute dtype: medseg_jax, the twin and MONAI, timed in turns."""
  rng = np.random.default_rng(0)
  shape = (s["batch"],) + ((s["size"],) * 2 if dims == 2 else (s["patch"],) * 3)
  images = rng.normal(size=shape + (1,)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, shape).astype(np.int32)
  lr = vs_pytorch.LR if dims == 2 else vs_monai3d.LR
  ours = jax_train(jax_config(dims, s, dtype), images, labels, lr)
  twin, monai, optimizer = torch_nets(dims, s, ours["params"], lr)
  torch_side = functools.partial(torch_train, optimizer=optimizer, images=images,
                                 labels=labels, device=args.device, bf16=dtype == "bfloat16")
  sides = {"medseg_jax": ours, "pytorch": torch_side(twin)}
  if sides["pytorch"]["count"] != ours["count"]:  # copying weights checks no shapes
    raise RuntimeError(f"{name}: the twin has {sides['pytorch']['count']} parameters, "
                       f"medseg_jax {ours['count']}")
  if monai is not None:
    sides["monai"] = torch_side(monai)
  medians = vs_monai3d.interleave({k: v["fn"] for k, v in sides.items()}, args.rounds,
                                  args.block, [])
  edge = f"{s['size']}²" if dims == 2 else f"{s['patch']}³"
  return dict(part=f"train_{dims}d", setting=f"{name}: {edge}, batch {s['batch']}, base "
              f"{s['base']}, depth {s['depth']}", dtype=dtype, **s,
              params={k: v["count"] for k, v in sides.items()}, compile_s=ours["compile_s"],
              median_s={k: m[0] for k, m in medians.items()}, steps=args.rounds * args.block)


def train(dims: int, args) -> Iterator[dict]:
  """Every setting and dtype; a row that fails (out of memory, say) records its error."""
  torch_setup(args.device)
  for name, s in SETTINGS[f"train_{dims}d"][mode(args)].items():
    for dtype in DTYPES:
      try:
        row = train_row(dims, name, s, dtype, args)
      except Exception as e:  # pylint: disable=broad-except
        row = dict(part=f"train_{dims}d", setting=name, dtype=dtype, **s,
                   error=f"{type(e).__name__}: {e}".splitlines()[0])
      yield row


def torch_setup(device: str) -> None:
  import torch
  torch.backends.cudnn.benchmark = device == "cuda"


# -- sliding-window inference -------------------------------------------------------------
def inference_3d(args) -> Iterator[dict]:
  """Each volume: ours around JAX, MONAI's around the twin, ours around the twin."""
  import jax
  from medseg_jax.evaluation import sliding_window
  torch_setup(args.device)
  setting = SETTINGS["inference_3d"][mode(args)]
  s = setting["net"]
  run_jax, state = vs_monai3d.jax_predictor(s)  # the run, the train state on the host
  model = torch_twins.unet3d(s["depth"], s["base"])
  torch_twins.copy_unet3d_weights(model, jax.tree.map(np.asarray, state.params))
  model.to(args.device).eval()
  run_twin = vs_monai3d.torch_probabilities(model, args.device)
  windows = sliding_window.Windows(patch=(s["patch"],) * 3, overlap=OVERLAP,
                                   gaussian_sigma=SIGMA, batch=s["batch"])
  for shape in setting["volumes"]:
    volume = vs_monai3d.phantom(shape)
    calls = {"medseg_jax": lambda: windows.apply(volume, run_jax),
             "monai": vs_monai3d.monai_run(model, volume, s, OVERLAP, SIGMA,
                                           device=args.device),
             "ours_on_twin": lambda: windows.apply(volume, run_twin)}
    out = {}
    medians = vs_monai3d.interleave(
        {k: (lambda k=k, fn=fn: out.__setitem__(k, fn())) for k, fn in calls.items()},
        args.rounds, 1, [])
    differ = lambda a, b: float(np.abs(out[a] - out[b]).max())
    yield dict(volume=list(shape), windows=len(sliding_window.window_corners(
        shape, (s["patch"],) * 3, OVERLAP)), **s, calls=args.rounds,
               median_s={k: m[0] for k, m in medians.items()},
               max_abs_diff={"jax_vs_monai": differ("medseg_jax", "monai"),
                             "stitching_only": differ("ours_on_twin", "monai"),
                             "network_only": differ("medseg_jax", "ours_on_twin")},
               argmax_differs=float(np.mean(out["medseg_jax"].argmax(-1)
                                            != out["monai"].argmax(-1))))


# -- the plan ------------------------------------------------------------------------------
def plan(args) -> Iterator[dict]:
  """Writes the synthetic dataset, plans it for one device of this machine, reads the plans."""
  from medseg_jax.data import synthetic
  with tempfile.TemporaryDirectory() as tmp:
    data, output = os.path.join(tmp, "data"), os.path.join(tmp, "plans")
    synthetic.write_synthetic_decathlon(data, num_test=0, **SETTINGS["plan"][mode(args)])
    command = [sys.executable, "-m", "medseg_jax.plan", f"--data={data}",
               f"--output={output}", f"--budget={args.plan_budget}", "--num_devices=1"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
      raise RuntimeError(f"medseg_jax.plan exited {proc.returncode}:\n"
                         + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))
    took = [line for line in proc.stdout.splitlines() if line.startswith("planning took")]
    for dims in (2, 3):
      yield dict(read_plan(os.path.join(output, f"plan_{dims}d.py")), dims=dims,
                 planning_s=seconds, planning=took[-1] if took else "",
                 budget=args.plan_budget)


def read_plan(path: str) -> dict:
  """The planned example, batch, width, depth and steps of a written plan, and the step
  times its width's rule records."""
  module = runpy.run_path(path)
  cfg = module["get_config"]()
  example = cfg.data.patch_size if cfg.data.spatial_dims == 3 else (cfg.data.image_size,) * 2
  text = open(path).read()
  rule = " ".join(re.findall(r"^  # (.*)$\n(?=(?:  #.*\n)*  c\.model\.base_features)",
                             text, re.M))
  timed = re.search(r"timed here: (.*)", rule)
  return dict(plan=os.path.basename(path), example=list(example),
              batch=cfg.train.per_device_batch_size, width=cfg.model.base_features,
              depth=cfg.model.depth, steps=cfg.train.num_steps,
              memory_budget=module.get("MEMORY_BUDGET"), timed=timed.group(1) if timed else "")


# -- the memory fit -----------------------------------------------------------------------
def memory_fit_part(args) -> Iterator[dict]:
  """The largest batch of each quickstart config and compute dtype in this device's budget."""
  from medseg_jax import config_schema
  from medseg_jax.planning import memory
  setting = SETTINGS["memory_fit"][mode(args)]
  budget, source = memory.device_budget(setting["memory_gib"])
  for dtype in DTYPES:
    for name in ("configs/quickstart.py", "configs/quickstart_3d.py"):
      cfg = config_schema.load_config(os.path.join(REPO, name))
      for key, value in setting["overrides"].items():
        config_schema.assign(cfg, key, value)
      start = time.perf_counter()
      batch, peaks = memory.largest_batch(
          budget, functools.partial(memory_fit.step_memory, cfg=cfg, dtype=dtype))
      per_example = (peaks[2] - peaks[1]) / 2**20 if {1, 2} <= set(peaks) else None
      yield dict(config=name, dtype=dtype, budget_gib=budget / GIB, budget_source=source,
                 largest_batch=batch,
                 peak_gib=peaks[batch] / GIB if batch else None, mib_per_example=per_example,
                 peaks_gib={str(b): p / GIB for b, p in sorted(peaks.items())},
                 compiles=len(peaks), seconds=time.perf_counter() - start)


# -- the Markdown table ------------------------------------------------------------------
def markdown(result: dict) -> str:
  """The suite's result as Markdown: the machine, a table per kind of figure, the parts."""
  parts = result["parts"]
  rows = lambda *names: [r for n in names for r in parts.get(n, {}).get("rows", [])]
  smoke = " (smoke mode on a CPU: the figures mean nothing)" if result["smoke"] else ""
  lines = [f"# GPU suite, {result['date']}{smoke}", "",
           f"Command: `{result['command']}` (commit {result['commit'] or 'unknown'})", ""]
  lines += [machine_line(r) + "\n" for r in rows("machine")]
  for title, table in (("Train steps, median ms", train_table(rows("train_2d", "train_3d"))),
                       ("3D sliding-window inference, median ms",
                        inference_table(rows("inference_3d"))),
                       ("The plan", plan_table(rows("plan"))),
                       ("Memory fit", memory_table(rows("memory_fit")))):
    if table:
      lines += [f"## {title}", "", *table, ""]
  lines += ["## Parts", "", *_table(["part", "status", "s", "limit s", "error"], [
      [name, p["status"], f"{p['seconds']:.0f}", f"{p['limit_s']:.0f}",
       p.get("error", "").replace("|", "\\|")] for name, p in parts.items()])]
  return "\n".join(lines) + "\n"


def machine_line(f: dict) -> str:
  cuda = ", ".join(f"{k} {v}" for k, v in sorted((f.get("jax_cuda") or {}).items()))
  return (f"GPU: {f.get('torch_device')} (nvidia-smi: {f.get('nvidia_smi')}). JAX "
          f"{f.get('jax')} on {f.get('jax_device')} ({f.get('jax_platform')}; CUDA plugin: "
          f"{cuda or 'none'}), torch {f.get('torch')} (CUDA {f.get('torch_cuda')}, cuDNN "
          f"{f.get('torch_cudnn')}), MONAI {f.get('monai')}, Python {f.get('python')}.")


def train_table(rows: list[dict]) -> list[str]:
  sides = ("medseg_jax", "pytorch", "monai")
  timed = [r for r in rows if "error" not in r]
  return _table(["setting", "compute dtype", *(f"{s} ms" for s in sides),
                 "medseg_jax / pytorch", "medseg_jax / monai", "JAX compile s"], [
      [r["setting"], r["dtype"], *(_ms(r["median_s"].get(s)) for s in sides),
       _ratio(r["median_s"], "medseg_jax", "pytorch"),
       _ratio(r["median_s"], "medseg_jax", "monai"), f"{r['compile_s']:.1f}"] for r in timed]
  ) + [f"\n{r['setting']}, {r['dtype']}: {r['error']}" for r in rows if "error" in r]


def inference_table(rows: list[dict]) -> list[str]:
  sides = ("medseg_jax", "monai", "ours_on_twin")
  return _table(["volume", "windows (batch)", "ours + JAX ms", "MONAI + twin ms",
                 "ours + twin ms", "ours + JAX / MONAI + twin", "max abs diff JAX / MONAI"], [
      ["×".join(map(str, r["volume"])), f"{r['windows']} ({r['batch']})",
       *(_ms(r["median_s"].get(s)) for s in sides), _ratio(r["median_s"], "medseg_jax",
                                                           "monai"),
       f"{r['max_abs_diff']['jax_vs_monai']:.1e}"] for r in rows])


def plan_table(rows: list[dict]) -> list[str]:
  if not rows:
    return []
  return _table(["plan", "example", "per-device batch", "width", "depth", "steps"], [
      [r["plan"], "×".join(map(str, r["example"])), str(r["batch"]), str(r["width"]),
       str(r["depth"]), str(r["steps"])] for r in rows]) + [
           "", f"`--budget={rows[0]['budget']}`: {rows[0]['planning_s']:.0f} s in all; "
           f"{rows[0]['planning'] or 'no summary line'}."]


def memory_table(rows: list[dict]) -> list[str]:
  return _table(["config", "compute dtype", "budget GiB", "largest batch", "its peak GiB",
                 "MiB per example", "compiles", "s"], [
      [r["config"], r["dtype"], f"{r['budget_gib']:.2f}",
       str(r["largest_batch"]),
       "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}",
       "-" if r["mib_per_example"] is None else f"{r['mib_per_example']:.1f}",
       str(r["compiles"]), f"{r['seconds']:.0f}"] for r in rows])


def _table(header: list[str], body: list[list[str]]) -> list[str]:
  if not body:
    return []
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
      "| " + " | ".join(row) + " |" for row in body]


def _ms(seconds) -> str:
  return "-" if seconds is None else f"{1000 * seconds:.1f}"


def _ratio(medians: dict, a: str, b: str) -> str:
  return f"{medians[a] / medians[b]:.2f}" if a in medians and b in medians else "-"


# -- running the parts ----------------------------------------------------------------------
PARTS = {  # name -> (rows of the part, time limit s, shares the GPU between JAX and PyTorch)
    "machine": (machine, 60, True),
    "train_2d": (functools.partial(train, 2), 75, True),
    "train_3d": (functools.partial(train, 3), 150, True),
    "inference_3d": (inference_3d, 75, True),
    "plan": (plan, 150, False),
    "memory_fit": (memory_fit_part, 120, False),
}


def mode(args) -> str:
  return "tiny" if args.tiny else "gpu"


def run_child(args) -> None:
  """In the part's own process: its rows, the file rewritten after each (what a time limit
  interrupts is kept)."""
  rows = []
  for row in PARTS[args.part][0](args):
    rows.append(row)
    with open(args.part_out + ".tmp", "w") as f:
      json.dump({"rows": rows}, f, default=str)
    os.replace(args.part_out + ".tmp", args.part_out)


def child_env(name: str, args, env: dict) -> dict:
  env = dict(env)
  if args.device == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  elif PARTS[name][2]:
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return env


def run_part(name: str, args, env: dict, limit: float, tmp: str) -> dict:
  """The part in its own process group, killed after `limit` s: status, seconds, rows."""
  path = os.path.join(tmp, f"{name}.json")
  command = [sys.executable, os.path.abspath(__file__), f"--part={name}",
             f"--part_out={path}", *forwarded(args)]
  start = time.perf_counter()
  proc = subprocess.Popen(command, cwd=REPO, env=child_env(name, args, env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    log, status = proc.communicate(timeout=limit)[0], "ok" if proc.wait() == 0 else "error"
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the part's group: the plan's processes too
    log, status = proc.communicate()[0], "timeout"
  entry = dict(status=status, seconds=round(time.perf_counter() - start, 1), limit_s=limit,
               rows=json.load(open(path))["rows"] if os.path.exists(path) else [])
  if status != "ok":
    tail = log.strip().splitlines()[-20:]
    entry["error"] = (f"exit {proc.returncode}" if status == "error" else
                      f"time limit {limit:.0f} s") + (f": {tail[-1]}" if tail else "")
    entry["log_tail"] = tail
  return entry


def forwarded(args) -> list[str]:
  return [f"--device={args.device}", f"--rounds={args.rounds}", f"--block={args.block}",
          f"--plan_budget={args.plan_budget}"] + (["--tiny"] if args.tiny else [])


def run_suite(args, env: dict) -> None:
  """Every part in turn within the deadline; the JSON and Markdown rewritten after each."""
  started = time.perf_counter()
  stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
  result = dict(command=shlex.join([sys.executable, *sys.argv]), cwd=os.getcwd(),
                commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                smoke=args.tiny, device=args.device, deadline_s=args.deadline_s, parts={})
  os.makedirs(args.out, exist_ok=True)
  paths = [os.path.join(args.out, f"{stamp}{ext}") for ext in (".json", ".md")]
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.parts.split(","):
      left = args.deadline_s - (time.perf_counter() - started)
      limit = min(PARTS[name][1], left)
      result["parts"][name] = (run_part(name, args, env, limit, tmp) if limit >= 15 else
                               dict(status="skipped", seconds=0, limit_s=0, rows=[],
                                    error="the suite's deadline came first"))
      print(f"gpu_suite: {name} {result['parts'][name]['status']} in "
            f"{result['parts'][name]['seconds']:.0f} s", flush=True)
      result["seconds"] = round(time.perf_counter() - started, 1)
      with open(paths[0], "w") as f:
        json.dump(result, f, indent=1, default=str)
      with open(paths[1], "w") as f:
        f.write(markdown(result))
  print(f"gpu_suite: wrote {paths[0]} and {paths[1]}")


def git_commit() -> str:
  proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                        text=True)
  return proc.stdout.strip()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "gpu_suite"))
  p.add_argument("--parts", default=",".join(PARTS), help=f"of {','.join(PARTS)}")
  p.add_argument("--deadline_s", type=float, default=460, help="for the whole suite")
  p.add_argument("--rounds", type=int, default=3, help="rounds of turns between sides")
  p.add_argument("--block", type=int, default=5, help="train steps per side per round")
  p.add_argument("--plan_budget", default="5m", help="medseg_jax.plan --budget")
  p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                 help="cpu: with --tiny, the smoke mode (module docstring)")
  p.add_argument("--tiny", action="store_true", help="tiny shapes: the smoke mode")
  p.add_argument("--part", default="", help=argparse.SUPPRESS)
  p.add_argument("--part_out", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  unknown = set(args.parts.split(",")) - set(PARTS)
  if unknown:
    p.error(f"--parts: no part {', '.join(sorted(unknown))}")
  if args.part:
    return run_child(args)
  env = dict(os.environ)
  if args.device == "cpu":
    if args.tiny:
      args.rounds, args.block = 1, 1
      return run_suite(args, env)
    p.error("--device=cpu is the smoke mode: give --tiny too")
  why = missing_gpu()
  if why:
    print(f"gpu_suite: no GPU here ({why}); nothing measured")
    return None
  return run_suite(args, env)


if __name__ == "__main__":
  main()
