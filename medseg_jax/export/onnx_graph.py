"""The ONNX graph of a network's forward pass, and running it with ONNX Runtime on the CPU.

The graph maps images float32 [B,H,W,C] (input "image"; 3D patches [B,D,H,W,C]) to softmax
probabilities [B,H,W,K] ([B,D,H,W,K]; output "probabilities") for any batch size B; the
parameters are constants
inside it, so the graph alone predicts. jax2onnx converts the traced JAX function, so a
user's network converts like a built-in as long as its operations have an ONNX form.

The ONNX extra is optional: jax2onnx, onnx and onnxruntime are imported inside the
functions that use them, and a missing one is one MedsegError naming EXTRA_INSTALL.
Predicting from a graph needs onnxruntime only.
"""

import contextlib
import dataclasses
import importlib
import logging
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging as absl_logging

from medseg_jax.errors import MedsegError, first_line

# jax2onnx 0.17.1 declares orbax-checkpoint<0.11.37 while the project pins 0.12.8, so the
# extra is installed in two steps, the second without dependencies.
EXTRA_INSTALL = ("python3 -m pip install -r requirements-onnx.txt && "
                 "python3 -m pip install --no-deps -r requirements-onnx-nodeps.txt")
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "B"
FIXED_BATCH = 1  # the batch of a graph that cannot take any
_EXTRA = ("jax2onnx", "onnx", "onnxruntime")
# The converter's loggers: jax2onnx reports each optional plugin it skips (equinox, dm_pix
# not installed) with a traceback, and onnx_ir each shape value it leaves untyped.
_CONVERTER_LOGGERS = ("jax2onnx", "onnx_ir")


def _import(name: str, purpose: str) -> Any:
  """The module `name` of the ONNX extra, or one MedsegError saying how to install it."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise MedsegError(f"{purpose} needs the ONNX extra ({name}: {first_line(e)}); "
                      f"install it with: {EXTRA_INSTALL}") from e


def available() -> bool:
  """Whether the ONNX extra (jax2onnx, onnx, onnxruntime) imports."""
  try:
    for name in _EXTRA:
      importlib.import_module(name)
  except ImportError:
    return False
  return True


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
  """Only errors from the loggers `names` while inside."""
  loggers = [logging.getLogger(name) for name in names]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def forward_graph(probabilities: Callable[[jax.Array], jax.Array],
                  image_shape: tuple[int, ...]) -> bytes:
  """The serialized ONNX model of `probabilities` (images float32 [B,H,W,C] -> softmax
  probabilities [B,H,W,K]) for images of `image_shape` (H, W, C; a 3D patch: D, H, W, C)
  and any batch size B; where a step converts only with every dimension known, for
  batches of FIXED_BATCH images (`run` feeds such a graph accordingly)."""
  jax2onnx = _import("jax2onnx", "ONNX export")
  _import("onnx", "ONNX export")
  shape = tuple(int(n) for n in image_shape)
  try:
    return _convert(jax2onnx, probabilities, (BATCH_DIM, *shape))
  except MedsegError as any_batch:
    # jax2onnx 0.17.1's jax.image.resize wants every dimension known.
    try:
      graph = _convert(jax2onnx, probabilities, (FIXED_BATCH, *shape))
    except MedsegError:
      raise any_batch from None
    absl_logging.warning("The ONNX graph takes %d image(s) per run: %s", FIXED_BATCH,
                         any_batch)
    return graph


def _convert(jax2onnx: Any, probabilities: Callable[[jax.Array], jax.Array],
             input_shape: tuple) -> bytes:
  try:
    with _quiet(_CONVERTER_LOGGERS), _converter_fixes():
      model = jax2onnx.to_onnx(probabilities, [input_shape], model_name="medseg_jax",
                               return_mode="proto", input_names=[INPUT_NAME],
                               output_names=[OUTPUT_NAME])
    return model.SerializeToString()  # a ValueError past protobuf's 2 GiB
  except MedsegError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a user's network may trace anything)
    raise MedsegError(f"ONNX export of the network on images [{BATCH_DIM},"
                      f"{','.join(map(str, input_shape[1:]))}] failed: {type(e).__name__}: "
                      f"{first_line(e)}") from e


# Where jax2onnx 0.17.1 refuses what the JAX and flax functions it stands in for accept,
# its plugins' private methods are wrapped while converting (tests/test_onnx_graph.py
# converts networks that need each wrap, and fails when an upgrade renames them):
# - its flax.linen.max_pool and avg_pool take window_shape, strides and padding by keyword
#   only, where flax's take them by position too (`nn.max_pool(x, (2, 2), (2, 2))`);
# - its jax.image.resize refuses antialias=True, jax.image.resize's default for linear and
#   cubic, which has no effect when every dimension grows (upsampling in a decoder);
# - it resizes volumes [B,D,H,W,C] as they are, and ONNX Runtime's linear Resize of 5-D
#   tensors wants the two outer dimensions kept: volumes are resized channels first.
def _by_position(plugin: type, method: str) -> Any:
  make_patch = getattr(plugin, method)
  def make(original):
    by_keyword = make_patch(original)
    def pool(inputs, window_shape, strides=None, padding="VALID", **kwargs):
      return by_keyword(inputs, window_shape=window_shape, strides=strides, padding=padding,
                        **kwargs)
    return pool
  return staticmethod(make)


def _upsampling_without_antialias(plugin: type, method: str) -> Any:
  lower = vars(plugin)[method]
  def lower_upsampling(self, ctx, eqn):
    params = eqn.params
    if params.get("antialias") and all(
        out >= size for out, size in zip(params["shape"], eqn.invars[0].aval.shape)):
      eqn = eqn.replace(params=dict(params, antialias=False))
    return lower(self, ctx, eqn)
  return lower_upsampling


def _volumes_channels_first(plugin: type, method: str) -> Any:
  binding_specs = getattr(plugin, method)
  def specs():
    return [dataclasses.replace(spec, make_value=_resize_channels_first(spec.make_value))
            if getattr(spec, "attr", None) == "resize" else spec for spec in binding_specs()]
  return staticmethod(specs)


def _resize_channels_first(make_value: Callable) -> Callable:
  def make(original):
    resize = make_value(original)
    def resize_volumes(image, shape, method="linear", antialias=True, precision=None):
      if image.ndim != 5 or shape[0] != image.shape[0] or shape[-1] != image.shape[-1]:
        return resize(image, shape, method, antialias, precision)
      first = (0, 4, 1, 2, 3)
      resized = resize(jax.numpy.transpose(image, first), tuple(shape[i] for i in first),
                       method, antialias, precision)
      return jax.numpy.transpose(resized, (0, 2, 3, 4, 1))
    return resize_volumes
  return make


_CONVERTER_FIXES = (
    ("jax2onnx.plugins.flax.linen.max_pool", "MaxPoolPlugin", "_make_patch", _by_position),
    ("jax2onnx.plugins.flax.linen.avg_pool", "AvgPoolPlugin", "get_monkey_patch",
     _by_position),
    ("jax2onnx.plugins.jax.image.resize", "ImageResizePlugin", "lower",
     _upsampling_without_antialias),
    ("jax2onnx.plugins.jax.image.resize", "ImageResizePlugin", "binding_specs",
     _volumes_channels_first),
)


@contextlib.contextmanager
def _converter_fixes() -> Iterator[None]:
  """Inside, jax2onnx converts what flax's pooling and jax.image.resize take (above)."""
  replaced = []
  for module, name, method, fix in _CONVERTER_FIXES:
    plugin = getattr(importlib.import_module(module), name, None)
    if plugin is not None and method in vars(plugin):
      replaced.append((plugin, method, vars(plugin)[method]))
      setattr(plugin, method, fix(plugin, method))
  try:
    yield
  finally:
    for plugin, method, original in replaced:
      setattr(plugin, method, original)


