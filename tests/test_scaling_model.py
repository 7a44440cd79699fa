"""The scaling model's arithmetic against hand computations (benchmarks/scaling_model.py)."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "benchmarks", "scaling_model.py")
_spec = importlib.util.spec_from_file_location("scaling_model", _PATH)
sm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm)


def test_ring_allreduce_time():
  # 4 workers, 100 MB at 1 GB/s, 10 us per hop: 2*3/4 * 0.1 s + 6 hops * 10 us.
  assert sm.allreduce_seconds(100e6, 4, 1e9, 1e-5) == pytest.approx(0.15 + 6e-5)
  assert sm.allreduce_seconds(100e6, 1, 1e9, 1e-5) == 0.0
  # The bandwidth term tends to 2 * bytes / bandwidth as N grows.
  assert sm.allreduce_seconds(1e9, 1000, 1e9, 0.0) == pytest.approx(1.998)


def test_step_time_hides_at_most_the_backward_share():
  # compute 0.3 s, comm 0.1 s; backward is 2/3 of compute = 0.2 s.
  assert sm.step_seconds(0.3, 0.1, overlap=0.0) == pytest.approx(0.4)
  assert sm.step_seconds(0.3, 0.1, overlap=0.25) == pytest.approx(0.35)   # hides 0.05
  assert sm.step_seconds(0.3, 0.1, overlap=1.0) == pytest.approx(0.3)     # hides all 0.1
  assert sm.step_seconds(0.3, 0.5, overlap=1.0) == pytest.approx(0.6)     # hides 0.2 of 0.5


def test_speedup_and_efficiency_by_hand():
  # 8 GPUs, 0.2 s compute, 64 MB at 2 GB/s, no latency: comm = 2*7/8 * 0.032 = 0.056 s.
  s = sm.speedup(8, 0.2, 64e6, 2e9, 0.0)
  assert s == pytest.approx(8 * 0.2 / 0.256)
  assert s / 8 == pytest.approx(0.78125)
  assert sm.speedup(1, 0.2, 64e6, 2e9, 1e-3) == pytest.approx(1.0)


def test_fit_recovers_a_bandwidth_from_efficiencies_made_by_hand():
  # Two models at 18 GPUs with 1 GB/s and no latency: comm = 34/18 * bytes / 1e9.
  models = {"a": (0.25, 100e6), "b": (0.1, 400e6)}
  targets = {}
  for name, (compute, nbytes) in models.items():
    comm = 34 / 18 * nbytes / 1e9
    targets[name] = 18 * compute / (compute + comm)
  bandwidth, overlap, rms = sm.fit(models, 18, targets, latency=0.0)
  assert bandwidth == pytest.approx(1e9, rel=0.01)
  assert overlap == 0.0 and rms < 0.005
