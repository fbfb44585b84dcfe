"""The package's layout is its architecture: imports go one way and never in a circle.

Every import of every module under ``fractrain_jax/`` is read from its source
(no module is executed, nothing compiles): those inside functions and under
``TYPE_CHECKING`` too, since either would close a circle. Each folder's
``__init__.py`` says what it may import; ``ALLOWED`` below is the same rule
for the test to hold the code to, and ``test_a_planted_violation_is_caught``
checks that the test itself would notice one.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "fractrain_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# Layer of a module: its folder under the package ("" for the top-level modules).
# Each layer may import its own modules and those named here: a module, a folder
# (everything under it), or "fractrain_jax.*" (every top-level module). ALGORITHM
# is the algorithm's layer: the top-level modules with models/, data/ and attach/, and
# the oneDNN conv kernels under them.
ALGORITHM = ("fractrain_jax.*", "fractrain_jax.models", "fractrain_jax.data",
             "fractrain_jax.attach", "fractrain_jax.onednn")
ALLOWED = {
    "": ALGORITHM,
    "models": ("fractrain_jax.quant", "fractrain_jax.layers", "fractrain_jax.cost",
               "fractrain_jax.errors", "fractrain_jax.norm"),
    "data": ("fractrain_jax.errors", "fractrain_jax.processes"),
    "attach": ("fractrain_jax.quant", "fractrain_jax.conv", "fractrain_jax.layers",
               "fractrain_jax.cost", "fractrain_jax.errors", "fractrain_jax.models"),
    "onednn": (),
    "run": ALGORITHM,
    "report": ("fractrain_jax.run.files", "fractrain_jax.run.console"),
    "benchmark": ALGORITHM + ("fractrain_jax.run.platform",),
}
# What the report may never reach, directly or through what it imports.
NOT_IN_REPORT = ("jax", "jaxlib", "flax", "optax", "orbax", "tensorflow", "tensorflow_datasets",
                 "tensorstore", "ml_collections")


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
  parts = path.relative_to(root.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The package's modules that ``name`` imports; other names (third-party, stdlib) as given.

  ``from A import b`` is an import of module ``A.b`` when that is a module, else of ``A``.
  """
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative: from the module's own package up.
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        found.add(sub if sub in known else base)
  return found


def graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
  """Module -> the package's modules it imports."""
  found = modules(root)
  known = set(found)
  return {name: {i for i in imports(name, path, known) if i in known}
          for name, path in found.items()}


def layer(name: str) -> str:
  parts = name.split(".")
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and _is_folder(name)) else ""


def _is_folder(name: str) -> bool:
  return (ROOT.parent / name.replace(".", "/") / "__init__.py").exists()


def allowed(importer: str, imported: str) -> bool:
  if imported == PACKAGE or layer(imported) == layer(importer):
    return True
  for rule in ALLOWED[layer(importer)]:
    if rule.endswith(".*"):  # A top-level module of the package.
      if layer(imported) == "":
        return True
    elif imported == rule or imported.startswith(rule + "."):
      return True
  return False


def violations(edges: dict[str, set[str]]) -> list[str]:
  return sorted(f"{a} imports {b}" for a, targets in edges.items() for b in targets
                if not allowed(a, b))


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module, or a module importing itself."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):  # Tarjan's algorithm; the graph has a few dozen nodes.
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in edges.get(v, ()):
        found.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return found


def reached(start: str, root: pathlib.Path = ROOT) -> set[str]:
  """Every name ``start`` imports, directly or through the package's modules (their
  packages' ``__init__`` included, which Python runs first)."""
  found = modules(root)
  known = set(found)
  seen, todo, names = set(), [start], set()
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    parts = name.split(".")
    todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # Parents run first.
    for target in imports(name, found[name], known):
      if target in known:
        todo.append(target)
      else:
        names.add(target)
  return names | seen


def test_the_package_has_no_import_circle():
  found = circles(graph())
  assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_import_follows_the_stated_direction():
  found = violations(graph())
  assert not found, "against the layers' direction:\n" + "\n".join(found)


def test_the_report_reaches_no_jax():
  for name in modules():
    if layer(name) == "report":
      bad = {n for n in reached(name) if n.split(".")[0] in NOT_IN_REPORT}
      assert not bad, f"{name} reaches {sorted(bad)}"


def test_every_folder_says_what_it_may_import():
  for init in sorted(ROOT.glob("*/__init__.py")):
    doc = " ".join((ast.get_docstring(ast.parse(init.read_text())) or "").split())
    assert "may import" in doc, f"{init.relative_to(ROOT.parent)}: no 'may import' rule"
  assert set(ALLOWED) - {""} == {p.parent.name for p in ROOT.glob("*/__init__.py")}


@pytest.mark.parametrize("planted, expected", [
    ("from fractrain_jax.run import train\n", "fractrain_jax.quant imports fractrain_jax.run.train"),
    ("from fractrain_jax.report import runs\n",
     "fractrain_jax.quant imports fractrain_jax.report.runs"),
])
def test_a_planted_violation_is_caught(tmp_path, planted, expected):
  copy = _copy_package(tmp_path)
  quant = copy / "quant.py"
  quant.write_text(quant.read_text() + "\n\ndef _planted():\n  " + planted)
  assert expected in violations(graph(copy))


def test_a_planted_circle_is_caught(tmp_path):
  copy = _copy_package(tmp_path)
  # data.sources asking the loader back: the circle issue 27 removed.
  sources = copy / "data" / "sources.py"
  sources.write_text(sources.read_text() + "\n\nfrom fractrain_jax.data.arrays import load_arrays\n")
  assert ["fractrain_jax.data.arrays", "fractrain_jax.data.sources"] in circles(graph(copy))
  clean = _copy_package(tmp_path / "clean")
  assert not circles(graph(clean))


def test_a_planted_jax_import_in_the_report_is_caught(tmp_path):
  copy = _copy_package(tmp_path)
  console = copy / "run" / "console.py"
  console.write_text(console.read_text() + "\nimport jax\n")
  assert "jax" in reached("fractrain_jax.report", copy)


def _copy_package(where: pathlib.Path) -> pathlib.Path:
  """The package's sources under ``where``; the layer rules read folders from the real tree."""
  copy = where / PACKAGE
  for path in ROOT.rglob("*.py"):
    target = copy / path.relative_to(ROOT)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(path.read_text())
  return copy
