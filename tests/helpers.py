"""Shared by the tests that train: tiny configs, in this process or in real processes."""

import ast
import importlib.util
import os
import sys

import jax
import nibabel as nib
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The quickstart config shrunk to seconds: 6 synthetic 32x32x8 volumes, a 2-level U-Net,
# preprocessed without a process pool (tests/test_data.py runs the pool).
TINY = ["--config=configs/quickstart.py", "--config.data.synthetic_volumes=6",
        "--config.data.synthetic_shape=(32, 32, 8)", "--config.data.slices_per_volume=0",
        "--config.data.image_size=32", "--config.model.depth=1",
        "--config.model.base_features=4", "--config.train.per_device_batch_size=2",
        "--config.data.preprocess_workers=1"]


def config(*overrides: str, path: str = "configs/quickstart.py"):
  """The config file at `path` with `--config.KEY=VALUE` overrides, as `medseg_jax.main`
  would build it (values are Python literals, or strings), locked."""
  spec = importlib.util.spec_from_file_location("_test_config", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for override in overrides:
    key, value = override[len("--config."):].split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
      node = node[part]
    node[leaf] = value
  cfg.lock()
  return cfg


def init_variables(model, x, seed: int = 0) -> dict:
  """`model.init` on the batch `x`, compiled, with the classic threefry as training's
  `init_state` uses it: with the partitionable one a U-Net's init compiles for seconds."""
  with jax.threefry_partitionable(False):
    return jax.jit(model.init)(jax.random.key(seed), x)


def env_with_devices(devices: int | None = None) -> dict:
  """This environment with `devices` simulated CPU devices (none forced if None); the
  suite's other XLA flags stay. `PYTHON` names this interpreter, for the launchers."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count=")]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return dict(os.environ, XLA_FLAGS=" ".join(flags), PYTHON=sys.executable)


def checkpoint_arrays(workdir: str, step: int, item: str | None = None) -> list[np.ndarray]:
  """The arrays of a checkpoint's train state (or of one `item` of it, e.g. "params"),
  read with orbax onto this process's first device, in a fixed order."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata)
  tree = checkpointer.restore(path, abstract)
  return [np.asarray(x) for x in jax.tree.leaves(tree[item] if item else tree)]


def parallel(cfg):
  """The devices `cfg` asks for, as `medseg_jax.main` hands them to every mode."""
  from medseg_jax.parallel import strategies  # pylint: disable=import-outside-toplevel
  return strategies.make_parallel(cfg.parallel.strategy, cfg.parallel.num_devices)


def run_settings(cfg):
  """The settings `medseg_jax.main` reads from `cfg` once and hands to every mode."""
  from medseg_jax.training import settings  # pylint: disable=import-outside-toplevel
  return settings.read(cfg)


def data_source(cfg):
  """The shared data settings of `cfg`."""
  return run_settings(cfg).source


def load_splits(cfg, workdir: str) -> tuple[dict, dict]:
  """The splits and data_info of the run of `cfg` in `workdir`, as training loads them."""
  from medseg_jax.parallel import multihost  # pylint: disable=import-outside-toplevel
  run = run_settings(cfg)
  return run.kind.load_splits(run.source, str(workdir), multihost.barrier)


def train_count(cfg, workdir: str) -> int:
  """The training examples of the run of `cfg` in `workdir`, counted without training."""
  from medseg_jax.parallel import multihost  # pylint: disable=import-outside-toplevel
  run = run_settings(cfg)
  return run.kind.train_count(run.source, str(workdir), multihost.barrier)


def epoch_plan(cfg, train_examples: int, num_devices: int):
  from medseg_jax.training import setup  # pylint: disable=import-outside-toplevel
  return setup.epoch_plan(run_settings(cfg), train_examples, num_devices)


def class_names(cfg, info: dict) -> list[str]:
  return data_source(cfg).class_names(info["labels"])


def train(cfg, workdir: str, from_scratch: bool = False):
  """--mode=train in this process."""
  from medseg_jax.training import loop  # pylint: disable=import-outside-toplevel
  return loop.train_and_evaluate(run_settings(cfg), str(workdir), parallel(cfg), from_scratch)


def evaluate(cfg, workdir: str, which: str = "latest") -> dict:
  """--mode=evaluate in this process."""
  from medseg_jax.training import modes  # pylint: disable=import-outside-toplevel
  return modes.evaluate_checkpoint(run_settings(cfg), str(workdir), parallel(cfg), which)


def predict(cfg, workdir: str, input_path: str, output: str, which: str = "latest", **kwargs):
  """--mode=predict in this process."""
  from medseg_jax.training import modes  # pylint: disable=import-outside-toplevel
  return modes.predict_checkpoint(run_settings(cfg), str(workdir), parallel(cfg), input_path,
                                  output, which, **kwargs)


def assert_same_predictions(reference, output, volumes: int = 2) -> None:
  """The prediction folder `output` holds the files of `reference` (label maps and
  probabilities of `volumes` volumes), the label maps byte for byte, each with more than
  one label (so misplaced rows or windows would show), the probabilities within 1e-6."""
  names = sorted(os.listdir(reference))
  assert names == sorted(os.listdir(output)) and len(names) == 2 * volumes
  for name in names:
    theirs, ours = nib.load(reference / name), nib.load(output / name)
    if name.endswith("_probs.nii.gz"):
      np.testing.assert_allclose(ours.get_fdata(), theirs.get_fdata(), atol=1e-6)
      continue
    labels = np.asarray(theirs.dataobj)
    assert len(np.unique(labels)) > 1
    np.testing.assert_array_equal(np.asarray(ours.dataobj), labels)
    assert (output / name).read_bytes() == (reference / name).read_bytes()


SIGNAL_PLUGIN = '''
import os
import signal


class SignalAt:
  """Sends {signal} to process {process} of the run once checkpoint {step} has been
  started (orbax has finished every earlier one by then): once per workdir, so that the
  same command restarted runs on."""

  all_processes = True

  def __init__(self, context):
    self.process = context.process_index
    self.done = os.path.join(context.workdir, "signalled_{signal}_{step}")

  def on_checkpoint(self, step, path):
    if step == {step} and self.process == {process} and not os.path.exists(self.done):
      open(self.done, "w").close()
      os.kill(os.getpid(), signal.{signal})
'''


def signal_at(directory, name: str, step: int, process: int = 0) -> str:
  """A plugin file in `directory` that sends the signal `name` (e.g. "SIGKILL") to
  process `process` of a run right after it starts checkpoint `step`: a deterministic
  point for a crash or a preemption. Returns the override that names it."""
  path = os.path.join(str(directory), f"signal_{name}_{step}_{process}.py")
  with open(path, "w") as f:
    f.write(SIGNAL_PLUGIN.format(signal=name, step=step, process=process))
  return f"--config.train.plugins=('{path}:SignalAt',)"
