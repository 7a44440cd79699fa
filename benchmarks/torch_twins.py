"""medseg_jax's networks in PyTorch, with their weights copied from Flax params, and
MONAI's DynUNet set as close to the 3D U-Net as it goes.

2D: the U-Net and FCN-8s of medseg_jax/models (the U-Net of benchmarks/vs_pytorch.py), NCHW,
no norm, evaluation mode. Flax kernels are [kh, kw, in, out]; PyTorch's convolution
weights are [out, in, kh, kw] and its transposed convolution weights [in, out, kh, kw],
applied with the kernel flipped where Flax's `nn.ConvTranspose` (transpose_kernel=False)
and the U-Net's up-convolution apply it as it is stored.
3D: UNet3D of models/unet3d.py (`unet3d`, NCDHW, instance norm; its weights by
`copy_unet3d_weights`) and `dynunet3d`, for benchmarks/vs_monai3d.py and gpu_suite.py.
Needs the benchmark requirements (benchmarks/requirements.txt).
"""

import numpy as np

import vs_pytorch

NEGATIVE_SLOPE = 0.01  # models/unet3d.py
FLAX_EPS = 1e-6  # nn.InstanceNorm's epsilon


# -- 2D -----------------------------------------------------------------------------
def _conv(layer, params: dict) -> None:
  """Copies a Flax nn.Conv's kernel and bias into a torch Conv2d."""
  import torch
  kernel = np.asarray(params["kernel"]).transpose(3, 2, 0, 1)
  layer.weight.data = torch.from_numpy(np.ascontiguousarray(kernel))
  layer.bias.data = torch.from_numpy(np.array(params["bias"]))


def _conv_transpose(layer, params: dict) -> None:
  """Copies a Flax transposed convolution (kernel not flipped) into a torch
  ConvTranspose2d, which flips it: the same output either way."""
  import torch
  kernel = np.asarray(params["kernel"])[::-1, ::-1].transpose(2, 3, 0, 1)
  layer.weight.data = torch.from_numpy(np.ascontiguousarray(kernel))
  layer.bias.data = torch.from_numpy(np.array(params["bias"]))


def unet(params: dict, depth: int, base: int, num_classes: int):
  """vs_pytorch's U-Net with the weights of medseg_jax's UNet `params`."""
  if num_classes != vs_pytorch.NUM_CLASSES:
    raise ValueError(f"the PyTorch U-Net has {vs_pytorch.NUM_CLASSES} classes")
  model = vs_pytorch.torch_unet(depth, base)
  blocks = [model.down[level] for level in range(depth)] + [model.bottom] + list(
      model.up_blocks)
  for i, block in enumerate(blocks):  # ConvBlock_i: encoder, bottom, then decoder
    _conv(block[0], params[f"ConvBlock_{i}"]["Conv_0"])
    _conv(block[2], params[f"ConvBlock_{i}"]["Conv_1"])
  for i, up in enumerate(model.ups):  # ConvTranspose_0 is the deepest
    _conv_transpose(up, params[f"ConvTranspose_{i}"])
  _conv(model.head, params["Conv_0"])
  return model.eval()


def fcn(params: dict, base: int, fc: int, num_classes: int):
  """medseg_jax's FCN-8s in PyTorch with the weights of its Flax `params`."""
  import torch
  from torch import nn
  blocks, widths = (2, 2, 3, 3, 3), (1, 2, 4, 8, 8)  # models/fcn.py: VGG16_BLOCKS, _WIDTHS

  class FCN(nn.Module):
    """'SAME' convolutions, 2x2 max-pools, fc6/fc7 as convolutions, three up-scorings."""

    def __init__(self):
      super().__init__()
      layers, cin = [], 1
      for convs, mult in zip(blocks, widths):
        stage = []
        for _ in range(convs):
          stage += [nn.Conv2d(cin, base * mult, 3, padding=1), nn.ReLU(inplace=True)]
          cin = base * mult
        layers.append(nn.Sequential(*stage, nn.MaxPool2d(2)))
      self.stages = nn.ModuleList(layers)
      self.fc6 = nn.Conv2d(cin, fc, 7, padding=3)
      self.fc7 = nn.Conv2d(fc, fc, 1)
      self.score_fr = nn.Conv2d(fc, num_classes, 1)
      self.score_pool4 = nn.Conv2d(8 * base, num_classes, 1)
      self.score_pool3 = nn.Conv2d(4 * base, num_classes, 1)
      # lax.conv_transpose's 'SAME' pads k + s - 2 split evenly: PyTorch's padding
      # (k - s) / 2 gives the same output, `s` times the input's size.
      self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1)
      self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2,
                                              padding=1)
      self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, padding=4)

    def forward(self, x):
      pools = []
      for stage in self.stages:
        x = stage(x)
        pools.append(x)
      x = torch.relu(self.fc7(torch.relu(self.fc6(pools[4]))))
      score = self.upscore2(self.score_fr(x)) + self.score_pool4(pools[3])
      score = self.upscore_pool4(score) + self.score_pool3(pools[2])
      return self.upscore8(score)

  model = FCN()
  convs = [layer for stage in model.stages for layer in stage if isinstance(layer, nn.Conv2d)]
  for i, layer in enumerate(convs):
    _conv(layer, params[f"Conv_{i}"])
  for name in ("fc6", "fc7", "score_fr", "score_pool4", "score_pool3"):
    _conv(getattr(model, name), params[name])
  for name in ("upscore2", "upscore_pool4", "upscore8"):
    _conv_transpose(getattr(model, name), params[name])
  return model.eval()


