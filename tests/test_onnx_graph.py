"""The ONNX graph of a network's forward pass: ONNX Runtime's probabilities against the
same function compiled by JAX, for the built-in networks and a user's, at any batch size;
and one error line when the ONNX extra is missing or a graph cannot be made or loaded."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from medseg_jax.errors import MedsegError
from medseg_jax.models import build_model

for _name in ("jax2onnx", "onnx", "onnxruntime"):
  pytest.importorskip(_name)

from medseg_jax.export import onnx_graph  # noqa: E402  (after the skip)

CHANNELS = 2
NETWORKS = {
    "unet": ("--config.model.depth=2", "--config.model.base_features=4"),
    "unet_group_norm": ("--config.model.depth=2", "--config.model.base_features=4",
                        "--config.model.norm=group"),
    "unet_batch_norm": ("--config.model.depth=2", "--config.model.base_features=4",
                        "--config.model.norm=batch"),
    "fcn": ("--config.model.name=fcn", "--config.model.base_features=4",
            "--config.model.fc_features=8"),
    "attention_unet": (
        f"--config.model.name={os.path.join(helpers.REPO, 'examples', 'attention_unet.py')}"
        ":AttentionUNet",
        "--config.model.kwargs={'base_features': 4, 'depth': 2}"),
}


def _probabilities(name: str, size: int = 32):
  """The softmax forward pass of network `name` with random weights (biases and
  normalisation statistics included, which initialise to constants) on images
  [B,size,size,CHANNELS]."""
  cfg = helpers.config(*NETWORKS[name])
  model = build_model(cfg.model, 3, size)
  variables = helpers.init_variables(model, np.zeros((1, size, size, CHANNELS), np.float32))
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(p.dtype),
                           variables)
  return lambda images: jax.nn.softmax(model.apply(variables, images, train=False), axis=-1)


def _images(batch: int, size: int = 32, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, size, size, CHANNELS)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_onnx_runtime_gives_the_probabilities_of_jax_at_any_batch_size(name):
  probabilities = _probabilities(name)
  graph = onnx_graph.forward_graph(probabilities, (32, 32, CHANNELS))
  sess = onnx_graph.session(graph, threads=1)
  (image,), (output,) = sess.get_inputs(), sess.get_outputs()
  assert (image.name, output.name) == ("image", "probabilities")
  assert isinstance(image.shape[0], str) and image.shape[1:] == [32, 32, CHANNELS]
  compiled = jax.jit(probabilities)
  for batch in (1, 3):
    images = _images(batch, seed=batch)
    got = sess.run(["probabilities"], {"image": images})[0]
    expected = np.asarray(compiled(images))
    assert got.shape == expected.shape == (batch, 32, 32, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  assert abs(expected.sum(-1) - 1).max() < 1e-5  # softmax, not logits


class EveryLayer(nn.Module):
  """The flax.linen layers a user's network may be built of, in 2D or 3D: pooling called
  with its window and strides by position and by keyword, and a decoder's resize to the
  shape of a skip connection (batch dimension included)."""

  @nn.compact
  def __call__(self, x, train=False):
    two, three, one = ((n,) * (x.ndim - 2) for n in (2, 3, 1))
    x = nn.BatchNorm(use_running_average=not train)(nn.Conv(8, three)(x))
    skip = nn.relu(x)
    x = nn.GroupNorm(num_groups=2)(nn.max_pool(skip, two, two))
    x = nn.LayerNorm()(nn.avg_pool(x, window_shape=two, strides=two, padding="SAME"))
    x = nn.InstanceNorm()(nn.ConvTranspose(8, two, strides=two)(x))
    x = jax.image.resize(x, skip.shape, "bilinear")
    x = nn.Dropout(0.5, deterministic=not train)(jnp.concatenate([x, skip], axis=-1))
    x = (nn.max_pool(x, window_shape=three, strides=one, padding="SAME")
         + nn.avg_pool(x, three, one, "SAME"))
    return nn.Dense(3)(x)


@pytest.mark.parametrize("shape", [(16, 16, CHANNELS), (8, 8, 8, CHANNELS)], ids=["2d", "3d"])
def test_a_network_of_every_flax_layer_converts_and_predicts_what_jax_does(shape):
  """Against jax.jit of the same function, through `run` at a run batch of 2 (the resize
  makes a graph of a fixed batch, which `run` feeds one image at a time)."""
  model = EveryLayer()
  variables = helpers.init_variables(model, np.zeros((1, *shape), np.float32))
  rng = np.random.default_rng(1)  # every statistic off its initial value, variances > 0
  variables = jax.tree.map(lambda p: p + 0.1 * rng.uniform(size=p.shape).astype(p.dtype),
                           variables)
  probabilities = lambda images: jax.nn.softmax(model.apply(variables, images), axis=-1)
  sess = onnx_graph.session(onnx_graph.forward_graph(probabilities, shape), threads=1)
  for batch in (1, 3):
    images = np.random.default_rng(batch).normal(size=(batch, *shape)).astype(np.float32)
    got = onnx_graph.run(sess, images, 2)
    expected = np.asarray(jax.jit(probabilities)(images))
    assert got.shape == expected.shape == (batch, *shape[:-1], 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_run_feeds_chunks_of_at_most_the_batch():
  probabilities = _probabilities("unet")
  sess = onnx_graph.session(onnx_graph.forward_graph(probabilities, (32, 32, CHANNELS)))
  images = _images(5)
  got = onnx_graph.run(sess, images, batch=2)  # runs of 2, 2 and 1
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, np.asarray(jax.jit(probabilities)(images)), rtol=0,
                             atol=1e-5)
  assert onnx_graph.run(sess, images[:0], batch=2).shape == (0, 32, 32, 3)
  with pytest.raises(MedsegError, match=r"images of shape \[5, 32, 32, 1\].*\[B,32,32,2\]"):
    onnx_graph.run(sess, images[..., :1], batch=2)


def test_the_graph_of_the_same_function_is_the_same_bytes():
  probabilities = _probabilities("unet")
  assert (onnx_graph.forward_graph(probabilities, (32, 32, CHANNELS))
          == onnx_graph.forward_graph(probabilities, (32, 32, CHANNELS)))


def _one_line(error: pytest.ExceptionInfo) -> str:
  message = str(error.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("missing", ["jax2onnx", "onnx", "onnxruntime"])
def test_a_missing_extra_is_one_line_naming_the_install_command(monkeypatch, missing):
  monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
  assert not onnx_graph.available()
  if missing != "onnxruntime":
    with pytest.raises(MedsegError) as error:
      onnx_graph.forward_graph(_probabilities("unet"), (32, 32, CHANNELS))
  else:
    with pytest.raises(MedsegError) as error:
      onnx_graph.session(b"")
  message = _one_line(error)
  assert missing in message and message.endswith(onnx_graph.EXTRA_INSTALL)
  assert onnx_graph.EXTRA_INSTALL == (
      "python3 -m pip install -r requirements-onnx.txt && "
      "python3 -m pip install --no-deps -r requirements-onnx-nodeps.txt")


def test_the_extra_is_available_here():
  assert onnx_graph.available()


def test_a_function_with_no_onnx_form_is_one_line():
  def host_callback(images):
    return jax.pure_callback(np.tanh, jax.ShapeDtypeStruct(images.shape, images.dtype), images)
  with pytest.raises(MedsegError, match=r"ONNX export of the network on images \[B,32,32,2\]"
                     ) as error:
    onnx_graph.forward_graph(host_callback, (32, 32, CHANNELS))
  _one_line(error)


def test_a_graph_onnx_runtime_cannot_load_is_one_line():
  graph = onnx_graph.forward_graph(_probabilities("unet"), (32, 32, CHANNELS))
  with pytest.raises(MedsegError, match="ONNX Runtime cannot load the graph") as error:
    onnx_graph.session(graph[:len(graph) // 2])
  _one_line(error)
