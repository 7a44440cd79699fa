"""A plan written as a stand-alone config file: `get_config()` starts from the defaults
and sets each planned value under a comment with the rule behind it; module constants
record the fingerprint's hash and the machine the plan was made for."""

import hashlib
import json
import textwrap

from medseg_jax import files
from medseg_jax.planning.rules import Choice

CONFIGURATIONS = ("2d", "3d")  # the plans of a dataset: plan_2d.py and plan_3d.py
WIDTH = 96


def configurations_error(names: list[str]) -> str | None:
  """The error line of a `--configurations` list that is empty or names an unknown plan."""
  if names and set(names) <= set(CONFIGURATIONS):
    return None
  return f"--configurations={','.join(names)}: choose from {','.join(CONFIGURATIONS)}"


def fingerprint_hash(fingerprint: dict) -> str:
  """sha256 of the fingerprint's canonical JSON (sorted keys): what a plan was made from."""
  text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def render(choices: list[Choice], title: str, header: dict) -> str:
  """The config file's text: a docstring `title`, `header` as upper-case constants, and
  `get_config()` setting every choice."""
  lines = [f'"""{title}"""', "", "from medseg_jax import defaults", ""]
  lines += [f"{name.upper()} = {value!r}" for name, value in header.items()]
  lines += ["", "", "def get_config():", "  c = defaults.get_config()"]
  for choice in choices:
    lines += textwrap.wrap(choice.rule, WIDTH - 4, initial_indent="  # ",
                           subsequent_indent="  # ")
    lines.append(f"  c.{choice.key} = {_literal(choice.value)}")
  lines += ["  return c", ""]
  return "\n".join(lines)


def _literal(value) -> str:
  """A Python literal of a plan's value (numpy scalars and lists as plain numbers and
  tuples, as a config holds them)."""
  if isinstance(value, (list, tuple)):
    items = [_literal(v) for v in value]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
  if hasattr(value, "item"):
    value = value.item()
  return repr(value)


def write(path: str, text: str) -> None:
  """Writes the plan at `path` whole or not at all."""
  compile(text, path, "exec")  # a plan that is not Python is a defect, never a file
  files.write_text(path, text)
