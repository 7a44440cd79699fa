"""The 3D U-Net: shapes and parameter counts against a hand-computed formula, patch sizes it
refuses, bfloat16 compute, per-example outputs, and the per-sample losses on 3D tensors
against numpy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
from medseg_jax import defaults
from medseg_jax.errors import ConfigError
from medseg_jax.models import MODELS, build_model
from medseg_jax.models.unet3d import UNet3D
from medseg_jax.training import losses


def conv(k, cin, cout):
  return k**3 * cin * cout + cout


def unet3d_params(depth, f, cin, classes, norm_params=2):
  """Convolutions, transposed convolutions and per-channel norm scale and bias."""
  total, c = 0, cin
  for level in range(depth + 1):
    out = f * 2**level
    total += conv(3, c, out) + conv(3, out, out) + 2 * norm_params * out
    c = out
  for level in reversed(range(depth)):
    out = f * 2**level
    total += conv(2, c, out) + conv(3, 2 * out, out) + conv(3, out, out) + 2 * norm_params * out
    c = out
  return total + conv(1, c, classes)


def count(variables):
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("depth,shape", [(1, (6, 10, 2)), (2, (12, 4, 20)), (2, (8, 8, 8)),
                                         (3, (24, 8, 40))])
def test_shape_and_parameter_count(depth, shape):
  """Even and odd multiples of 2**depth, unequal along the three axes."""
  model = UNet3D(num_classes=3, depth=depth, base_features=4)
  x = jnp.zeros((2,) + shape + (2,))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert count(variables) == unet3d_params(depth, 4, 2, 3)
  assert jax.eval_shape(model.apply, variables, x).shape == (2,) + shape + (3,)


@pytest.mark.parametrize("depth,shape", [(1, (5, 8, 8)), (2, (8, 6, 8)), (3, (16, 16, 12)),
                                         (2, (0, 4, 4))])
def test_patch_size_the_depth_does_not_allow_is_one_config_error(depth, shape):
  model = UNet3D(num_classes=2, depth=depth, base_features=4)
  with pytest.raises(ConfigError, match=rf"data.patch_size=.*model.depth={depth} needs every "
                     rf"size a multiple of {2**depth}"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + shape + (1,)))


def test_a_2d_batch_is_one_config_error():
  with pytest.raises(ConfigError, match=r"unet3d takes x \[B,D,H,W,C\]"):
    jax.eval_shape(UNet3D(num_classes=2, depth=1).init, jax.random.key(0),
                   jnp.zeros((1, 8, 8, 1)))


def _model_cfg(**settings):
  cfg = ml_collections.ConfigDict(defaults.get_config().model.to_dict())
  cfg.update(dict(name="unet3d", depth=1, base_features=4, norm="instance"), **settings)
  return cfg


def test_registered_and_built_from_the_model_keys():
  assert MODELS["unet3d"] is UNet3D
  model = build_model(_model_cfg(depth=2, norm="group", dropout=0.25), num_classes=3,
                      image_size=0, axis_name="data")
  assert (model.depth, model.base_features, model.norm, model.dropout) == (2, 4, "group", 0.25)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_a_norm_unet3d_does_not_offer_is_one_config_error(norm):
  with pytest.raises(ConfigError, match=rf"model.norm='{norm}': unet3d needs one of"):
    build_model(_model_cfg(norm=norm), num_classes=2, image_size=0)


@pytest.mark.parametrize("dtype,hlo_has_bf16", [("bfloat16", True), ("float32", False)])
def test_compute_dtype_with_float32_params_and_logits(dtype, hlo_has_bf16):
  model = build_model(_model_cfg(compute_dtype=dtype), num_classes=3, image_size=0)
  x = jnp.ones((2, 8, 8, 8, 1))
  variables = helpers.init_variables(model, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  logits = jax.jit(model.apply)(variables, x)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  hlo = jax.jit(model.apply).lower(variables, x).as_text()
  assert ("bf16" in hlo) == hlo_has_bf16  # the convolutions really run in bfloat16


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_an_example_output_does_not_depend_on_the_rest_of_the_batch(norm):
  model = UNet3D(num_classes=2, depth=1, base_features=8, norm=norm)
  rng = np.random.default_rng(0)
  a, b, c = (rng.normal(size=(1, 8, 8, 4, 1)).astype(np.float32) * s for s in (1, 5, 0.1))
  variables = helpers.init_variables(model, a)
  apply = jax.jit(lambda x: model.apply(variables, x, train=True))
  alone = np.asarray(apply(a))
  with_b, with_c = (np.asarray(apply(np.concatenate([a, other]))) for other in (b, c))
  np.testing.assert_allclose(with_b[:1], alone, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(with_c[:1], alone, rtol=1e-5, atol=1e-5)
  assert not np.allclose(with_b[1:], with_c[1:], atol=1e-3)  # the others did change


def _numpy_losses(logits, labels):
  """Independent reference per sample: (1 - soft Dice with smooth 1, mean cross-entropy)."""
  logits = logits.astype(np.float64)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  dice, ce = [], []
  for i in range(len(labels)):
    per_class = []
    for k in range(logits.shape[-1]):
      g = labels[i] == k
      per_class.append((2 * p[i][g, k].sum() + 1) / (p[i, ..., k].sum() + g.sum() + 1))
    dice.append(1 - np.mean(per_class))
    ce.append(-np.mean(np.log(np.take_along_axis(p[i], labels[i][..., None], -1))))
  return np.array(dice), np.array(ce)


def test_losses_per_sample_on_3d_tensors_match_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 4, 6, 5, 3)).astype(np.float32) * 2
  labels = rng.integers(0, 3, (3, 4, 6, 5)).astype(np.int32)
  labels[1] = 0  # one sample with only background
  dice, ce = _numpy_losses(logits, labels)
  np.testing.assert_allclose(losses.soft_dice_loss(logits, labels), dice, rtol=1e-5)
  np.testing.assert_allclose(losses.cross_entropy_loss(logits, labels), ce, rtol=1e-5)
  np.testing.assert_allclose(losses.dice_ce_loss(logits, labels), dice + ce, rtol=1e-5)


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 1, 2)])
def test_max_pool_matches_flax_values_and_derivatives_with_ties(factors):
  """The 3D pool passes each window's tangent from its first maximum, as nn.max_pool's:
  a tie count XLA's rounding could change between two compilations (8 devices against
  one) does not enter the gradient. Anisotropic windows pool some axes only."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from medseg_jax.models.unet3d import max_pool  # pylint: disable=import-outside-toplevel
  # Integers in [0, 3): most windows hold their maximum more than once.
  x = jax.random.randint(jax.random.key(2), (2, 4, 6, 8, 3), 0, 3).astype(jnp.float32)
  reference = lambda x: nn.max_pool(x, factors, strides=factors)
  pool = lambda x: max_pool(x, factors)
  assert jnp.array_equal(pool(x), reference(x))
  cotangent = jax.random.normal(jax.random.key(3), reference(x).shape)
  for transform in (lambda f: f, jax.jit):
    vjp = lambda pool: transform(lambda x: jax.vjp(pool, x)[1](cotangent)[0])
    assert jnp.array_equal(vjp(pool)(x), vjp(reference)(x))
  tangent = jax.random.normal(jax.random.key(4), x.shape)
  assert jnp.array_equal(jax.jvp(pool, (x,), (tangent,))[1],
                         jax.jvp(reference, (x,), (tangent,))[1])


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2)])
def test_up_convolution_equals_flax_conv_transpose(factors):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from medseg_jax.models.unet3d import UpConv  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(5), (2, 3, 2, 4, 5))
  reference = nn.ConvTranspose(4, factors, strides=factors)
  variables = reference.init(jax.random.key(6), x)
  np.testing.assert_allclose(UpConv(4, factors).apply(variables, x),
                             reference.apply(variables, x), rtol=1e-5, atol=1e-6)


