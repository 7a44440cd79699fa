"""The local model zoo: a directory of model files that `--model=NAME` and
`model.init_from=NAME` find by name. Nothing is downloaded.

The directory is `--models_dir`, else $MEDSEG_MODELS, else medseg_jax/models under the
user's cache ($XDG_CACHE_HOME, default ~/.cache). A model NAME is the file NAME.zip there.

    python -m medseg_jax.zoo install FILE [--name=NAME] [--overwrite] [--models_dir=DIR]
    python -m medseg_jax.zoo list [--models_dir=DIR]
    python -m medseg_jax.zoo show NAME [--models_dir=DIR]     (prints the model card)
    python -m medseg_jax.zoo remove NAME [--models_dir=DIR]
"""

import os
import re
import shutil

from absl import flags

from medseg_jax import cli, files, modelfile
from medseg_jax.errors import ConfigError, MedsegError

ENV = "MEDSEG_MODELS"
SUFFIX = ".zip"
# A name is a file name on every system: no separators, no leading dot (hidden, and the
# prefix of files.atomic_path's temporary files), no spaces.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
USAGE = ("python -m medseg_jax.zoo install FILE [--name=NAME] [--overwrite] | list | "
         "show NAME | remove NAME  [--models_dir=DIR]")


def models_dir(flag_value: str | None = None) -> str:
  """The zoo's directory: the flag's value, else $MEDSEG_MODELS, else the user's cache."""
  if flag_value:
    return flag_value
  if os.environ.get(ENV):
    return os.environ[ENV]
  return files.user_cache("models")


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
  than a run directory or a VGG-16 file: an existing zip or .zip file, a missing .zip
  file, or a bare name (no directory, no extension) that is not a directory here."""
  if os.path.isdir(spec):
    return False
  if os.path.isfile(spec):
    return spec.endswith(SUFFIX) or modelfile.is_model_file(spec)
  if spec.endswith(SUFFIX):
    return True
  return os.sep not in spec and (not os.path.splitext(spec)[1]
                                 or os.path.isfile(path_of(spec, models_dir())))


def check_name(name: str, where: str = "--name") -> str:
  """`name` if it is a safe model name, else a ConfigError naming `where` it came from."""
  if not _NAME.fullmatch(name) or name.endswith(SUFFIX):
    raise ConfigError(f"{where}={name!r}: not a model name (letters, digits, '.', '_' and "
                      f"'-', starting with a letter or digit, not ending in {SUFFIX}, at "
                      "most 100 characters)")
  return name


def install(path: str, directory: str, name: str | None = None,
            overwrite: bool = False) -> str:
  """Copies the model file at `path` into `directory` as NAME.zip, after reading and
  checking all of it (format, version, every member's SHA-256); NAME is `name`, else the
  file's summary's. Returns the installed path; an existing NAME stays unless `overwrite`."""
  model = modelfile.read(path)
  if name is None:
    name = check_name(str(model.summary.get("name", "")), f"{path}: the summary's name")
  else:
    name = check_name(name)
  target = path_of(name, directory)
  if os.path.exists(target):
    if os.path.samefile(path, target):
      raise MedsegError(f"{path}: is the installed model {name} itself")
    if not overwrite:
      raise MedsegError(f"{name}: already in the zoo {directory} (--overwrite replaces it, "
                        "--name=NAME installs it under another name)")
  try:
    with files.atomic_path(target) as tmp:
      shutil.copyfile(path, tmp)
  except OSError as e:  # a full disk is already one line; this is e.g. a read-only directory
    raise MedsegError(f"{target}: cannot write the model ({e.strerror or e})") from e
  return target


def remove(name: str, directory: str) -> str:
  """Deletes the zoo's model NAME; returns the path it had."""
  target = path_of(check_name(name, "NAME"), directory)
  if not os.path.isfile(target):
    raise MedsegError(f"{name}: no such model in the zoo {directory}")
  os.remove(target)
  return target


def card(spec: str, directory: str) -> str:
  """The model card (MODEL.md) of the zoo's model NAME (or of a model file), checked."""
  return modelfile.read(resolve(spec, directory, "show")).members[modelfile.CARD].decode()


COLUMNS = ("name", "task", "classes", "modalities", "input", "test Dice", "exported", "size")


def rows(directory: str) -> list[tuple[str, ...]]:
  """One row of COLUMNS per model in `directory`, from each file's index alone; a file
  whose index cannot be read is a row saying what is wrong with it."""
  if not os.path.isdir(directory):
    return []
  try:
    entries = sorted(os.listdir(directory))
  except OSError as e:
    raise MedsegError(f"{directory}: cannot read the zoo ({e.strerror or e})") from e
  found = []
  for entry in entries:
    path = os.path.join(directory, entry)
    if entry.startswith(".") or not entry.endswith(SUFFIX) or not os.path.isfile(path):
      continue
    try:
      found.append(_row(entry[:-len(SUFFIX)], modelfile.read_index(path),
                        os.path.getsize(path)))
    except MedsegError as e:
      found.append((entry[:-len(SUFFIX)], f"damaged: {str(e).removeprefix(path + ': ')}"))
  return found


def _row(name: str, index: dict, size: int) -> tuple[str, ...]:
  summary = index.get("summary")
  if not isinstance(summary, dict):
    raise MedsegError(f"{modelfile.INDEX} has no summary")
  def text(key, default="?"):
    value = summary.get(key)
    if isinstance(value, list):
      return ",".join(map(str, value)) or "-"
    return default if value is None else str(value)
  dice = summary.get("test_dice")
  task = text("task")
  image, channels = summary.get("image_size"), summary.get("channels")
  patch = summary.get("patch_size")  # a 3D network's input is a patch
  shape = "x".join(map(str, patch)) if isinstance(patch, list) else f"{image}x{image}"
  return (name, task if len(task) <= 40 else task[:39] + "…", text("classes"),
          text("modalities"), f"{shape}x{channels}",
          f"{dice:.4f}" if isinstance(dice, (int, float)) else "-",
          text("exported")[:10], _size(size))


def _size(size: int) -> str:
  for unit in ("B", "kB", "MB"):
    if size < 1000:
      return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
    size /= 1000
  return f"{size:.1f} GB"


def table(found: list[tuple[str, ...]]) -> str:
  """`rows` as aligned columns under a header; a damaged file's row is its name and why."""
  whole = [COLUMNS] + [r for r in found if len(r) == len(COLUMNS)]
  widths = [max(len(r[i]) for r in whole) for i in range(len(COLUMNS))]
  lines = []
  for row in [COLUMNS] + found:
    if len(row) != len(COLUMNS):
      lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
    else:
      lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
  return "\n".join(lines)


def _command(args: list[str], directory: str, name: str | None, overwrite: bool) -> str:
  """Runs the command `args` names in the zoo `directory`; returns what to print."""
  command, rest = (args[0], args[1:]) if args else ("", [])
  wanted = {"install": 1, "list": 0, "show": 1, "remove": 1}
  if command not in wanted or len(rest) != wanted[command]:
    raise ConfigError(f"usage: {USAGE}")
  if command != "install" and (name is not None or overwrite):
    raise ConfigError(f"--name and --overwrite apply to install, not to {command}")
  if command == "install":
    target = install(rest[0], directory, name, overwrite)
    return f"installed {rest[0]} as {os.path.basename(target)[:-len(SUFFIX)]} ({target})"
  if command == "list":
    found = rows(directory)
    return table(found) if found else f"no models in {directory}"
  if command == "show":
    return card(rest[0], directory).rstrip("\n")
  return f"removed {remove(rest[0], directory)}"


def _cli() -> None:
  directory = flags.DEFINE_string(
      "models_dir", None, f"The zoo's directory; default ${ENV}, else the user's cache.")
  name = flags.DEFINE_string("name", None, "install: the model's name in the zoo (default: "
                             "the name the file was exported with).")
  overwrite = flags.DEFINE_boolean("overwrite", False,
                                   "install: replace a model of the same name.")
  cli.run(lambda args: print(_command(args, models_dir(directory.value), name.value,
                                      overwrite.value)), takes_args=True)


if __name__ == "__main__":
  _cli()
