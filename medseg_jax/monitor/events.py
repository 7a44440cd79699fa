"""Live monitoring on process 0: TensorBoard events, system resources, a progress bar.

Scalars go to WORKDIR/tensorboard (tensorboardX). The loss is also written
smoothed with exponential moving averages (0.9, 0.99, 0.999), the curves people
read to judge an LR change. System resources are sampled by a background thread
and merged into the next `metrics.jsonl` record and the event files.
"""

import os
import threading

import jax
import numpy as np
import psutil
from absl import logging
from tensorboardX import SummaryWriter
from tqdm import tqdm

EMA_DECAYS = (0.9, 0.99, 0.999)


def sample_system(devices) -> dict[str, float]:
  """CPU, host RAM, disk and network counters, device memory and GPU use where known."""
  memory, disk, net = psutil.virtual_memory(), psutil.disk_io_counters(), psutil.net_io_counters()
  out = {"system/cpu_percent": psutil.cpu_percent(interval=None),
         "system/host_memory_used_gib": (memory.total - memory.available) / 2**30,
         "system/host_memory_percent": memory.percent}
  if disk is not None:
    out.update({"system/disk_read_mib": disk.read_bytes / 2**20,
                "system/disk_write_mib": disk.write_bytes / 2**20})
  if net is not None:
    out.update({"system/net_sent_mib": net.bytes_sent / 2**20,
                "system/net_recv_mib": net.bytes_recv / 2**20})
  for d in devices:
    stats = d.memory_stats() or {}  # None on backends without stats (CPU)
    if "bytes_in_use" in stats:
      out[f"device{d.id}/memory_in_use_gib"] = stats["bytes_in_use"] / 2**30
      out[f"device{d.id}/memory_peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
  out.update(_gpu_utilisation())
  return out


def _gpu_utilisation() -> dict[str, float]:
  """GPU utilisation from NVML when the optional pynvml package and a driver are there."""
  try:
    import pynvml  # pylint: disable=import-outside-toplevel
    pynvml.nvmlInit()
  except Exception:  # not installed, or no NVIDIA driver: nothing to report
    return {}
  return {f"gpu{i}/utilisation_percent":
          float(pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByIndex(i)).gpu)
          for i in range(pynvml.nvmlDeviceGetCount())}


class _Sampler(threading.Thread):
  """Samples the system every `interval` seconds; `latest` holds the newest sample."""

  def __init__(self, interval: float):
    super().__init__(daemon=True, name="medseg-system-sampler")
    self.interval, self.latest = interval, {}
    self._halt = threading.Event()
    self._devices = jax.local_devices()

  def run(self) -> None:
    psutil.cpu_percent(interval=None)  # the first call only starts the measurement
    while not self._halt.wait(self.interval):
      try:
        self.latest = sample_system(self._devices)
      except Exception as e:  # monitoring never stops training
        logging.warning("System sampling failed: %s", e)

  def stop(self) -> None:
    self._halt.set()


class Monitor:
  """Writes what the training loop reports; does nothing on processes other than 0."""

  def __init__(self, workdir: str, enabled: bool, system_interval: float, num_steps: int,
               start_step: int, steps_per_epoch: int):
    self.enabled = enabled
    self._ema: dict[float, float] = {}
    self._writer = self._sampler = self._bar = None
    if not enabled:
      return
    self._writer = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
    if system_interval > 0:
      self._sampler = _Sampler(system_interval)
      self._sampler.start()
    # A bar on a terminal; elsewhere (files, CI) the loop's log lines say the same.
    self._bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True,
                     disable=None, leave=False)
    self.steps_per_epoch = steps_per_epoch

  @property
  def bar_active(self) -> bool:
    return self._bar is not None and not self._bar.disable

  def train_window(self, first_step: int, losses: list[float], record: dict) -> dict:
    """Writes per-step losses and their EMAs, then `record` (the window's summary) at its
    step; returns the newest system sample to merge into the record."""
    if not self.enabled:
      return {}
    for i, loss in enumerate(losses):
      step = first_step + i
      self._writer.add_scalar("train/loss", loss, step)
      for decay in EMA_DECAYS:
        previous = self._ema.get(decay, loss)
        self._ema[decay] = decay * previous + (1 - decay) * loss
        self._writer.add_scalar(f"train/loss_ema_{decay}", self._ema[decay], step)
    step = record["step"]
    for key in ("learning_rate", "grad_norm", "slices_per_sec", "slices_per_sec_per_device",
                "step_time", "data_wait_time", "compute_time"):
      if key in record:
        self._writer.add_scalar(f"train/{key}", record[key], step)
    system = dict(self._sampler.latest) if self._sampler else {}
    for key, value in system.items():
      self._writer.add_scalar(key, value, step)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(epoch=f"{step / self.steps_per_epoch:.2f}",
                            loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.3g}",
                            slices_s=f"{record['slices_per_sec']:.1f}", refresh=False)
    return system

  def evaluation(self, split: str, step: int, result: dict, montage: np.ndarray | None) -> None:
    if not self.enabled:
      return
    for key, value in result.items():
      if isinstance(value, (int, float)) and key not in ("step", "num_examples"):
        self._writer.add_scalar(f"{split}/{key}", value, step)
    if montage is not None:
      self._writer.add_image(f"{split}/overlay", montage, step, dataformats="HWC")
    self._writer.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    if self._sampler:
      self._sampler.stop()
    self._bar.close()
    self._writer.close()
