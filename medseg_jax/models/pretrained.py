"""ImageNet VGG-16 weights into the FCN encoder (numpy only; nothing is downloaded).

Two files are read, both of which the user downloads: MatConvNet's
`imagenet-vgg-verydeep-16.mat` (simplenn: a `layers` cell array of structs with `name`
and `weights` {W [H, W, in, out], b}; RGB input) and Keras'
`vgg16_weights_tf_dim_ordering_tf_kernels.h5` (groups `block1_conv1`..`block5_conv3`,
`fc1`, `fc2`; BGR input, 'caffe' preprocessing). Both keep kernels as [H, W, in, out],
Flax's layout. The 13 convolutions go to the FCN's `Conv_0`..`Conv_12`; the file's fc6
(Keras fc1, a Dense over the flattened 7x7 map, reshaped to a 7x7 kernel) and fc7 go to
`fc6`/`fc7` when the file's fc width equals `model.fc_features`; the score and upscore
heads, and norm layers, keep their random initialisation.

The first kernel: our inputs are z-scored MRI channels, not RGB photographs. A z-scored
value x is read as the pixel mean_c + std_c * x of every colour channel c (ImageNet
pixel statistics); after the file's own mean subtraction the network sees std_c * x, so
a one-channel image x gives conv1_1 the response of the kernel sum_c std_c * W[:, :, c].
For n input channels that kernel is divided by n and repeated per channel, so n copies
of the same image give the same response. The mean cancels; the bias is unchanged. The
same rule holds for any channel count, 3 included: MRI modalities are not colours.
"""

import dataclasses
import os
import re

import numpy as np
from absl import logging

from medseg_jax.errors import ConfigError

MAT_HEADER = b"MATLAB 5.0 MAT-file"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# ImageNet pixel statistics (0-255), RGB order.
IMAGENET_MEAN_RGB = np.array([123.68, 116.78, 103.94])
IMAGENET_STD_RGB = np.array([58.395, 57.12, 57.375])
BLOCKS = (2, 2, 3, 3, 3)
CONV_NAMES = tuple(f"conv{b + 1}_{i + 1}" for b, n in enumerate(BLOCKS) for i in range(n))
_KERAS_NAMES = dict(zip(CONV_NAMES, (f"block{b + 1}_conv{i + 1}" for b, n in enumerate(BLOCKS)
                                     for i in range(n))), fc6="fc1", fc7="fc2")
SOURCES = ("download MatConvNet's imagenet-vgg-verydeep-16.mat (MatConvNet pretrained-models "
           "page) or Keras' vgg16_weights_tf_dim_ordering_tf_kernels.h5 yourself, or set "
           "model.init_from=\"\" to train from scratch")


@dataclasses.dataclass
class VGGWeights:
  """A VGG-16's layers as [H, W, in, out] kernels and biases, first kernel in RGB order."""

  path: str
  layers: dict        # conv1_1..conv5_3, and fc6/fc7 when the file has them: (W, b)
  source_order: str   # "RGB" (MatConvNet) or "BGR" (Keras), as the file's first kernel was


def file_format(path: str, key: str = "model.init_from") -> str:
  """'mat' or 'h5' from the extension, confirmed by the file's first bytes."""
  if not os.path.isfile(path):
    raise ConfigError(f"{key}={path}: no such file; {SOURCES}")
  ext = os.path.splitext(path)[1].lower()
  with open(path, "rb") as f:
    head = f.read(len(MAT_HEADER))
  if ext == ".mat" and head.startswith(MAT_HEADER):
    return "mat"
  if ext in (".h5", ".hdf5") and head.startswith(HDF5_SIGNATURE):
    return "h5"
  if ext == ".mat" and head.startswith(b"MATLAB 7.3"):
    raise ConfigError(f"{key}={path}: a MATLAB v7.3 file, which scipy cannot read; save it "
                      "with save(..., '-v7')")
  if ext in (".mat", ".h5", ".hdf5"):
    kind = "a MATLAB 5 MAT-file" if ext == ".mat" else "an HDF5 file"
    raise ConfigError(f"{key}={path}: not {kind} (its first bytes are {head[:8]!r})")
  raise ConfigError(f"{key}={path}: not a VGG-16 file (.mat from MatConvNet or .h5 from "
                    "Keras), a model file (--mode=export), nor a run or checkpoint directory")


def read_vgg(path: str) -> VGGWeights:
  """The VGG-16 layers of a MatConvNet .mat or Keras .h5 file."""
  if file_format(path) == "mat":
    layers, order = _read_mat(path), "RGB"
  else:
    layers, order = _read_h5(path), "BGR"
  missing = [name for name in CONV_NAMES if name not in layers]
  if missing:
    raise ConfigError(f"model.init_from={path}: no layer {missing[0]} (a VGG-16 has "
                      f"{', '.join(CONV_NAMES)})")
  if order == "BGR":
    kernel, bias = layers["conv1_1"]
    layers["conv1_1"] = (kernel[:, :, ::-1, :], bias)
  return VGGWeights(path=path, layers=layers, source_order=order)


def _read_mat(path: str) -> dict:
  """MatConvNet simplenn: layers{i}.name and layers{i}.weights = {W, b}."""
  import scipy.io  # pylint: disable=import-outside-toplevel
  try:
    mat = scipy.io.loadmat(path, variable_names=["layers"])
  except Exception as e:  # pylint: disable=broad-except  (scipy raises many kinds)
    raise ConfigError(f"model.init_from={path}: unreadable MAT-file ({e})") from e
  if "layers" not in mat:
    raise ConfigError(f"model.init_from={path}: no 'layers' variable (not a MatConvNet "
                      "simplenn network)")
  wanted = set(CONV_NAMES) | {"fc6", "fc7"}
  layers = {}
  for cell in np.asarray(mat["layers"], dtype=object).ravel():
    layer = np.asarray(cell).ravel()[0] if np.asarray(cell).size else None
    names = layer.dtype.names if layer is not None and layer.dtype.names else ()
    if "name" not in names or "weights" not in names:
      continue
    name = str(np.asarray(layer["name"]).ravel()[0])
    weights = np.asarray(layer["weights"], dtype=object).ravel()
    if name in wanted and weights.size >= 2:
      layers[name] = (np.asarray(weights[0], np.float32),
                      np.asarray(weights[1], np.float32).ravel())
  return layers


