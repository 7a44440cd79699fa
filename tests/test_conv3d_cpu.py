"""The 3x3x3 convolution with the shifted kernel gradient: its gradients equal those of XLA's
own convolution, and nn.Conv and UNet3D take it only for the convolutions it is made for."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import helpers
from medseg_jax.models import conv3d_cpu
from medseg_jax.models.unet3d import UNet3D

DN = ("NDHWC", "DHWIO", "NDHWC")


def _xla_grads(x, kernel, weights):
  """Gradients of sum(weights * conv(x, kernel)) with XLA's convolution and its own VJP."""
  loss = lambda x, k: jnp.sum(weights * lax.conv_general_dilated(
      x, k, (1, 1, 1), "SAME", dimension_numbers=DN))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)


def _data(shape, cin, cout, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape + (cin,)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 3, cin, cout)).astype(np.float32)
  weights = rng.normal(size=shape + (cout,)).astype(np.float32)
  return x, kernel, weights


@pytest.mark.parametrize("shape,cin,cout", [((2, 4, 5, 6), 3, 4), ((1, 3, 3, 3), 1, 2),
                                            ((2, 8, 2, 4), 5, 7), ((1, 1, 6, 2), 4, 3),
                                            ((2, 6, 6, 6), 16, 8)])
def test_gradients_equal_xla_convolution(shape, cin, cout):
  x, kernel, weights = _data(shape, cin, cout)
  loss = lambda x, k: jnp.sum(weights * conv3d_cpu.conv3x3x3(x, k))
  got = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)
  expected = _xla_grads(x, kernel, weights)
  for g, e in zip(got, expected):
    assert g.shape == e.shape and g.dtype == e.dtype
    scale = float(np.abs(e).max())
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(conv3d_cpu.conv3x3x3(x, kernel), lax.conv_general_dilated(
      x, kernel, (1, 1, 1), "SAME", dimension_numbers=DN), rtol=1e-6, atol=1e-5)


def test_bfloat16_kernel_gradient_keeps_the_kernel_dtype():
  x, kernel, weights = _data((2, 4, 4, 4), 8, 8, seed=1)
  loss = lambda k: jnp.sum(weights * conv3d_cpu.conv3x3x3(
      x.astype(jnp.bfloat16), k).astype(jnp.float32))
  got = jax.grad(loss)(kernel.astype(jnp.bfloat16))
  expected = _xla_grads(x, kernel, weights)[1]
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(np.float32), expected, rtol=0.05,
                             atol=0.02 * float(np.abs(expected).max()))


def _uses_shifted(conv: nn.Module, x) -> bool:
  variables = jax.eval_shape(conv.init, jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(conv.apply)(variables, x)
  return "custom_vjp_call" in str(jaxpr)


@pytest.mark.parametrize("settings,size,channels,taken", [
    (dict(kernel_size=(3, 3, 3), padding="SAME"), 8, 2, True),
    (dict(kernel_size=(3, 3, 3), padding="SAME"), 6, 64, True),
    (dict(kernel_size=(3, 3, 3), padding="SAME"), 5, 64, False),  # below the measured rule
    (dict(kernel_size=(3, 3, 3), padding="SAME"), 8, 1, False),   # one input channel
    (dict(kernel_size=(3, 3, 3), padding="SAME"), 65, 2, False),  # beyond the measured sizes
    (dict(kernel_size=(3, 3, 3), padding="SAME", strides=2), 8, 2, False),
    (dict(kernel_size=(3, 3, 3), padding="VALID"), 8, 2, False),
    (dict(kernel_size=(3, 3, 3), padding="SAME", kernel_dilation=2), 8, 2, False),
    (dict(kernel_size=(1, 1, 1), padding="SAME"), 8, 2, False),
    (dict(kernel_size=(3, 3), padding="SAME"), 8, 2, False),
])
def test_nn_conv_takes_it_only_for_the_convolutions_it_is_made_for(settings, size, channels,
                                                                    taken):
  conv = nn.Conv(4, conv_general_dilated=conv3d_cpu.conv_general_dilated, **settings)
  shape = (1,) + (size,) * (len(settings["kernel_size"])) + (channels,)
  assert _uses_shifted(conv, jax.ShapeDtypeStruct(shape, jnp.float32)) == taken
  assert jax.default_backend() == "cpu"


def test_unet3d_gradients_equal_those_with_xla_convolutions(monkeypatch):
  model = UNet3D(num_classes=3, depth=1, base_features=4)
  rng = np.random.default_rng(2)
  # Level 0 (8x6x8, 2 channels) takes the shifted kernel gradient, the bottleneck
  # (4x3x4) XLA's.
  x = rng.normal(size=(2, 8, 6, 8, 2)).astype(np.float32)
  target = rng.normal(size=(2, 8, 6, 8, 3)).astype(np.float32)
  params = helpers.init_variables(model, x)["params"]
  # A new function for each rule: the rule is read while tracing, and traces are cached.
  loss = lambda: lambda params: jnp.sum(target * model.apply({"params": params}, x))
  assert "custom_vjp_call" in str(jax.make_jaxpr(loss())(params))
  got = jax.jit(jax.grad(loss()))(params)  # one program, not one per operation
  monkeypatch.setattr(conv3d_cpu, "MAX_VOXELS", 0)  # XLA's kernel gradient everywhere
  assert "custom_vjp_call" not in str(jax.make_jaxpr(loss())(params))
  expected = jax.jit(jax.grad(loss()))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    e = dict(jax.tree_util.tree_leaves_with_path(expected))[path]
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(np.abs(e).max()),
                               err_msg=jax.tree_util.keystr(path))
