"""The package's shape, read from its source: no import circle between modules, packages
stacked in the order ARCHITECTURE.md gives (every import, function-level ones included,
points down), short modules and functions, and collectives only in the parallel package."""

import ast
import os
import tokenize

import pytest

from helpers import REPO

PACKAGE = os.path.join(REPO, "medseg_jax")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# The stages from the bottom (ARCHITECTURE.md): a package or top-level module imports only
# those of lower levels, never one of its own level or above.
LEVELS = (
    {"errors", "defaults"},
    {"files"},
    {"components"},
    {"config_schema"},
    {"cli", "modelfile"},
    {"models", "data", "optim", "zoo"},
    {"parallel"},
    {"monitor", "evaluation"},
    {"kinds"},
    {"training"},
    {"export"},
    {"tuning", "planning"},
    {"config"},
    {"commands"},
    {"main", "plan", "dashboard", "recipe"},
)


def _modules() -> dict[str, str]:
  """Dotted module name -> path, for every module of the package."""
  found = {}
  for dirpath, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The package's modules that the module at `path` imports (at any level)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        if full in modules:
          found.add(full)
        elif node.module in modules:
          found.add(node.module)
  return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle of `graph`, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_the_cycle_finder_finds_a_circle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def _packages_read(path: str, modules: dict[str, str]) -> set[str]:
  """The packages whose __init__ the module at `path` reads names from: `from PACKAGE import
  NAME`, a module of the package included. That reads PACKAGE's namespace, so a module the
  package's __init__ imports, doing so, meets its package half-initialised."""
  return {node.module for node in ast.walk(ast.parse(open(path).read()))
          if isinstance(node, ast.ImportFrom) and node.level == 0
          and modules.get(node.module, "").endswith("__init__.py")}


def _import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
  """Module -> the modules it imports. A module's own packages count only where it reads
  their namespace (`_packages_read`): that Python imports a module's packages first, and
  that a package's __init__ imports its own modules, is how packages work."""
  return {m: {i for i in _imports(p, modules) if not m.startswith(i + ".")}
          | _packages_read(p, modules) for m, p in modules.items()}


def test_no_module_imports_itself_in_a_circle():
  graph = _import_graph(_modules())
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_circle_check_finds_a_module_that_reads_its_own_package(tmp_path):
  """models/__init__ imports unet3d; `from medseg_jax.models import conv3d_cpu` in unet3d
  runs that __init__ (a circle); `import medseg_jax.models.conv3d_cpu` does not read it."""
  package = tmp_path / "medseg_jax" / "models"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("from medseg_jax.models.unet3d import UNet3D\n")
  (package / "conv3d_cpu.py").write_text("")
  modules = {f"medseg_jax.models.{name}": str(package / f"{name}.py")
             for name in ("unet3d", "conv3d_cpu")}
  modules["medseg_jax.models"] = str(package / "__init__.py")
  (package / "unet3d.py").write_text("from medseg_jax.models import conv3d_cpu\n")
  assert _cycle(_import_graph(modules)) == ["medseg_jax.models", "medseg_jax.models.unet3d",
                                            "medseg_jax.models"]
  (package / "unet3d.py").write_text("import medseg_jax.models.conv3d_cpu as conv3d_cpu\n")
  assert _cycle(_import_graph(modules)) is None


def _unit(module: str) -> str:
  """The package (or top-level module) a module belongs to: medseg_jax.data.loader -> data."""
  return module.split(".")[1]


def _level(unit: str) -> int:
  return next(i for i, units in enumerate(LEVELS) if unit in units)


def _upward_imports(modules: dict[str, str]) -> list[str]:
  """Every import of a package's module by a module of a package at the same or a lower
  level, as 'importer -> imported'."""
  found = []
  for module, path in sorted(modules.items()):
    for imported in sorted(_imports(path, modules)):
      low, high = _unit(module), _unit(imported)
      if low != high and _level(high) >= _level(low):
        found.append(f"{module} -> {imported}")
  return found