def _read_h5(path: str) -> dict:
  """Keras: a group per layer; kernel/bias datasets found by suffix, old or new names."""
  try:
    import h5py  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError(f"model.init_from={path}: reading .h5 files needs h5py "
                      "(pip install h5py)") from e
  layers = {}
  with h5py.File(path, "r") as f:
    root = f["model_weights"] if "model_weights" in f else f
    for ours, theirs in _KERAS_NAMES.items():
      if theirs in root:
        layers[ours] = _h5_kernel_bias(path, root[theirs])
  if "fc6" in layers:  # Dense over the flattened 7x7xC map (channels_last) -> 7x7 conv
    kernel, bias = layers["fc6"]
    channels = layers["conv5_3"][0].shape[-1] if "conv5_3" in layers else 0
    if not channels or kernel.shape[0] != 49 * channels:
      raise ConfigError(f"model.init_from={path}: fc1 has {kernel.shape[0]} inputs, not "
                        f"7x7x{channels}")
    layers["fc6"] = (kernel.reshape(7, 7, channels, kernel.shape[-1]), bias)
  if "fc7" in layers:
    kernel, bias = layers["fc7"]
    layers["fc7"] = (kernel.reshape((1, 1) + kernel.shape), bias)
  return layers


def _h5_kernel_bias(path: str, group) -> tuple:
  found = {}
  def visit(name, obj):
    if not hasattr(obj, "shape"):
      return
    base = re.sub(r"_\d+$", "", name.split("/")[-1].split(":")[0])
    if base == "kernel" or base.endswith("_W"):
      found["W"] = np.asarray(obj, np.float32)
    elif base == "bias" or base.endswith("_b"):
      found["b"] = np.asarray(obj, np.float32)
  group.visititems(visit)
  if len(found) != 2:
    raise ConfigError(f"model.init_from={path}: layer {group.name} has no kernel and bias")
  return found["W"], found["b"]


def grey_kernel(rgb_kernel: np.ndarray, channels: int) -> np.ndarray:
  """The first kernel for `channels` z-scored inputs (module docstring): sum_c std_c W_c,
  divided by the channel count and repeated per channel."""
  grey = np.tensordot(rgb_kernel, IMAGENET_STD_RGB, axes=([2], [0]))  # [H, W, out]
  return np.repeat((grey / channels)[:, :, None, :], channels, axis=2).astype(np.float32)


def into_fcn(vgg: VGGWeights, params: dict, fc_features: int,
             log: bool = True) -> tuple[dict, list, list]:
  """`params` (an FCN's: numpy or jax leaves, or only their shapes) with the VGG layers
  put in; also the names of the layers loaded and of those left as initialised. `log`
  says what was done to the first kernel and to fc6/fc7."""
  info = logging.info if log else lambda *args: None
  params = dict(params)
  targets = list(zip(CONV_NAMES, (f"Conv_{i}" for i in range(len(CONV_NAMES)))))
  fc_width = vgg.layers["fc6"][0].shape[-1] if "fc6" in vgg.layers else None
  if fc_width is not None and fc_width == fc_features and "fc7" in vgg.layers:
    targets += [("fc6", "fc6"), ("fc7", "fc7")]
  elif fc_width is None:
    info("model.init_from=%s has no fc layers (a _notop file): fc6 and fc7 are new", vgg.path)
  else:
    info("model.init_from=%s: fc width %d, model.fc_features=%d: fc6 and fc7 are new",
         vgg.path, fc_width, fc_features)
  for source, target in targets:
    params[target] = _layer(vgg, source, target, params[target], info)
  loaded = [target for _, target in targets]
  return params, loaded, [name for name in params if name not in loaded]


def _layer(vgg: VGGWeights, source: str, target: str, current: dict, info) -> dict:
  kernel, bias = vgg.layers[source]
  in_file, want = list(kernel.shape), tuple(current["kernel"].shape)
  if source == "conv1_1" and kernel.ndim == 4:
    info("%s [%s] (%s) -> %s [%s]: z-scored input read as ImageNet pixels "
         "mean + std * x, kernel = sum_c std_c W_c / %d, repeated per channel",
         source, ",".join(map(str, kernel.shape)), vgg.source_order, target,
         ",".join(map(str, want)), want[2])
    if kernel.shape[2] == 3:
      kernel = grey_kernel(kernel, want[2])
  if tuple(kernel.shape) != want or tuple(bias.shape) != tuple(current["bias"].shape):
    raise ConfigError(f"model.init_from={vgg.path}: layer {source} has kernel "
                      f"{in_file} in the file but {list(want)} in the model "
                      f"({target}; model.base_features and model.fc_features give its widths)")
  dtype = current["kernel"].dtype
  return dict(current, kernel=np.asarray(kernel, dtype), bias=np.asarray(bias, dtype))


def check_fits(path: str, model_name: str) -> None:
  """Checks the file is of a known format and the model can take VGG-16 weights."""
  file_format(path)
  if model_name != "fcn":
    raise ConfigError(f"model.init_from={path}: VGG-16 weights fit model.name=fcn, not "
                      f"{model_name!r}")
