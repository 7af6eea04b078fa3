"""The import graphs of bird_jax and data_gen have no cycle: every import counts, including the lazy ones
inside functions, so a module lower in the stack (scoring, run_state, data_gen.templates) never reaches back
up to the modules built on it (eval, inference, train, export, api; the pipeline and its LLM stage)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _modules(package: str, root: Path) -> dict[str, Path]:
  """Dotted module name -> file, for every .py file under the package (a package is its __init__)."""
  out = {}
  for path in sorted((root / package).rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
  """The innermost module of the package that `name` (a module or a name inside one) lives in."""
  while name:
    if name in modules:
      return name
    name = name.rpartition(".")[0]
  return None


def import_graph(package: str, root: Path = REPO) -> dict[str, set[str]]:
  """module -> the package's modules it imports anywhere in its body (top level or inside functions)."""
  modules = _modules(package, root)
  graph: dict[str, set[str]] = {}
  for mod, path in modules.items():
    here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        targets += [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = here.split(".")[:len(here.split(".")) - (node.level - 1)]
          origin = ".".join(base + ([node.module] if node.module else []))
        else:
          origin = node.module or ""
        # `from pkg import sub` imports the submodule when there is one, else a name of pkg itself.
        targets += [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
    graph[mod] = {t for t in (_resolve(x, modules) for x in targets) if t and t != mod}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


@pytest.mark.parametrize("package", ["bird_jax", "data_gen"])
def test_no_import_cycle(package):
  graph = import_graph(package)
  assert len(graph) > 10
  cycle = find_cycle(graph)
  assert cycle is None, f"{package} imports in a circle: {' -> '.join(cycle)}"


def test_finder_sees_lazy_and_relative_imports(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "low.py").write_text("def f():\n  from pkg.sub import high\n")  # lazy, inside a function
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "high.py").write_text("from ..low import f\nfrom . import other\n")  # relative
  (pkg / "sub" / "other.py").write_text("import os\n")
  graph = import_graph("pkg", tmp_path)
  assert graph["pkg.low"] == {"pkg.sub.high"}
  assert graph["pkg.sub.high"] == {"pkg.low", "pkg.sub.other"}
  assert find_cycle(graph) == ["pkg.low", "pkg.sub.high", "pkg.low"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_trainer_imports_evaluation_never_the_reverse():
  bird = import_graph("bird_jax")
  assert "bird_jax.inference" in bird["bird_jax.train"]
  for low in ("bird_jax.scoring", "bird_jax.inference", "bird_jax.eval", "bird_jax.run_state", "bird_jax.export",
              "bird_jax.api"):
    assert "bird_jax.train" not in bird[low], low
