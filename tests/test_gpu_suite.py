"""benchmarks/gpu_suite.py: without a GPU it says so in one line and writes nothing; a part
past its time limit is killed with its processes and recorded, and the suite still writes
its files; the Markdown tables of a result (a failed row listed under its table)."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import psutil

import helpers

SCRIPT = os.path.join(helpers.REPO, "benchmarks", "gpu_suite.py")


def _suite():
  spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_without_a_gpu_it_says_so_in_one_line_and_writes_nothing(tmp_path):
  out = tmp_path / "suite"
  proc = subprocess.run([sys.executable, SCRIPT, f"--out={out}"], capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines = (proc.stdout + proc.stderr).splitlines()
  assert proc.returncode == 0, proc.stderr
  assert lines == ["gpu_suite: no GPU here (JAX sees cpu); nothing measured"], lines
  assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_part_past_its_time_limit_is_killed_and_the_suite_goes_on(tmp_path):
  # The plan part needs minutes on this CPU: with the deadline at 16 s it is killed, its
  # planning process with it, the machine part gets no time, and both are recorded.
  marker = "--plan_budget=299s"
  proc = subprocess.run([sys.executable, SCRIPT, "--device=cpu", "--tiny", f"--out={tmp_path}",
                         "--parts=plan,machine", "--deadline_s=16", marker],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  [path] = glob.glob(str(tmp_path / "*.json"))
  parts = json.load(open(path))["parts"]
  assert parts["plan"]["status"] == "timeout", parts["plan"]
  assert parts["plan"]["error"].startswith("time limit 16 s"), parts["plan"]["error"]
  assert 15 <= parts["plan"]["seconds"] < 30
  assert parts["machine"]["status"] == "skipped"
  assert os.path.exists(path[:-len(".json")] + ".md")
  left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
          if any("=299s" in word for word in p.info["cmdline"] or ())]
  assert not left, left


def _result() -> dict:
  ok = lambda seconds, limit, rows: dict(status="ok", seconds=seconds, limit_s=limit, rows=rows)
  machine = dict(torch_device="Test GPU", nvidia_smi="Test GPU, 1.0, 1000 MiB", jax="0.1",
                 jax_device="Test GPU", jax_platform="gpu", jax_cuda={"cudnn_get_version": 1},
                 torch="2.0", torch_cuda="12.0", torch_cudnn=1, monai="1.0", python="3.11")
  planning = dict(budget="5m", planning_s=60.4, planning="planning took 60 s (fingerprint 1 s)")
  return dict(date="2026-01-01 10:00 UTC", smoke=False, command="python3 gpu_suite.py",
              commit="abc123", parts={
      "machine": ok(8.2, 60, [machine]),
      "train_2d": ok(45, 75, [dict(setting="u256: 256², batch 16", dtype="float32",
                                   median_s={"medseg_jax": 0.02, "pytorch": 0.04,
                                             "monai": 0.05}, compile_s=12.34),
                              dict(setting="u256", dtype="bfloat16", error="OOM: 9 GiB")]),
      "train_3d": dict(status="timeout", seconds=150.0, limit_s=150, error="time limit 150 s",
                       rows=[dict(setting="q: 32³", dtype="bfloat16", compile_s=20.0,
                                  median_s={"medseg_jax": 0.01, "pytorch": 0.008})]),
      "inference_3d": dict(status="error", seconds=3.0, limit_s=75, rows=[],
                           error="exit 1: RuntimeError: a | b"),
      "plan": ok(61, 150, [dict(plan="plan_2d.py", example=[48, 48], batch=36, width=32,
                                depth=3, steps=500, **planning),
                           dict(plan="plan_3d.py", example=[48, 48, 24], batch=2, width=8,
                                depth=3, steps=600, **planning)]),
      "memory_fit": ok(50, 120, [
          dict(config="configs/quickstart.py", dtype="float32", budget_gib=30.0,
               largest_batch=1000, peak_gib=29.99, mib_per_example=30.5, compiles=7,
               seconds=40.2),
          dict(config="configs/quickstart_3d.py", dtype="float32", budget_gib=30.0,
               largest_batch=0, peak_gib=None, mib_per_example=None, compiles=1,
               seconds=9.6)])})


EXPECTED = """\
# GPU suite, 2026-01-01 10:00 UTC

Command: `python3 gpu_suite.py` (commit abc123)

GPU: Test GPU (nvidia-smi: Test GPU, 1.0, 1000 MiB). JAX 0.1 on Test GPU (gpu; CUDA plugin: \
cudnn_get_version 1), torch 2.0 (CUDA 12.0, cuDNN 1), MONAI 1.0, Python 3.11.

## Train steps, median ms

| setting | compute dtype | medseg_jax ms | pytorch ms | monai ms | medseg_jax / pytorch \
| medseg_jax / monai | JAX compile s |
|---|---|---|---|---|---|---|---|
| u256: 256², batch 16 | float32 | 20.0 | 40.0 | 50.0 | 0.50 | 0.40 | 12.3 |
| q: 32³ | bfloat16 | 10.0 | 8.0 | - | 1.25 | - | 20.0 |

u256, bfloat16: OOM: 9 GiB

## The plan

| plan | example | per-device batch | width | depth | steps |
|---|---|---|---|---|---|
| plan_2d.py | 48×48 | 36 | 32 | 3 | 500 |
| plan_3d.py | 48×48×24 | 2 | 8 | 3 | 600 |

`--budget=5m`: 60 s in all; planning took 60 s (fingerprint 1 s).

## Memory fit

| config | compute dtype | budget GiB | largest batch | its peak GiB | MiB per example \
| compiles | s |
|---|---|---|---|---|---|---|---|
| configs/quickstart.py | float32 | 30.00 | 1000 | 29.99 | 30.5 | 7 | 40 |
| configs/quickstart_3d.py | float32 | 30.00 | 0 | - | - | 1 | 10 |

## Parts

| part | status | s | limit s | error |
|---|---|---|---|---|
| machine | ok | 8 | 60 |  |
| train_2d | ok | 45 | 75 |  |
| train_3d | timeout | 150 | 150 | time limit 150 s |
| inference_3d | error | 3 | 75 | exit 1: RuntimeError: a \\| b |
| plan | ok | 61 | 150 |  |
| memory_fit | ok | 50 | 120 |  |
"""


def test_the_markdown_tables_of_a_result():
  assert _suite().markdown(_result()) == EXPECTED


def test_a_smoke_run_says_so_in_its_title():
  result = dict(_result(), smoke=True, parts={})
  assert _suite().markdown(result).splitlines()[0] == (
      "# GPU suite, 2026-01-01 10:00 UTC (smoke mode on a CPU: the figures mean nothing)")