def predictor(model):
  """images float32 [B,H,W,C] (numpy) -> softmax probabilities [B,H,W,K] (numpy)."""
  import torch

  def probabilities(images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.inference_mode():
      return torch.softmax(model(x), dim=1).permute(0, 2, 3, 1).numpy()

  return probabilities


# -- 3D -----------------------------------------------------------------------------
def level_factors(depth: int, pooling=()) -> tuple:
  """Each level's (D,H,W) pooling factors: `pooling`, or 2 along every axis when empty."""
  return tuple(tuple(int(f) for f in level) for level in pooling) or ((2, 2, 2),) * depth


def level_widths(depth: int, base: int, max_features: int = 0) -> list[int]:
  """Each level's channels, full resolution to bottleneck: doubling from `base`, capped at
  `max_features` (0: no cap)."""
  widths = [base * 2**level for level in range(depth + 1)]
  return [min(w, max_features) for w in widths] if max_features else widths


def unet3d(depth: int, base: int, num_classes: int = 2, channels: int = 1, pooling=(),
           max_features: int = 0):
  """medseg_jax's UNet3D layer for layer in PyTorch (NCDHW), random weights: each level
  max-pooled and up-convolved by its `pooling` factors (kernel = stride = the factors),
  widths capped at `max_features`, as `model.pooling` and `model.max_features` set it."""
  from torch import nn
  factors, widths = level_factors(depth, pooling), level_widths(depth, base, max_features)

  def block(cin, cout):
    layers = []
    for c in (cin, cout):
      layers += [nn.Conv3d(c, cout, 3, padding=1),
                 nn.InstanceNorm3d(cout, eps=FLAX_EPS, affine=True),
                 nn.LeakyReLU(NEGATIVE_SLOPE)]
    return nn.Sequential(*layers)

  class UNet3D(nn.Module):

    def __init__(self):
      super().__init__()
      self.blocks = nn.ModuleList(  # encoder, bottom, decoder: ConvBlock3D_0, _1, ...
          [block(cin, cout) for cin, cout in zip([channels] + widths, widths)]
          + [block(2 * widths[i], widths[i]) for i in reversed(range(depth))])
      self.ups = nn.ModuleList(  # ConvTranspose_0 is the deepest
          nn.ConvTranspose3d(widths[i + 1], widths[i], factors[i], stride=factors[i])
          for i in reversed(range(depth)))
      self.head = nn.Conv3d(widths[0], num_classes, 1)
      self.pools = nn.ModuleList(nn.MaxPool3d(f, stride=f) for f in factors)

    def forward(self, x):
      import torch
      skips = []
      for blk, pool in zip(self.blocks[:depth], self.pools):
        x = blk(x)
        skips.append(x)
        x = pool(x)
      x = self.blocks[depth](x)
      for up, blk, skip in zip(self.ups, self.blocks[depth + 1:], reversed(skips)):
        x = blk(torch.cat([skip, up(x)], dim=1))
      return self.head(x)

  return UNet3D()


def copy_unet3d_weights(model, params: dict) -> None:
  """Sets the weights of `unet3d`'s `model` to those of UNet3D's Flax `params`."""
  import torch
  as_tensor = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable copy
  def conv(layer, p, transposed=False):
    kernel = np.asarray(p["kernel"])
    if transposed:  # the up-convolution applies kernel[1 - i]; torch's flips it back
      kernel = kernel[::-1, ::-1, ::-1].transpose(3, 4, 0, 1, 2)
    else:
      kernel = kernel.transpose(4, 3, 0, 1, 2)
    layer.weight.data, layer.bias.data = as_tensor(kernel), as_tensor(p["bias"])
  for i, blk in enumerate(model.blocks):
    p = params[f"ConvBlock3D_{i}"]
    for j in range(2):
      conv(blk[3 * j], p[f"Conv_{j}"])
      norm = p[f"InstanceNorm_{j}"]
      blk[3 * j + 1].weight.data = as_tensor(norm["scale"])
      blk[3 * j + 1].bias.data = as_tensor(norm["bias"])
  for i, up in enumerate(model.ups):
    conv(up, params[f"ConvTranspose_{i}"], transposed=True)
  conv(model.head, params["Conv_0"])


def dynunet3d(depth: int, base: int, num_classes: int = 2, pooling=(),
              max_features: int = 0):
  """MONAI's DynUNet as close to UNet3D as it goes (nnU-Net's blocks): each lower level's
  stride and up-sampling kernel are that level's pooling factors."""
  from monai.networks.nets import DynUNet
  factors = [list(f) for f in level_factors(depth, pooling)]
  return DynUNet(spatial_dims=3, in_channels=1, out_channels=num_classes,
                 kernel_size=[3] * (depth + 1), strides=[1] + factors,
                 upsample_kernel_size=factors,
                 filters=level_widths(depth, base, max_features),
                 norm_name=("INSTANCE", {"affine": True}),
                 act_name=("leakyrelu", {"inplace": True, "negative_slope": NEGATIVE_SLOPE}),
                 res_block=False, deep_supervision=False)
