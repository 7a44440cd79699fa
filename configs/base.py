"""The defaults of every config (`medseg_jax/defaults.py`), under the name config files
written as `from configs import base` use; new config files import `medseg_jax.defaults`."""

from medseg_jax.defaults import get_config  # pylint: disable=unused-import
