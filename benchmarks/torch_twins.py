"""medseg_jax's U-Net and FCN-8s in PyTorch, with their weights copied from Flax params.

Layer for layer the networks of medseg_jax/models (the U-Net of benchmarks/vs_pytorch.py),
NCHW, no norm, evaluation mode. Flax kernels are [kh, kw, in, out]; PyTorch's convolution
weights are [out, in, kh, kw] and its transposed convolution weights [in, out, kh, kw],
applied with the kernel flipped where Flax's `nn.ConvTranspose` (transpose_kernel=False)
and the U-Net's up-convolution apply it as it is stored.
Needs the benchmark requirements (benchmarks/requirements.txt).
"""

import numpy as np

import vs_pytorch


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
