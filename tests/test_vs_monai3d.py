"""benchmarks/vs_monai3d.py's comparisons hold: the PyTorch twin of UNet3D
(benchmarks/torch_twins.py), given the Flax weights, computes JAX's probabilities
(per-level anisotropic pooling and capped widths included); the DynUNet it is measured
against pools by the same factors; `sliding_window` stitches a volume as MONAI's
`sliding_window_inference` does with the same network, windows and importance map; and
its PyTorch loss is `losses.dice_ce_loss`."""

import importlib.util
import os

import jax
import numpy as np
import pytest

import helpers
from medseg_jax.evaluation import sliding_window
from medseg_jax.models.unet3d import UNet3D
from medseg_jax.training import losses

torch = pytest.importorskip("torch")
inferers = pytest.importorskip("monai.inferers")
monai_utils = pytest.importorskip("monai.data.utils")

DEPTH, BASE, PATCH = 2, 4, (8, 8, 8)


def _bench():
  path = os.path.join(helpers.REPO, "benchmarks", "vs_monai3d.py")
  spec = importlib.util.spec_from_file_location("vs_monai3d", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _network(model=None, patch=PATCH):
  """(UNet3D, random params of its shapes: kernels scaled by fan-in, norm scales near 1,
  biases near 0), drawn with numpy (initialising the network would compile for seconds)."""
  model = model or UNet3D(num_classes=2, depth=DEPTH, base_features=BASE)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          np.zeros((1,) + patch + (1,), np.float32))["params"]
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape)
    name = path[-1].key
    if name == "kernel":
      return (noise / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)
    return ((1.0 if name == "scale" else 0.0) + 0.1 * noise).astype(np.float32)

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def _twin(bench, params):
  twin = bench.torch_twins.unet3d(DEPTH, BASE)
  bench.torch_twins.copy_unet3d_weights(twin, jax.tree.map(np.asarray, params))
  return twin.eval()


def test_torch_twin_gives_the_probabilities_of_unet3d():
  bench = _bench()
  model, params = _network()
  images = np.random.default_rng(0).normal(size=(2, 8, 12, 16, 1)).astype(np.float32)
  expected = np.asarray(jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)))(
      params, images))
  got = bench.torch_probabilities(_twin(bench, params))(images)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, atol=2e-5)
  assert sum(p.numel() for p in bench.torch_twins.unet3d(DEPTH, BASE).parameters()) == sum(
      p.size for p in jax.tree.leaves(params))


def test_anisotropic_capped_twin_gives_the_probabilities_of_unet3d():
  """Per-level factors that differ by axis and by level, and widths capped (4, 6, 6)."""
  bench = _bench()
  pooling, cap = ((2, 2, 1), (2, 1, 2)), 6
  model, params = _network(UNet3D(num_classes=2, depth=2, base_features=BASE,
                                  pooling=pooling, max_features=cap), (4, 4, 4))
  images = np.random.default_rng(4).normal(size=(2, 8, 12, 4, 1)).astype(np.float32)
  expected = np.asarray(jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)))(
      params, images))
  twin = bench.torch_twins.unet3d(2, BASE, pooling=pooling, max_features=cap)
  bench.torch_twins.copy_unet3d_weights(twin, jax.tree.map(np.asarray, params))
  got = bench.torch_probabilities(twin.eval())(images)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, atol=bench.TOLERANCE)
  assert sum(p.numel() for p in twin.parameters()) == sum(
      p.size for p in jax.tree.leaves(params))


def test_dynunet_pools_by_the_same_factors_without_biases():
  """DynUNet of the same factors and widths keeps the input's shape (W = 2 is halved only
  once: by 2 at every level its skips would not fit) and has the twin's parameters less
  the biases of its convolutions (its output layer keeps its bias)."""
  twins = _bench().torch_twins
  pooling, cap = ((2, 2, 1), (2, 1, 2)), 6
  net = twins.dynunet3d(2, BASE, pooling=pooling, max_features=cap).eval()
  twin = twins.unet3d(2, BASE, pooling=pooling, max_features=cap)
  with torch.inference_mode():
    assert net(torch.zeros(1, 1, 8, 12, 2)).shape == (1, 2, 8, 12, 2)
  biases = sum(m.bias.numel() for m in twin.modules()
               if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))
               and m is not twin.head)
  count = lambda m: sum(p.numel() for p in m.parameters())
  assert count(net) == count(twin) - biases


def test_sliding_window_equals_monai_with_the_same_network_and_map():
  """Windows flush with the far border, an axis shorter than the patch (padded), a last
  batch of windows that is not full."""
  bench = _bench()
  twin = _twin(bench, _network()[1])
  volume = np.random.default_rng(2).normal(size=(19, 13, 6, 1)).astype(np.float32)
  weights = sliding_window.gaussian_map(PATCH, 0.125)
  ours = sliding_window.sliding_window(volume, bench.torch_probabilities(twin), PATCH,
                                       overlap=0.5, gaussian_sigma=0.125, batch=3)
  with torch.inference_mode():
    theirs = inferers.sliding_window_inference(
        bench.to_torch(volume[None]), PATCH, 3, lambda x: torch.softmax(twin(x), dim=1),
        overlap=0.5, mode="gaussian", roi_weight_map=torch.from_numpy(
            weights.astype(np.float32)))
  np.testing.assert_allclose(ours, np.moveaxis(theirs[0].numpy(), 0, -1), atol=1e-6)


def test_monai_gaussian_is_ours_up_to_its_scale_above_the_floor():
  """The same sigma (a share of the patch per axis) and centre: MONAI's map divided by its
  maximum is ours wherever neither is floored."""
  patch = (8, 12, 16)
  theirs = monai_utils.compute_importance_map(patch, mode="gaussian",
                                              sigma_scale=0.125).numpy()
  ours = sliding_window.gaussian_map(patch, 0.125, floor=0.0)
  theirs = theirs / theirs.max()
  above = (ours > 1e-2) & (theirs > 1e-2)
  assert above.sum() > 100
  np.testing.assert_allclose(theirs[above], ours[above], rtol=1e-5)


def test_torch_loss_is_dice_ce_loss():
  bench = _bench()
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 4, 6, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 4, 6, 8))
  expected = float(np.mean(losses.dice_ce_loss(logits, labels)))
  got = bench.torch_dice_ce(bench.to_torch(logits), torch.from_numpy(labels)).item()
  assert got == pytest.approx(expected, rel=1e-5)
