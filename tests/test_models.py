"""Model output shapes, parameter counts against hand-computed formulas, bf16 compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

import helpers
from medseg_jax import defaults
from medseg_jax.models import FCN, UNet, build_model
from medseg_jax.errors import ConfigError


def conv(k, cin, cout):
  return k * k * cin * cout + cout


def unet_params(depth, f, cin, classes):
  total, c = 0, cin
  for level in range(depth + 1):
    out = f * 2**level
    total += conv(3, c, out) + conv(3, out, out)
    c = out
  for level in reversed(range(depth)):
    out = f * 2**level
    total += conv(2, c, out) + conv(3, 2 * out, out) + conv(3, out, out)
    c = out
  return total + conv(1, c, classes)


def fcn_params(f, fc, cin, classes):
  total, c, widths = 0, cin, []
  for convs, mult in zip((2, 2, 3, 3, 3), (1, 2, 4, 8, 8)):
    for _ in range(convs):
      total += conv(3, c, f * mult)
      c = f * mult
    widths.append(c)
  total += conv(7, c, fc) + conv(1, fc, fc) + conv(1, fc, classes)
  total += conv(4, classes, classes) + conv(1, widths[3], classes)    # upscore2, score_pool4
  total += conv(4, classes, classes) + conv(1, widths[2], classes)    # upscore_pool4, score_pool3
  return total + conv(16, classes, classes)                          # upscore8


def count(variables):
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("depth,f,cin,classes,size", [(1, 4, 1, 2, 32), (2, 4, 1, 2, 32),
                                                      (4, 64, 4, 3, 64)])
def test_unet_shape_and_parameter_count(depth, f, cin, classes, size):
  model = UNet(num_classes=classes, depth=depth, base_features=f)
  x = jnp.zeros((2, size, size, cin))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert count(variables) == unet_params(depth, f, cin, classes)
  out = jax.eval_shape(model.apply, variables, x)
  assert out.shape == (2, size, size, classes)


def test_unet_full_size_is_the_31m_parameter_network():
  model = UNet(num_classes=2, depth=4, base_features=64)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 1)))
  assert 31.0e6 < count(variables) < 31.1e6


@pytest.mark.parametrize("f,fc,cin,classes,size", [(4, 16, 1, 2, 32), (64, 4096, 3, 21, 64)])
def test_fcn_shape_and_parameter_count(f, fc, cin, classes, size):
  model = FCN(num_classes=classes, base_features=f, fc_features=fc)
  x = jnp.zeros((2, size, size, cin))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert count(variables) == fcn_params(f, fc, cin, classes)
  assert jax.eval_shape(model.apply, variables, x).shape == (2, size, size, classes)


@pytest.mark.parametrize("name", ["unet", "fcn"])
def test_bfloat16_compute_keeps_float32_params(name):
  cfg = defaults.get_config().model
  cfg.name, cfg.base_features, cfg.depth, cfg.fc_features = name, 4, 2, 16
  cfg.compute_dtype = "bfloat16"
  model = build_model(cfg, num_classes=3, image_size=32)
  x = jnp.ones((2, 32, 32, 1))
  variables = helpers.init_variables(model, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  logits = jax.jit(model.apply)(variables, x)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  hlo = jax.jit(model.apply).lower(variables, x).as_text()
  assert "bf16" in hlo  # the convolutions really run in bfloat16


@pytest.mark.parametrize("key,value,size", [("name", "resnet", 32), ("norm", "layer", 32),
                                            ("compute_dtype", "float16", 32), ("name", "unet", 30)])
def test_bad_model_settings_are_config_errors(key, value, size):
  cfg = ml_collections.ConfigDict(defaults.get_config().model.to_dict())
  cfg[key] = value
  with pytest.raises(ConfigError):
    build_model(cfg, num_classes=2, image_size=size)


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_norm_variants_run(norm):
  model = UNet(num_classes=2, depth=2, base_features=4, norm=norm)
  x = jnp.ones((2, 32, 32, 1))
  variables = helpers.init_variables(model, x)
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  out = apply(variables, x, train=True, mutable=("batch_stats",))[0] if norm == "batch" \
      else apply(variables, x)
  assert out.shape == (2, 32, 32, 2)


def test_upconv_is_flax_conv_transpose_with_the_same_parameters():
  from medseg_jax.models.unet import UpConv2x2
  x = jax.random.normal(jax.random.key(1), (2, 5, 6, 3))
  reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2))
  variables = reference.init(jax.random.key(0), x)
  variables["params"]["bias"] = jnp.arange(4.0)
  expected = reference.apply(variables, x)
  got = UpConv2x2(4).apply(variables, x)
  assert got.shape == expected.shape == (2, 10, 12, 4)
  assert jnp.allclose(got, expected, atol=1e-5)


def test_max_pool_matches_flax_values_and_derivatives_with_ties():
  from medseg_jax.models.unet import max_pool_2x2
  # Integers in [0, 3): most windows hold their maximum more than once.
  x = jax.random.randint(jax.random.key(2), (2, 8, 6, 3), 0, 3).astype(jnp.float32)
  reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  assert jnp.array_equal(max_pool_2x2(x), reference(x))
  cotangent = jax.random.normal(jax.random.key(3), (2, 4, 3, 3))
  for transform in (lambda f: f, jax.jit):
    vjp = lambda pool: transform(lambda x: jax.vjp(pool, x)[1](cotangent)[0])
    assert jnp.array_equal(vjp(max_pool_2x2)(x), vjp(reference)(x))
  tangent = jax.random.normal(jax.random.key(4), x.shape)
  assert jnp.array_equal(jax.jvp(max_pool_2x2, (x,), (tangent,))[1],
                         jax.jvp(reference, (x,), (tangent,))[1])


class _FlaxPoolUNet(nn.Module):
  """UNet(depth=1, norm="group") with nn.max_pool: the reference, same parameter names."""

  @nn.compact
  def __call__(self, x):
    from medseg_jax.models.unet import ConvBlock, UpConv2x2
    skip = ConvBlock(4, norm="group")(x, True)
    x = ConvBlock(8, norm="group")(nn.max_pool(skip, (2, 2), strides=(2, 2)), True)
    x = jnp.concatenate([skip, UpConv2x2(4, name="ConvTranspose_0")(x)], axis=-1)
    return nn.Conv(2, (1, 1))(ConvBlock(4, norm="group")(x, True))


def test_normalised_unet_gradients_hold_when_xla_rounds_an_activation_twice():
  """XLA's CPU backend without LLVM optimisation fuses multiply-adds in some kernels and
  not in others, so an activation it recomputes per kernel (GroupNorm + bias + ReLU,
  read by the pool's forward and backward) is rounded in two ways. A pool gradient
  that divides by the number of elements equal to the maximum then gives inf and NaN;
  this one gives the reference's gradients."""
  model = UNet(num_classes=2, depth=1, base_features=4, norm="group")
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 4))
  labels = jax.random.randint(jax.random.key(1), (2, 32, 32), 0, 2)
  loss = lambda net: lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      net.apply({"params": p}, x), labels))
  params = helpers.init_variables(model, x[:1])["params"]
  # One Adam step moves the norms' scales and biases off 1 and 0 (where a multiply-add is
  # exact whether fused or not).
  tx = optax.adam(2e-3)
  grads = jax.jit(jax.grad(loss(_FlaxPoolUNet())))(params)
  params = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
  without_llvm_opt = {"xla_backend_optimization_level": 0}
  grads, expected = (jax.jit(jax.grad(loss(net))).lower(params).compile(
      compiler_options=without_llvm_opt)(params) for net in (model, _FlaxPoolUNet()))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    assert jnp.all(jnp.isfinite(got))
    assert jnp.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_unet_parameter_names_are_unchanged():
  model = UNet(num_classes=2, depth=2, base_features=4)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  names = set(variables["params"])
  assert names == {"ConvBlock_0", "ConvBlock_1", "ConvBlock_2", "ConvBlock_3", "ConvBlock_4",
                   "ConvTranspose_0", "ConvTranspose_1", "Conv_0"}
  assert set(variables["params"]["ConvTranspose_0"]) == {"kernel", "bias"}
  assert variables["params"]["ConvTranspose_0"]["kernel"].shape == (2, 2, 16, 8)
