"""The quickstart trained with a loss the package does not have: Tversky + cross-entropy
from examples/tversky_loss.py, named by file (relative to this config's directory).

  python3 -m medseg_jax.main --config=examples/tversky_quickstart.py
"""

from configs import quickstart


def get_config():
  c = quickstart.get_config()
  c.train.loss = "tversky_loss.py:tversky_ce_loss"
  return c
