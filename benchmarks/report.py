"""Runs the comparison benchmarks and rewrites their block of BENCHMARKS.md (`make bench`).

    python benchmarks/report.py             # all four; --only=vs_pytorch,scaling_model

Each script runs as its own process with --json; its console output is echoed, and
its figures go into BENCHMARKS.md between its own `bench:NAME:begin` and
`bench:NAME:end` markers, with the date, the machine and the exact command. Sections of
benchmarks not run, and the rest of the file, are kept.
Needs the benchmark requirements (benchmarks/requirements.txt).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(REPO, "BENCHMARKS.md")
BEGIN = "<!-- bench:{}:begin: written by `make bench` (benchmarks/report.py) -->"
END = "<!-- bench:{}:end -->"
SCRIPTS = {  # name -> arguments (beyond --json); what `make bench` runs
    "vs_pytorch": ["--profile"],
    "engine_overhead": [],
    "scaling_model": [],
    "memory_fit": [],
}


def run(name: str) -> tuple[dict, str]:
  """Runs one script; returns (its JSON result, the command line as documented)."""
  cmd = [sys.executable, os.path.join("benchmarks", f"{name}.py")] + SCRIPTS[name] + ["--json"]
  shown = " ".join(["python3"] + cmd[1:])
  print(f"$ {shown}", flush=True)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  lines = proc.stdout.splitlines()
  print("\n".join(line for line in lines if not line.startswith(("{", "["))), flush=True)
  if proc.returncode:
    sys.exit(f"error: {shown} failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}")
  return json.loads(lines[-1]), shown


def machine() -> str:
  """CPU model, cores, memory, software versions and the load when the run started."""
  model = "unknown CPU"
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  with open("/proc/meminfo") as f:
    mem_kib = int(f.readline().split()[1])
  versions = []
  for module in ("jax", "flax", "optax", "torch", "monai"):
    try:
      versions.append(f"{module} {__import__(module).__version__}")
    except ImportError:
      versions.append(f"{module} absent")
  load = os.getloadavg()[0]
  return (f"{model}, {os.cpu_count()} cores, {mem_kib / 2**20:.1f} GiB RAM, no accelerator; "
          f"Python {platform.python_version()}, {', '.join(versions)}. "
          f"1-minute load average at the start: {load:.1f} (the machine is shared)")


def vs_pytorch_md(r: dict) -> list[str]:
  p = r["params"]
  out = [f"U-Net depth {r['depth']}, base {r['base_features']}, {r['size']}×{r['size']}×1, "
         f"batch {r['batch']}, 2 classes, Dice + cross-entropy, SGD (momentum 0.9). "
         f"Parameters: medseg_jax {p['medseg_jax']:,}, PyTorch {p['pytorch']:,}"
         + (f", MONAI BasicUNet {p['monai']:,}" if "monai" in p else "") + ". "
         f"PyTorch {r['torch']} with torch.set_num_threads({r['torch_threads']}) "
         f"({os.cpu_count()} cores); medseg_jax on one CPU device. {r['rounds']} rounds of {r['block']} steps per "
         "framework, alternating; medians over all timed steps.", "",
         "| | framework | median step s | slices/s |", "|---|---|---|---|"]
  for kind in ("train", "infer"):
    for name, v in r[kind].items():
      if isinstance(v, dict):
        out.append(f"| {kind} | {name} | {v['median_s']:.4f} | {v['slices_per_s']:.1f} |")
  ratios = {k: r[k]["ratio_jax_over_pytorch"] for k in ("train", "infer")}
  out += ["", f"Step time medseg_jax / PyTorch: training {ratios['train']:.2f}, "
          f"inference {ratios['infer']:.2f} (below 1: medseg_jax faster)."]
  if "jax_train_profile" in r:
    out += ["", "medseg_jax's train step, share of XLA op time by op kind (jax profiler): "
            + ", ".join(f"{kind} {share:.0%}" for kind, share in r["jax_train_profile"]) + "."]
  return out


def engine_md(results: list) -> list[str]:
  out = ["| config | compilation cache | interpreter | imports | config | build | data open | "
         "first step | ready to train | config + build (CPU) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    m = {k: v * 1e3 for k, v in r["median_s"].items()}
    cfg = " ".join([r["config"]] + r["overrides"]
                   + [f"{k}={v}" for k, v in r.get("env", {}).items()])
    out.append(f"| {cfg} | {'warm' if r['cache'] else 'none'} | {m['interpreter']:.0f} | "
               f"{m['imports']:.0f} | {m['config']:.0f} | {m['build']:.0f} | "
               f"{m['data_open']:.0f} | {m['first_step']:.0f} | {m['ready_to_train']:.0f} | "
               f"{m['engine']:.0f} ({m['cpu/engine']:.0f}) |")
  out += ["", "Milliseconds, medians of the fresh processes; build split (ms): "
          + "; ".join(f"{'warm cache' if r['cache'] else 'no cache'}: mesh "
                      f"{r['median_s']['build/mesh'] * 1e3:.0f}, model init and optimizer "
                      f"{r['median_s']['build/model_init_and_optimizer'] * 1e3:.0f}, placing "
                      f"{r['median_s']['build/place_state'] * 1e3:.0f}, steady step "
                      f"{r['median_s']['steady_step'] * 1e3:.0f}" for r in results) + ". "
          "The thesis's engine (config parsing, building and deploying the components): 139 ms."]
  return out


def scaling_md(r: dict) -> list[str]:
  out = [f"Assumed sustained GTX 1080 Ti throughput {r['gpu_tflops']} TFLOP/s, ring hop latency "
         f"{r['latency_us']} µs.", "", "| model | parameters | gradients MiB | TFLOP per step | "
         "compute ms |", "|---|---|---|---|---|"]
  for k, m in r["models"].items():
    out.append(f"| {k} (batch {m['batch']}, {m['size']}²) | {m['params'] / 1e6:.1f} M | "
               f"{m['bytes'] / 2**20:.1f} | {m['flops'] / 1e12:.2f} | {m['compute_s'] * 1e3:.0f} |")
  out += ["", f"Check: at that throughput, 100 U-Net epochs on one GPU take "
          f"{r['unet_100_epochs_h']:.1f} h (thesis: 21.7 h).", "",
          "| fit | bandwidth GB/s | overlap | RMS error (efficiency points) | U-Net at 18 | "
          "FCN at 18 | U-Net at 64 | FCN at 64 |", "|---|---|---|---|---|---|---|---|"]
  for label, f in r["fits"].items():
    cells = []
    for n in (18, 64):
      for k in ("unet", "fcn"):
        s = f["speedup"][k][n - 1]
        cells.append(f"{s:.1f}× ({s / n:.0%})")
    out.append(f"| {label.replace('_', ' ')} | {f['bandwidth_GBps']:.2f} | {f['overlap']:.2f} | "
               f"{f['rms_efficiency_error'] * 100:.1f} | {cells[0]} | {cells[1]} | {cells[2]} | "
               f"{cells[3]} |")
  out += ["", "Thesis at 18 GPUs: U-Net 17.5× (97%), FCN 10.4× (58%)."]
  return out


def memory_md(r: dict) -> list[str]:
  out = [f"Thesis U-Net (base 64, depth 4), {r['size']}×{r['size']}×1, SGD with momentum, "
         f"device memory {', '.join(f'{m:g}' for m in r['device_memory_gib'])} GiB.", "",
         "| compute dtype | budget GiB | largest batch | its peak GiB | MiB per slice | "
         "fixed MiB |", "|---|---|---|---|---|---|"]
  for row in r["rows"]:
    peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "—"
    out.append(f"| {row['dtype']} | {row['budget_gib']:.2f} ({row['fraction']:.0%}) | "
               f"{row['largest_batch']} | {peak} | {row['per_slice_gib'] * 1024:.0f} | "
               f"{row['fixed_gib'] * 1024:.0f} |")
  return out


SECTIONS = {"vs_pytorch": ("medseg_jax against PyTorch and MONAI", vs_pytorch_md),
            "engine_overhead": ("Engine overhead: process start to ready to train",
                                engine_md),
            "scaling_model": ("Scaling model: data parallelism on N GPUs", scaling_md),
            "memory_fit": ("Largest U-Net batch per device memory", memory_md)}


def render(name: str, result: dict, command: str, about: str) -> str:
  """One benchmark's section, between its markers."""
  title, fn = SECTIONS[name]
  lines = [BEGIN.format(name), f"## {title} (`benchmarks/{name}.py`)", "",
           f"Date: {datetime.date.today().isoformat()}. Machine: {about}. Command "
           "(`make bench` runs it):", "", "```bash", command, "```", ""] + fn(result)
  return "\n".join(lines + [END.format(name)])


def rewrite(path: str, sections: dict[str, str]) -> None:
  """Replaces each benchmark's marked section (or appends it); writes the file atomically."""
  sys.path.insert(0, REPO)
  from medseg_jax import files  # pylint: disable=import-outside-toplevel
  with open(path) as f:
    text = f.read()
  for name, section in sections.items():
    begin, end = BEGIN.format(name), END.format(name)
    if begin in text and end in text:
      head, rest = text.split(begin, 1)
      text = head + section + rest.split(end, 1)[1]
    else:
      text = text.rstrip("\n") + "\n\n" + section + "\n"
  with files.atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated subset")
  p.add_argument("--output", default=BENCHMARKS_MD)
  args = p.parse_args()
  names = args.only.split(",")
  unknown = [n for n in names if n not in SCRIPTS]
  if unknown:
    sys.exit(f"error: --only: unknown benchmark(s) {unknown}; choose from {list(SCRIPTS)}")
  about = machine()
  sections = {}
  for name in names:  # each section is written as soon as its benchmark has run
    result, command = run(name)
    sections[name] = render(name, result, command, about)
    rewrite(args.output, {name: sections[name]})
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
