"""Components named in the config: built-ins, import paths and files through one resolver,
held to their contracts by the config check before any data work."""

import glob
import hashlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from medseg_jax import components, config, config_schema
from medseg_jax.errors import ConfigError
from medseg_jax.models import MODELS, UNet, build_model
from medseg_jax.parallel import strategies
from medseg_jax.training import losses, settings

# A user's network: one 3x3 convolution to the class scores (its own parameters, nothing
# of the package), built with the framework's keywords and one of its own.
NET = """
import flax.linen as nn
import jax.numpy as jnp

class Net(nn.Module):
  num_classes: int
  width: int = 4
  dtype: object = jnp.float32
  axis_name: object = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(self.width, (3, 3), padding="SAME", name="hidden")(x))
    return nn.Conv(self.num_classes, (1, 1), name="head")(x)
"""

LOSS = """
import jax.numpy as jnp

def l2_loss(logits, labels):
  return jnp.mean(logits ** 2, axis=(1, 2, 3))

def batch_loss(logits, labels):
  return jnp.mean(logits ** 2)
"""


def write(path, source: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(textwrap.dedent(source))
  return str(path)


def tiny(*overrides):
  return helpers.config(*helpers.TINY[1:], *overrides)


def test_built_ins_go_through_the_resolver():
  unet = components.resolve("model.name", "unet", MODELS)
  assert unet.obj is UNet and unet.builtin and unet.record() == {
      "spec": "unet", "source": None, "sha256": None}
  assert losses.get_loss("dice_ce") is losses.dice_ce_loss
  assert strategies.strategy_component("gspmd").obj is strategies.Gspmd


def test_a_network_from_a_file_and_from_an_import_path(tmp_path, monkeypatch):
  path = write(tmp_path / "userpkg" / "nets.py", NET)
  write(tmp_path / "userpkg" / "__init__.py", "")
  monkeypatch.syspath_prepend(str(tmp_path))
  by_file = components.resolve("model.name", f"{path}:Net", MODELS)
  by_import = components.resolve("model.name", "userpkg.nets:Net", MODELS)
  for found in (by_file, by_import):
    assert found.source == path and found.name == "Net" and not found.builtin
    assert found.sha256 == __import__("hashlib").sha256(open(path, "rb").read()).hexdigest()
  cfg = tiny(f"--config.model.name={path}:Net")
  cfg.unlock()
  cfg.model.kwargs = {"width": 3}
  model = build_model(cfg.model, num_classes=3, image_size=32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  # The reference: the same computation written out with lax, from the same parameters.
  hidden, head = variables["params"]["hidden"], variables["params"]["head"]
  conv = lambda v, k, b: jax.lax.conv_general_dilated(
      v, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  expected = conv(jax.nn.relu(conv(x, hidden["kernel"], hidden["bias"])), head["kernel"],
                  head["bias"])
  assert hidden["kernel"].shape == (3, 3, 1, 3)  # model.kwargs reached the constructor
  np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_a_relative_file_is_looked_for_beside_the_config_then_in_the_working_directory(
    tmp_path, monkeypatch):
  config_dir, cwd = tmp_path / "configs", tmp_path / "cwd"
  beside = write(config_dir / "nets" / "net.py", NET)
  in_cwd = write(cwd / "nets" / "net.py", NET)
  write(cwd / "only_here.py", LOSS)
  monkeypatch.chdir(cwd)
  cfg = tiny("--config.model.name=nets/net.py:Net", "--config.train.loss=only_here.py:l2_loss")
  components.absolute_specs(cfg, str(config_dir))
  assert cfg.model.name == f"{beside}:Net"
  assert cfg.train.loss == f"{cwd / 'only_here.py'}:l2_loss"
  os.remove(beside)
  cfg = tiny("--config.model.name=nets/net.py:Net")
  components.absolute_specs(cfg, str(config_dir))
  assert cfg.model.name == f"{in_cwd}:Net"


def test_a_user_network_and_loss_pass_the_config_check(tmp_path, devices8):
  net, loss = write(tmp_path / "net.py", NET), write(tmp_path / "loss.py", LOSS)
  config.check(tiny(f"--config.model.name={net}:Net", f"--config.train.loss={loss}:l2_loss"))


BROKEN = {
    "no such file": ("model.name", "{dir}/missing.py:Net", None, r"missing\.py: no such file"),
    "import error": ("model.name", "{dir}/bad.py:Net",
                     "import numpy\nraise RuntimeError('not today\\nsecond line')\n",
                     r"importing .*bad\.py failed: RuntimeError: not today$"),
    "missing name": ("model.name", "{dir}/net.py:Nett", NET, r"net\.py has no 'Nett'"),
    "not a module": ("model.name", "{dir}/net.py:helper", NET + "\ndef helper():\n  pass\n",
                     r"helper is not a flax\.linen\.Module class"),
    "constructor": ("model.name", "{dir}/net.py:Net",
                    NET.replace("  axis_name: object = None\n", ""),
                    r"does not take the framework's keywords .*axis_name"),
    "call signature": ("model.name", "{dir}/net.py:Net",
                       NET.replace("def __call__(self, x, train: bool = False)",
                                   "def __call__(self, x)"),
                       r"fails on x \[1,32,32,1\] with __call__\(x, train\): TypeError"),
    "output shape": ("model.name", "{dir}/net.py:Net",
                     NET.replace("return nn.Conv(self.num_classes", "return nn.Conv(7"),
                     r"returns \(1, 32, 32, 7\) .*logits \[1, 32, 32, 2\] expected"),
    "loss shape": ("train.loss", "{dir}/loss.py:batch_loss", LOSS,
                   r"returns \(\) for a batch of 2; a loss per sample, \[2\], expected"),
    "strategy": ("parallel.strategy", "{dir}/net.py:Net", NET,
                 r"Net is not a subclass of medseg_jax\.parallel\.strategies\.Parallel"),
    "unknown built-in": ("train.loss", "tversky", None, r"unknown; choose from \['ce', 'dice'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_component_is_one_config_error_naming_the_key(case, tmp_path, devices8):
  key, spec, source, message = BROKEN[case]
  spec = spec.format(dir=tmp_path)
  if source is not None:
    write(spec.rpartition(":")[0], source)
  with pytest.raises(ConfigError, match=rf"^{key}='{spec}'.*{message}") as error:
    config.check(tiny(f"--config.{key}={spec}"))
  assert "\n" not in str(error.value)


def test_main_refuses_a_broken_network_with_exit_2_and_no_workdir(tmp_path):
  write(tmp_path / "net.py", NET.replace("return nn.Conv(self.num_classes", "return nn.Conv(7"))
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "medseg_jax.main", *helpers.TINY, f"--workdir={workdir}",
       f"--config.model.name={tmp_path}/net.py:Net"],
      cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith(f"error: model.name='{tmp_path}/net.py:Net' ({tmp_path}/net.py): "
                              "returns (1, 32, 32, 7)")
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


EXAMPLES = sorted(p for p in glob.glob(os.path.join(helpers.REPO, "examples", "*.py"))
                  if "def get_config" in open(p).read())


def test_the_examples_have_a_network_a_loss_and_a_plugin():
  kinds = set()
  for path in EXAMPLES:
    cfg = helpers.config(path=path)
    kinds |= {key for key, builtin in (("model.name", "unet"), ("train.loss", "dice_ce"))
              if cfg[key.split(".")[0]][key.split(".")[1]] != builtin}
    kinds |= {"train.plugins"} if cfg.train.plugins else set()
  assert kinds == {"model.name", "train.loss", "train.plugins"}


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_every_example_config_passes_the_checks_main_runs(path, devices8):
  cfg = helpers.config(path=path)
  config_schema.check_keys(cfg, path)
  components.absolute_specs(cfg, os.path.dirname(path))
  config.check(cfg)


STRATEGY = """
from medseg_jax.parallel import strategies

class Counted(strategies.ShardMap):
  \"\"\"The built-in shard_map strategy, under a name of the user's.\"\"\"
"""

PLUGIN = """
class Note:
  def __init__(self, context):
    self.context = context

  def on_end(self, step, test_metrics):
    pass
"""


def test_every_kind_from_a_file_and_from_an_import_path(tmp_path, monkeypatch, devices8):
  monkeypatch.syspath_prepend(str(tmp_path))
  sources = {"userkinds_net": NET, "userkinds_loss": LOSS, "userkinds_strategy": STRATEGY,
             "userkinds_plugin": PLUGIN}
  paths = {name: write(tmp_path / f"{name}.py", source) for name, source in sources.items()}
  for form in ("file", "import"):
    name = lambda module, obj: f"{paths[module]}:{obj}" if form == "file" else f"{module}:{obj}"
    cfg = tiny(f"--config.model.name={name('userkinds_net', 'Net')}",
               f"--config.train.loss={name('userkinds_loss', 'l2_loss')}",
               f"--config.parallel.strategy={name('userkinds_strategy', 'Counted')}",
               f"--config.train.plugins=('{name('userkinds_plugin', 'Note')}',)")
    config.check(cfg)
    par = helpers.parallel(cfg)
    assert type(par).__name__ == "Counted" and isinstance(par, strategies.ShardMap)
    records = settings.read(cfg).components
    for key, module in (("model.name", "userkinds_net"), ("train.loss", "userkinds_loss"),
                        ("parallel.strategy", "userkinds_strategy"),
                        ("train.plugins[0]", "userkinds_plugin")):
      assert records[key]["source"] == paths[module]
      assert records[key]["sha256"] == hashlib.sha256(
          open(paths[module], "rb").read()).hexdigest()