def session(graph: bytes, threads: int | None = None) -> Any:
  """An onnxruntime.InferenceSession of `graph` on the CPU, with `threads` threads within
  each operation (default: the cores this process may use)."""
  ort = _import("onnxruntime", "Inference with ONNX Runtime")
  options = ort.SessionOptions()
  # ENABLE_ALL adds the layout optimisations (blocked NCHWc convolutions) to the fusions:
  # a batch of the thesis-size U-Net ran in 2.9 s against 3.5 s with ENABLE_EXTENDED.
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
  options.intra_op_num_threads = threads or _cores()
  options.inter_op_num_threads = 1
  # Threads waiting for work sleep rather than spin: where other work shares the cores,
  # spinning threads take them from it and from each other (a quickstart U-Net batch on 2
  # busy cores: 0.045-0.072 s without spinning, 0.11-0.12 s with).
  options.add_session_config_entry("session.intra_op.allow_spinning", "0")
  options.log_severity_level = 3  # errors only: not the shape-inference warnings per node
  try:
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
  except Exception as e:  # pylint: disable=broad-except  (ORT's own exception types)
    raise MedsegError(f"ONNX Runtime cannot load the graph: {first_line(e)}") from e


def _cores() -> int:
  """The CPU cores this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def run(sess: Any, images: np.ndarray, batch: int) -> np.ndarray:
  """Softmax probabilities float32 [N,H,W,K] of `images` [N,H,W,C] (3D: [N,D,H,W,C]), fed
  to the session `sess` in chunks of at most `batch` images (of exactly its batch, the
  last one padded, for a graph of a fixed batch)."""
  images = np.asarray(images, np.float32)
  graph_batch, *expected = sess.get_inputs()[0].shape
  if list(images.shape[1:]) != list(expected):
    raise MedsegError(f"images of shape {list(images.shape)}: the ONNX graph takes "
                      f"[{graph_batch},{','.join(str(n) for n in expected)}]")
  if batch < 1:
    raise ValueError(f"batch={batch}: at least 1 image per run")
  if not len(images):
    return np.zeros((0,) + tuple(sess.get_outputs()[0].shape[1:]), np.float32)
  fixed = graph_batch if isinstance(graph_batch, int) else None
  step = fixed or batch
  out = []
  for start in range(0, len(images), step):
    chunk = images[start:start + step]
    padded = np.concatenate([chunk, np.zeros((step - len(chunk),) + chunk.shape[1:],
                                             np.float32)]) if fixed else chunk
    out.append(sess.run([OUTPUT_NAME], {INPUT_NAME: padded})[0][:len(chunk)])
  return np.concatenate(out).astype(np.float32, copy=False)
