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
import importlib
import logging
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np

from medseg_jax.errors import MedsegError, first_line

# jax2onnx 0.17.1 declares orbax-checkpoint<0.11.37 while the project pins 0.12.8, so the
# extra is installed in two steps, the second without dependencies.
EXTRA_INSTALL = ("python3 -m pip install -r requirements-onnx.txt && "
                 "python3 -m pip install --no-deps -r requirements-onnx-nodeps.txt")
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "B"
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
  and any batch size B."""
  jax2onnx = _import("jax2onnx", "ONNX export")
  _import("onnx", "ONNX export")
  shape = tuple(int(n) for n in image_shape)
  try:
    with _quiet(_CONVERTER_LOGGERS):
      model = jax2onnx.to_onnx(probabilities, [(BATCH_DIM, *shape)],
                               model_name="medseg_jax", return_mode="proto",
                               input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    graph = model.SerializeToString()  # a ValueError past protobuf's 2 GiB
  except MedsegError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a user's network may trace anything)
    raise MedsegError(f"ONNX export of the network on images [{BATCH_DIM},"
                      f"{','.join(map(str, shape))}] failed: {type(e).__name__}: "
                      f"{first_line(e)}") from e
  return graph


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
  to the session `sess` in chunks of at most `batch` images."""
  images = np.asarray(images, np.float32)
  expected = sess.get_inputs()[0].shape[1:]
  if list(images.shape[1:]) != list(expected):
    raise MedsegError(f"images of shape {list(images.shape)}: the ONNX graph takes "
                      f"[{BATCH_DIM},{','.join(str(n) for n in expected)}]")
  if batch < 1:
    raise ValueError(f"batch={batch}: at least 1 image per run")
  if not len(images):
    return np.zeros((0,) + tuple(sess.get_outputs()[0].shape[1:]), np.float32)
  out = [sess.run([OUTPUT_NAME], {INPUT_NAME: images[start:start + batch]})[0]
         for start in range(0, len(images), batch)]
  return np.concatenate(out).astype(np.float32, copy=False)
