"""--mode=predict --model=FILE|NAME: prediction from a model file, with no workdir, dataset
or config file, on this machine's devices.

Two engines run the same network: `jax` builds it from the file's config and parameters
and runs the compiled predict step over every device, as predicting from the run's
checkpoint does, so it writes the same bytes and runs on GPUs; `onnxruntime` runs the
file's ONNX graph on the CPU in one process. `auto`, the command's default, picks
(`choose_engine`).
"""

import copy
import dataclasses
import functools
import importlib.util
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
from absl import logging

from medseg_jax import components, config_schema, files, kinds, modelfile, models, zoo
from medseg_jax.data import targets
from medseg_jax.errors import ConfigError, MedsegError
from medseg_jax.evaluation import postprocess, predict
from medseg_jax.export import onnx_graph
from medseg_jax.parallel import strategies
from medseg_jax.training import setup, step
from medseg_jax.training.state import TrainState

# model.json's keys that prediction reads.
_NEEDED = ("modalities", "num_classes", "channels", "classes", "preprocessing")


@dataclasses.dataclass(frozen=True)
class Model:
  """A model file read and checked, with the config to predict with on this machine."""

  file: modelfile.ModelFile
  cfg: ml_collections.ConfigDict   # the saved config; parallel.* for this machine
  info: dict                       # model.json

  @property
  def probabilities(self) -> Callable:
    """`(path, run) -> probabilities` of a new volume, prepared as model.json records it
    (3D: with the sliding windows of its config, a global batch of windows over every
    device)."""
    kind = kinds.from_config(self.cfg).for_model(self.info)
    return kind.probabilities(self.info, setup.eval_batch(self.cfg, jax.device_count()))


def load(spec: str, models_dir: str | None = None, engine: str = "jax") -> Model:
  """The single model `spec` names (a file, or a model NAME in the zoo); see `load_all`."""
  models = load_all(spec, models_dir, engine)
  if len(models) > 1:
    raise MedsegError(f"{spec}: an ensemble of {len(models)} models, not one")
  return models[0]


def load_all(spec: str, models_dir: str | None = None, engine: str = "jax") -> list[Model]:
  """The models `spec` names (a file, or a model NAME in the zoo): one, or every member of
  an ensemble file; every member checked, and `engine` checked to be able to run each.
  Reads files only (nothing is written), and starts no JAX backend: the process group may
  start after it."""
  return [_model(file, engine) for file in modelfile.read(zoo.resolve(spec, models_dir))
          .member_files()]


def _model(file: modelfile.ModelFile, engine: str) -> Model:
  path = file.path
  info = file.json(modelfile.MODEL)
  missing = [k for k in _NEEDED if k not in info]
  if missing:
    raise MedsegError(f"{path}: {modelfile.MODEL} lacks {', '.join(missing)} (not written "
                      "by medseg_jax's export)")
  cfg = config_schema.config_from_saved(file.json(modelfile.CONFIG), f"{path}: {modelfile.CONFIG}")
  _for_this_machine(cfg)
  if engine == "onnxruntime":
    _check_onnx(file, info)
  return Model(file=file, cfg=cfg, info=info)


def _for_this_machine(cfg: ml_collections.ConfigDict) -> None:
  """Every device of this machine (of every process, when several run), whatever the
  training run used; a strategy of the user's own, not carried by the file, gives way to
  the default one (any strategy computes the same probabilities)."""
  cfg.parallel.num_devices = 0
  if cfg.parallel.strategy not in strategies.STRATEGIES:
    default = config_schema.base_config().parallel.strategy
    logging.info("Predicting with the %s strategy (the run's %s is not in the model file)",
                 default, cfg.parallel.strategy)
    cfg.parallel.strategy = default


def _check_onnx(file: modelfile.ModelFile, info: dict) -> None:
  """The file carries a graph (ONNX Runtime itself is looked for when its session starts,
  before anything is written: it is the one part of the extra prediction needs); if not,
  the error says why, as the export recorded it."""
  if file.onnx is None:
    why = info.get("no_onnx_graph") or "its export recorded no reason"
    raise MedsegError(f"{file.path}: no ONNX graph ({modelfile.ONNX}) in the model file: "
                      f"{why}; use --engine=jax")


