"""The local model zoo: a directory of model files that `--model=NAME` and
`model.init_from=NAME` find by name. Nothing is downloaded.

The directory is `--models_dir`, else $MEDSEG_MODELS, else medseg_jax/models under the
user's cache ($XDG_CACHE_HOME, default ~/.cache). A model NAME is the file NAME.zip there.
"""

import os

from medseg_jax import modelfile
from medseg_jax.errors import MedsegError

ENV = "MEDSEG_MODELS"
SUFFIX = ".zip"


def models_dir(flag_value: str | None = None) -> str:
  """The zoo's directory: the flag's value, else $MEDSEG_MODELS, else the user's cache."""
  if flag_value:
    return flag_value
  if os.environ.get(ENV):
    return os.environ[ENV]
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "medseg_jax", "models")


def path_of(name: str, directory: str) -> str:
  return os.path.join(directory, name + SUFFIX)


def resolve(spec: str, directory: str | None = None, key: str = "--model") -> str:
  """The model file `spec` names: an existing file, else a model NAME in the zoo."""
  if os.path.isfile(spec) or os.sep in spec or spec.endswith(SUFFIX):
    if not os.path.isfile(spec):
      raise MedsegError(f"{key}={spec}: no such model file")
    return spec
  directory = models_dir(directory)
  path = path_of(spec, directory)
  if not os.path.isfile(path):
    raise MedsegError(f"{key}={spec}: neither a file nor a model in the zoo {directory} "
                      "(python -m medseg_jax.zoo list shows them)")
  return path


def is_model_spec(spec: str) -> bool:
  """Whether `spec` (a `model.init_from` value) names a model file or a zoo model rather
  than a run directory or a VGG-16 file."""
  if os.path.isdir(spec):
    return False
  if os.path.isfile(spec):
    return modelfile.is_model_file(spec)
  return os.sep not in spec and os.path.isfile(path_of(spec, models_dir()))