def test_every_package_has_a_level():
  units = {_unit(m) for m in _modules() if m != "medseg_jax"}
  assert units == set().union(*LEVELS)


def test_the_level_check_finds_an_import_that_points_up(tmp_path):
  package = tmp_path / "medseg_jax"
  (package / "data").mkdir(parents=True)
  (package / "data" / "loader.py").write_text(
      "def f():\n  from medseg_jax.training import step\n")
  (package / "training").mkdir()
  (package / "training" / "step.py").write_text("from medseg_jax.data import loader\n")
  modules = {"medseg_jax.data.loader": str(package / "data" / "loader.py"),
             "medseg_jax.training.step": str(package / "training" / "step.py")}
  assert _upward_imports(modules) == ["medseg_jax.data.loader -> medseg_jax.training.step"]


def test_packages_import_only_the_levels_below_them():
  assert _upward_imports(_modules()) == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_modules_and_functions_are_short(module):
  path = _modules()[module]
  source = open(path).read()
  assert source.count("\n") <= MAX_MODULE_LINES, f"{path}: over {MAX_MODULE_LINES} lines"
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      length = node.end_lineno - node.lineno + 1
      assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name}: {length} lines"


def test_collectives_and_meshes_live_in_the_parallel_package():
  words = ("jax.pmap", "shard_map", "lax.pmean", "lax.psum", "Mesh(")
  for module, path in _modules().items():
    if module.startswith("medseg_jax.parallel"):
      continue
    source = _code(path)  # a strategy's name in a string or comment is no collective
    assert not [w for w in words if w in source], f"{path} uses {[w for w in words if w in source]}"


def _code(path: str) -> str:
  """The source at `path` without its strings and comments, tokens joined without spaces."""
  with open(path, "rb") as f:
    return "".join(t.string for t in tokenize.tokenize(f.readline)
                   if t.type not in (tokenize.STRING, tokenize.COMMENT, tokenize.ENCODING))



def test_the_collectives_check_reads_code_not_strings_or_comments(tmp_path):
  path = tmp_path / "planted.py"
  path.write_text('strategy = "shard_map"  # or pmap\ntotal = jax.lax.psum(x, "i")\n')
  code = _code(str(path))
  assert "lax.psum" in code and "shard_map" not in code

# The seam between 2D and 3D: the kind of data is chosen once from data.spatial_dims in
# these modules; elsewhere the key may be named in a message, a file format or the planner's
# written config, a few times.
SEAM = ("medseg_jax.kinds", "medseg_jax.kinds.base", "medseg_jax.kinds.slices",
        "medseg_jax.kinds.volumes")
MAX_SPATIAL_DIMS_OUTSIDE_SEAM = 4


def _spatial_dims_lines(modules: dict[str, str]) -> list[str]:
  """'path:line' of every line naming spatial_dims outside the seam's modules."""
  found = []
  for module, path in sorted(modules.items()):
    if module in SEAM:
      continue
    for number, line in enumerate(open(path).read().splitlines(), 1):
      if "spatial_dims" in line:
        found.append(f"{os.path.relpath(path, REPO)}:{number}")
  return found


def test_the_seam_modules_exist():
  assert set(SEAM) <= set(_modules())


def test_the_spatial_dims_count_sees_a_branch_outside_the_seam(tmp_path):
  package = tmp_path / "medseg_jax" / "data"
  package.mkdir(parents=True)
  (package / "loader.py").write_text("if cfg.data.spatial_dims == 3:\n  pass\n")
  assert _spatial_dims_lines({"medseg_jax.data.loader": str(package / "loader.py")}) != []


def test_2d_or_3d_is_chosen_in_the_seam_only():
  lines = _spatial_dims_lines(_modules())
  assert len(lines) <= MAX_SPATIAL_DIMS_OUTSIDE_SEAM, lines
