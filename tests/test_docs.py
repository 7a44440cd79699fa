"""The README and docs/ as a reader uses them: every link leads somewhere, every command names
a module, flags and config keys that exist, and the cheap commands run as written."""

import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import REPO
from medseg_jax import config_schema, defaults

PAGES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
README_LINES = 200
# Flags absl defines for every program.
ABSL_FLAGS = {"help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok", "v",
              "verbosity", "logtostderr", "alsologtostderr", "log_dir"}


def _name(path: str) -> str:
  return os.path.relpath(path, REPO)


def _commands(path: str) -> list[str]:
  """Every command of the page's ```bash blocks, continuation lines joined, comments cut."""
  text = open(path).read()
  found = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for command in block.replace("\\\n", " ").splitlines():
      command = command.split(" #")[0].strip()
      if command and not command.startswith("#"):
        found.append(command)
  return found


def _anchor(heading: str) -> str:
  """The anchor GitHub gives a Markdown heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_a_front_door():
  lines = open(PAGES[0]).read().splitlines()
  assert len(lines) <= README_LINES, len(lines)
  commands = _commands(PAGES[0])
  assert "bash install.sh && python3 -m medseg_jax.main --config=configs/quickstart.py" in commands
  assert any(c.startswith("bash install.sh && python3 -m pytest") for c in commands)
  linked = set(re.findall(r"\]\((docs/[^)#]+)\)", "\n".join(lines)))
  assert {_name(p) for p in PAGES[1:]} <= linked  # every page of docs/ is on the map


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_link_leads_to_a_file_and_heading(page):
  text = open(page).read()
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if target.startswith(("http://", "https://")):
      continue
    path, _, anchor = target.partition("#")
    where = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    assert os.path.exists(where), f"{_name(page)}: {target}"
    if anchor:
      headings = re.findall(r"^#+ (.*)$", open(where).read(), re.M)
      assert anchor in {_anchor(h) for h in headings}, f"{_name(page)}: {target}"


@functools.lru_cache(maxsize=None)
def _flags_of(module: str) -> frozenset:
  """The flags the command `python3 -m module` takes, as its --helpfull lists them (absl),
  or its --help (argparse, the dashboard's)."""
  def helped(option):
    return subprocess.run([sys.executable, "-m", module, option], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO))
  proc = helped("--helpfull")
  names = frozenset(re.findall(r"^\s+--(?:\[no\])?([\w.]+):", proc.stdout, re.M))
  if "helpfull" in names:
    return names
  proc = helped("--help")
  assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
  return frozenset(re.findall(r"^\s+--([\w]+)", proc.stdout, re.M)) | {"help"}


def _invocations() -> list[tuple[str, str, list[str]]]:
  """(page, module, arguments) of every `python3 -m medseg_jax...` command of the pages."""
  found = []
  for page in PAGES:
    for command in _commands(page):
      for part in command.split("&&"):
        words = part.split()
        if words[:2] == ["python3", "-m"] and words[2].startswith("medseg_jax"):
          found.append((_name(page), words[2], words[3:]))
  return found


def _flag_names(words: list[str]) -> list[str]:
  """The flag names of `words`: optional flags in [brackets] and alternatives a|b count."""
  names = []
  for word in words:
    for option in re.findall(r"--([\w.]+)", word):
      names.append(option)
  return names


def test_every_documented_command_names_what_exists():
  keys = set(config_schema.flatten(defaults.get_config()))
  invocations = _invocations()
  assert len(invocations) > 20
  for page, module, words in invocations:
    defined = _flags_of(module) | ABSL_FLAGS
    for name in _flag_names(words):
      if name.startswith("config."):
        key = name[len("config."):]
        if key.isupper():  # a placeholder: --config.KEY=VALUE
          continue
        assert key in keys or any(k.startswith(key + ".") for k in keys), (
            f"{page}: {module} --{name}: no such config key")
      else:
        assert name in defined, f"{page}: {module} has no flag --{name}"
    for word in words:
      # A plan's config is written by the planning command before it.
      if (word.startswith("--config=") and not word.endswith("FILE")
          and not word.startswith("--config=plans/")):
        path = word[len("--config="):].split(":")[0]
        assert os.path.exists(os.path.join(REPO, path)), f"{page}: {word}"


def _run(command: str, tmp_path, **env):
  return subprocess.run(shlex.split(command), cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, PYTHONPATH=REPO, **env))


def test_the_cheap_commands_run_as_written(tmp_path):
  """The LR plan of a config on 8 devices, and the (empty) local zoo."""
  schedule = next(c for p in PAGES for c in _commands(p)
                  if c.startswith("python3 -m medseg_jax.tuning.schedule --config=configs/"
                                  "quickstart.py"))
  proc = _run(schedule, tmp_path)
  assert proc.returncode == 0 and "peak" in proc.stdout + proc.stderr, proc.stderr[-2000:]
  listing = next(c for p in PAGES for c in _commands(p) if c == "python3 -m medseg_jax.zoo list")
  proc = _run(listing, tmp_path, MEDSEG_MODELS=str(tmp_path / "models"))
  assert proc.returncode == 0, proc.stderr[-2000:]