def anisotropic_params(pooling, widths, cin, classes):
  """As unet3d_params, with each level's transposed convolution as large as its pooling
  window and the channels of each level given."""
  total, c = 0, cin
  for out in widths:
    total += 27 * c * out + out + 27 * out * out + out + 4 * out
    c = out
  for level in reversed(range(len(pooling))):
    out = widths[level]
    total += int(np.prod(pooling[level])) * c * out + out
    total += 27 * 2 * out * out + out + 27 * out * out + out + 4 * out
    c = out
  return total + c * classes + classes


def test_anisotropic_pooling_and_a_width_cap():
  """A coarse first axis pooled at the last level only, widths capped at 24."""
  pooling = ((1, 2, 2), (1, 2, 2), (2, 2, 2))
  model = UNet3D(num_classes=2, depth=3, base_features=8, pooling=pooling, max_features=24)
  x = jnp.zeros((1, 6, 16, 24, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert count(variables) == anisotropic_params(pooling, (8, 16, 24, 24), 1, 2)
  assert jax.eval_shape(model.apply, variables, x).shape == (1, 6, 16, 24, 2)
  with pytest.raises(ConfigError, match=r"data.patch_size=\(3, 16, 24\): unet3d with "
                     r"model.depth=3 needs multiples of \(2, 8, 8\) along \(D,H,W\)"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 16, 24, 1)))


@pytest.mark.parametrize("pooling,message", [
    (((2, 2, 2),), "model.pooling has 1 levels; model.depth=2 needs as many"),
    (((2, 2, 2), (1, 1, 1)), "each level is 3 factors"),
    (((2, 2, 2), (3, 2, 2)), "each level is 3 factors"),
])
def test_pooling_that_does_not_fit_the_depth_is_one_config_error(pooling, message):
  cfg = helpers.config(path="configs/quickstart_3d.py")
  cfg.model.depth, cfg.model.pooling = 2, pooling
  with pytest.raises(ConfigError, match=message):
    build_model(cfg.model, 2, 0)
