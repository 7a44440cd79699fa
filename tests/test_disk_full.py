"""A full disk, on real small filesystems: one line naming the path, a non-zero exit, no
traceback, no partial output, and the newest complete checkpoint kept for the restart.

The small filesystems are tmpfs mounts (root only: the tests skip elsewhere, saying so);
one test limits the file size instead (RLIMIT_FSIZE, EFBIG), which needs no privilege and
makes a checkpoint fail midway, after orbax has started writing it."""

import glob
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import REPO, TINY, checkpoint_arrays
from medseg_jax.errors import MedsegError
from medseg_jax.evaluation import predict

# A model whose checkpoint (about 1.4 MB) fills a 4 MiB disk within a few saves.
RUN = TINY + ["--config.model.depth=2", "--config.model.base_features=16",
              "--config.train.eval_every_steps=2", "--config.checkpoint.every_steps=2",
              "--config.checkpoint.max_to_keep=1"]


@pytest.fixture
def small_disk(tmp_path):
  """mount(name, size) -> the path of a new tmpfs of `size` (e.g. "4m") under tmp_path."""
  mounted = []

  def mount(name: str, size: str) -> str:
    path = tmp_path / name
    path.mkdir()
    if os.geteuid() != 0:
      pytest.skip("the small filesystem is a tmpfs mounted by the test, which needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode:
      pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    mounted.append(path)
    return str(path)

  yield mount
  for path in mounted:
    subprocess.run(["umount", "-l", str(path)], check=False)


def _run(*args, file_size_kib: int | None = None, timeout: float = 180):
  """`python -m medseg_jax.main ARGS`, with files limited to `file_size_kib` if given."""
  command = [sys.executable, "-m", "medseg_jax.main", *args]
  if file_size_kib:  # set by the shell: a preexec_fn would run Python in a forked JAX process
    command = ["bash", "-c", f'ulimit -f {file_size_kib} && exec "$@"', "bash", *command]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, PYTHONPATH=REPO))


def _one_error_line(proc) -> str:
  """The run's one `error:` line, after checking it failed cleanly: exit 1, nothing else
  that is not a log line, no traceback from any thread."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, (
      proc.stderr[-3000:])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


def _unfinished(directory: str) -> list[str]:
  return glob.glob(os.path.join(directory, "**", "*.orbax-checkpoint-tmp*"), recursive=True)


def test_training_stops_at_the_checkpoint_that_does_not_fit_and_resumes(small_disk, tmp_path):
  disk = small_disk("disk", "4m")
  (tmp_path / "data").mkdir()  # dataset and slice store on the large disk, the run on the small
  args = [*RUN, f"--config.data.root={tmp_path / 'data'}", f"--workdir={disk}/run"]
  proc = _run(*args, "--config.train.num_steps=40")
  line = _one_error_line(proc)
  directory = os.path.join(disk, "run", "checkpoints")
  assert line.startswith(f"error: {directory}: disk full: checkpoint "), line
  newest = int(line.split("the newest complete checkpoint is step ")[1].split()[0])
  steps = sorted(int(n) for n in os.listdir(directory))
  assert newest == max(steps) and not _unfinished(directory)
  assert checkpoint_arrays(os.path.join(disk, "run"), newest)  # orbax alone reads it
  # With room again the same command continues from that checkpoint.
  subprocess.run(["mount", "-o", "remount,size=64m", disk], check=True)
  proc = _run(*args, f"--config.train.num_steps={newest + 2}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Resuming from checkpoint at step {newest} " in proc.stderr


def test_a_checkpoint_that_fails_midway_is_one_line_and_leaves_nothing(tmp_path):
  """Past the file size limit, orbax's background write of the first checkpoint fails
  after it started (EFBIG): its unfinished step is removed and no thread prints."""
  (tmp_path / "data").mkdir()
  proc = _run(*RUN, f"--config.data.root={tmp_path / 'data'}", f"--workdir={tmp_path}/run",
              "--config.train.num_steps=4", file_size_kib=128)
  line = _one_error_line(proc)
  directory = os.path.join(tmp_path, "run", "checkpoints")
  assert line == (f"error: {directory}: disk full (File too large); no checkpoint written "
                  "yet (free space, then run the same command)")
  assert os.listdir(directory) == []


def test_the_slice_store_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk, tmp_path):
  cache = small_disk("cache", "256k")
  (tmp_path / "data").mkdir()
  proc = _run(*TINY, f"--config.data.root={tmp_path / 'data'}",
              f"--config.data.cache_dir={cache}", f"--workdir={tmp_path / 'run'}",
              "--config.train.num_steps=1")
  line = _one_error_line(proc)
  assert line.startswith(f"error: {cache}/data-") and "disk full (No space left on device) " \
      "while writing the slice store" in line, line
  assert os.listdir(cache) == []


def test_a_prediction_on_a_full_disk_is_one_error_and_leaves_nothing(small_disk, tmp_path):
  out = small_disk("out", "64k")
  src = str(tmp_path / "volume.nii.gz")
  nib.save(nib.Nifti1Image(np.zeros((64, 64, 16), np.float32), np.eye(4)), src)
  probs = np.random.default_rng(0).random((64, 64, 16, 3)).astype(np.float32)
  with open(os.path.join(out, "filler"), "wb") as f:  # the disk is full but for a few KiB
    f.write(b"\0" * (60 * 1024))
  dst = os.path.join(out, "volume.nii.gz")
  with pytest.raises(MedsegError, match=rf"^{dst}: disk full \(No space left on device\)"):
    predict.write_prediction(src, probs, dst, os.path.join(out, "volume_probs.nii.gz"))
  assert sorted(os.listdir(out)) == ["filler"]


MONITOR = """
import os, sys
import numpy as np
from medseg_jax.monitor import events
mon = events.Monitor(sys.argv[1], True, 0, 100, 0, 10)
fd = os.open(os.path.join(sys.argv[1], "filler"), os.O_WRONLY | os.O_CREAT)
try:  # fill the disk
  while True:
    os.write(fd, bytes(4096))
except OSError:
  os.close(fd)
for step in range(1, 60):  # far more events than tensorboardX's queue holds
  mon.train_window(step, [0.5], {"step": step, "loss": 0.5, "learning_rate": 0.1,
                                 "slices_per_sec": 1.0}, {})
  mon.evaluation("val", step, {"dice": 0.5}, np.zeros((64, 64, 3), np.uint8))
mon.close()
print("closed")
"""


def test_tensorboard_events_on_a_full_disk_stop_with_one_warning(small_disk):
  """tensorboardX's writer thread meets the full disk: one warning, no traceback, no hang
  (its queue would otherwise fill and block), and training code goes on."""
  disk = small_disk("events", "1m")
  proc = subprocess.run([sys.executable, "-c", MONITOR, disk], cwd=REPO, capture_output=True,
                        text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 0 and proc.stdout == "closed\n", proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  warnings = [line for line in proc.stderr.splitlines() if "disk full" in line]
  assert len(warnings) == 1 and f"{disk}/tensorboard: disk full (No space left on device)" \
      in warnings[0], proc.stderr[-3000:]
