"""Live monitoring: TensorBoard events, system resources of every host, a progress bar.

Process 0 writes scalars to WORKDIR/tensorboard (tensorboardX). The loss is also
written smoothed with exponential moving averages (0.9, 0.99, 0.999), the curves
people read to judge an LR change. Every process samples its own host in a
background thread; at each logged step the newest samples of all processes reach
process 0 in one small gather, and are merged into that `metrics.jsonl` record and
the event files as `system/<host>/<quantity>`.
"""

import json
import os
import socket
import sys
import threading

import jax
import numpy as np
import psutil
from absl import logging
from tqdm import tqdm

from medseg_jax import files
from medseg_jax.monitor.scalars import EMA_DECAYS, THROUGHPUT_UNITS
from medseg_jax.parallel import multihost


def sample_system(devices) -> dict[str, float]:
  """CPU, host RAM, disk and network counters, device memory and GPU use where known."""
  memory, disk, net = psutil.virtual_memory(), psutil.disk_io_counters(), psutil.net_io_counters()
  out = {"cpu_percent": psutil.cpu_percent(interval=None),
         "host_memory_used_gib": (memory.total - memory.available) / 2**30,
         "host_memory_percent": memory.percent}
  if disk is not None:
    out.update({"disk_read_mib": disk.read_bytes / 2**20,
                "disk_write_mib": disk.write_bytes / 2**20})
  if net is not None:
    out.update({"net_sent_mib": net.bytes_sent / 2**20,
                "net_recv_mib": net.bytes_recv / 2**20})
  for d in devices:
    stats = d.memory_stats() or {}  # None on backends without stats (CPU)
    if "bytes_in_use" in stats:
      out[f"device{d.id}/memory_in_use_gib"] = stats["bytes_in_use"] / 2**30
      out[f"device{d.id}/memory_peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
  out.update(_gpu_utilisation())
  return out


def host_names(hostnames: list[str]) -> list[str]:
  """The name each process's samples go under: its hostname, with `-p<process>` added
  where several processes share a host."""
  return [h if hostnames.count(h) == 1 else f"{h}-p{i}" for i, h in enumerate(hostnames)]


def _all_processes_json(value) -> list:
  """`value` (JSON) of every process; two collectives that every process calls."""
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  longest = int(multihost.all_processes(np.array([data.size], np.int32)).max())
  padded = np.zeros(longest, np.uint8)
  padded[:data.size] = data
  return [json.loads(bytes(row).rstrip(b"\0").decode())
          for row in multihost.all_processes(padded)]


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
    self.devices = jax.local_devices()

  def run(self) -> None:
    psutil.cpu_percent(interval=None)  # the first call only starts the measurement
    while not self._halt.wait(self.interval):
      try:
        self.latest = sample_system(self.devices)
      except Exception as e:  # monitoring never stops training
        logging.warning("System sampling failed: %s", e)

  def stop(self) -> None:
    self._halt.set()


class _ClusterSampler:
  """Every process's newest system sample, gathered to every process at the same steps.

  The quantities of each process are fixed when it starts (exchanged once with the
  hostnames), so each gather moves one float vector of a fixed length per process."""

  def __init__(self, interval: float):
    self._sampler = _Sampler(interval)
    local = {"host": socket.gethostname(),
             "keys": sorted(sample_system(self._sampler.devices))}
    self._keys = local["keys"]
    everyone = _all_processes_json(local) if jax.process_count() > 1 else [local]
    self._hosts = host_names([p["host"] for p in everyone])
    self._all_keys = [p["keys"] for p in everyone]
    self._width = max(len(k) for k in self._all_keys)
    self._sampler.start()

  def gather(self) -> dict[str, float]:
    """{"system/<host>/<quantity>": value} of every process (a collective when there are
    several: every process calls it at the same steps)."""
    latest = self._sampler.latest
    vector = np.full(self._width, np.nan, np.float64)
    vector[:len(self._keys)] = [latest.get(k, np.nan) for k in self._keys]
    # Sent as the float64 bits: JAX without x64 would round the values to float32.
    rows = multihost.all_processes(vector.view(np.uint32)).view(np.float64)
    return {f"system/{host}/{key}": float(value)
            for host, keys, row in zip(self._hosts, self._all_keys, rows)
            for key, value in zip(keys, row) if not np.isnan(value)}

  def stop(self) -> None:
    self._sampler.stop()


def summary_writer(logdir: str):
  """tensorboardX's SummaryWriter for `logdir`, imported without PyTorch.

  tensorboardX's writer module imports torch whenever it is installed, only so that torch
  tensors can be logged: 1.3 s of every run's start-up on a machine with PyTorch, where
  this project logs Python and numpy numbers. A None entry in `sys.modules` is Python's
  documented way to make an import fail (tensorboardX then falls back to numpy); it is
  set only while tensorboardX is first imported, and not where torch is already loaded.
  tests/test_monitor.py checks that torch stays out and the events are written."""
  blocked = "torch" not in sys.modules and "tensorboardX" not in sys.modules
  if blocked:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter(logdir=logdir)


def _stop_on_full_disk(writer, logdir: str) -> None:
  """After the first write that finds the disk full, one warning line and no more events.

  tensorboardX writes the event file from a thread of its own: an OSError there ends the
  thread with a traceback, and its bounded queue then blocks the next event (and `close`)
  for ever. It offers no hook for that, so the methods of its record writer (the one
  object that touches the file, from that thread and from `flush`) are wrapped. Its one
  public way in, `record_writer.register_writer_factory`, is a process-wide registry keyed
  by a URL scheme the logdir would have to carry; so private attributes are used, with
  tensorboardX pinned exactly in requirements.txt and the chain tested (test_monitor)."""
  # pylint: disable-next=protected-access
  records = writer._get_file_writer().event_writer._ev_writer._py_recordio_writer
  close, failed = records.close, []

  def guarded(method):
    def call(*args):
      if failed:
        return None
      try:
        return method(*args)
      except OSError as e:
        reason = files.disk_full(e)
        if reason is None:
          raise
        failed.append(reason)
        logging.warning("%s: disk full (%s); no more TensorBoard events are written", logdir,
                        reason)
        try:
          close()  # closes the file; its buffer, which cannot be written, is dropped
        except OSError:
          pass
        return None
    return call

  for name in ("write", "flush", "close"):
    setattr(records, name, guarded(getattr(records, name)))


class Monitor:
  """Writes what the training loop reports on process 0; every process samples its host."""

  def __init__(self, workdir: str, enabled: bool, system_interval: float, num_steps: int,
               start_step: int, steps_per_epoch: int):
    self.enabled = enabled and jax.process_index() == 0   # writes events, shows the bar
    self._ema: dict[float, float] = {}
    self._writer = self._bar = None
    # Built on every process alike (its start-up and gathers are collectives).
    self._system = _ClusterSampler(system_interval) if enabled and system_interval > 0 else None
    if not self.enabled:
      return
    logdir = os.path.join(workdir, "tensorboard")
    with files.disk_full_reported(logdir):
      self._writer = summary_writer(logdir)
    _stop_on_full_disk(self._writer, logdir)
    # A bar on a terminal; elsewhere (files, CI) the loop's log lines say the same.
    self._bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True,
                     disable=None, leave=False)
    self.steps_per_epoch = steps_per_epoch

  @property
  def bar_active(self) -> bool:
    return self._bar is not None and not self._bar.disable

  def gather_system_samples(self) -> dict[str, float]:
    """The newest system samples of every host, on process 0 ({} elsewhere). A collective
    when there are several processes: every process calls it at the same steps."""
    system = self._system.gather() if self._system else {}
    return system if self.enabled else {}

  def train_window(self, first_step: int, losses: list[float], record: dict,
                   system: dict[str, float]) -> dict[str, float]:
    """Writes per-step losses and their EMAs, then `record` (the window's summary) and the
    `system` samples at its step (process 0 only). Returns the EMAs at the window's last
    step, as `loss_ema_<decay>` ({} on other processes)."""
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
    throughput = [f"{unit}_per_sec{each}" for unit in THROUGHPUT_UNITS
                  for each in ("", "_per_device")]
    for key in ("learning_rate", "grad_norm", *throughput, "step_time", "data_wait_time",
                "compute_time"):
      if key in record:
        self._writer.add_scalar(f"train/{key}", record[key], step)
    for key, value in system.items():
      self._writer.add_scalar(key, value, step)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      rates = {f"{unit}_s": f"{record[f'{unit}_per_sec']:.1f}" for unit in THROUGHPUT_UNITS
               if f"{unit}_per_sec" in record}
      self._bar.set_postfix(epoch=f"{step / self.steps_per_epoch:.2f}",
                            loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.3g}",
                            **rates, refresh=False)
    return {f"loss_ema_{decay}": value for decay, value in self._ema.items()}

  def scalar(self, tag: str, value: float, step: int) -> None:
    """One TensorBoard scalar (a plugin's), on process 0."""
    if self.enabled:
      self._writer.add_scalar(tag, value, step)

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
    if self._system:
      self._system.stop()
    if not self.enabled:
      return
    self._bar.close()
    self._writer.close()