def choose_engine(requested: str, model: Model, processes: int, platform: str) -> str:
  """The engine that runs `model`: `requested` unless it is "auto", which picks ONNX
  Runtime for one process on a CPU when the file has a graph and onnxruntime is installed
  (faster than XLA's CPU convolutions, BENCHMARKS.md), and JAX otherwise (accelerators,
  several processes: every device)."""
  if requested != "auto":
    return requested
  reasons = {"several processes": processes > 1, f"a {platform} backend": platform != "cpu",
             "no ONNX graph in the file": model.file.onnx is None,
             "onnxruntime is not installed": importlib.util.find_spec("onnxruntime") is None}
  why = [reason for reason, holds in reasons.items() if holds]
  engine = "jax" if why else "onnxruntime"
  logging.info("--engine=auto: %s (%s)", engine,
               ", ".join(why) if why else "one process on a CPU, the file has an ONNX graph")
  return engine


def predict_files(model: "Model | Sequence[Model]", input_path: str, output: str,
                  engine: str = "jax", overwrite: bool = False, probabilities: bool = False
                  ) -> list[tuple[str, str | None]]:
  """Label maps (and probabilities) of every NIfTI volume under `input_path`, from one
  model or an ensemble (a sequence of models: the mean of their probabilities in each
  volume's own grid, so 2D and 3D models mix), each run by the `engine` of
  `choose_engine`; the first model's post-processing. Every input is checked before
  anything is computed or written."""
  models = [model] if isinstance(model, Model) else list(model)
  check_ensemble(models)
  engines = [choose_engine(engine, m, jax.process_count(), jax.default_backend())
             for m in models]
  if "onnxruntime" in engines and jax.process_count() > 1:
    raise ConfigError("--engine=onnxruntime runs in one process; start one, or use "
                      "--engine=jax")
  planned = predict.plan(input_path, output, models[0].info, overwrite, probabilities)
  runs = [_onnx_run(m) if e == "onnxruntime" else _jax_run(m) for m, e in zip(models, engines)]

  def mean_probabilities(path: str, _) -> np.ndarray:
    total = models[0].probabilities(path, runs[0])
    for m, run in zip(models[1:], runs[1:]):
      total = total + m.probabilities(path, run)
    return total if len(models) == 1 else total / np.float32(len(models))
  predict.predict(mean_probabilities, planned, None,
                  postprocess.from_config(models[0].cfg.evaluation),
                  targets.from_info(models[0].info).labels)
  return [outputs for _, outputs in planned]


def check_ensemble(models: list[Model]) -> None:
  """Models averaged together must read the same modalities and predict the same classes."""
  mismatch = modelfile.ensemble_mismatch([(m.file.path, m.info) for m in models])
  if mismatch:
    raise ConfigError(mismatch)


def _jax_run(model: Model) -> predict.Run:
  """The compiled predict step over every device with the file's parameters, as
  `training.modes` runs it with a checkpoint's."""
  cfg = model.cfg
  network_cfg = copy.deepcopy(cfg.model)
  network_cfg.name = network_spec(model.file, cfg.model.name)
  par = strategies.make_parallel(cfg.parallel.strategy, cfg.parallel.num_devices)
  network = models.build_model(network_cfg, model.info["num_classes"], cfg.data.image_size,
                               par.bn_axis_name)
  variables = model.file.variables()
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     model_state=variables["model_state"], opt_state=(),
                     apply_fn=network.apply, tx=optax.identity())
  predict_fn = functools.partial(step.predict_step, outputs=targets.from_info(model.info))
  return predict.mesh_run(par, par.predict_step(predict_fn), par.put_state(state),
                          setup.eval_batch(cfg, par.num_devices))


def _onnx_run(model: Model) -> predict.Run:
  session = onnx_graph.session(model.file.onnx)
  batch = setup.eval_batch(model.cfg, 1)
  return lambda slices: onnx_graph.run(session, slices, batch)


def network_spec(file: modelfile.ModelFile, name: str) -> str:
  """`model.name` for a network the file carries: its source written to this user's cache,
  in a directory named by its SHA-256 (written once, read by every later prediction);
  `name` itself when the network is a built-in."""
  carried = file.network_source()
  if carried is None:
    return name
  filename, source = carried
  digest = modelfile.sha256(source)
  path = files.user_cache("networks", digest, filename)
  if not (os.path.isfile(path) and components.file_sha256(path) == digest):
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
      f.write(source)
  return f"{path}:{name.rpartition(':')[2]}"

