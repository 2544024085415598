"""The package's import graph (every import of every module, top-level and function-local): no module imports one
that imports it back, and the model never imports the transformers-layout writers nor an optional extra."""

import ast
from pathlib import Path

import florence2

PACKAGE = Path(florence2.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The florence2 modules that `path` imports anywhere in its code (as 'florence2.name')."""
    module = "florence2" if path.stem == "__init__" else f"florence2.{path.stem}"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("florence2")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from .x import y (the package is flat)
                base = "florence2" + (f".{node.module}" if node.module else "")
            elif (node.module or "").startswith("florence2"):
                base = node.module
            else:
                continue
            if base == "florence2":  # `from . import x` imports the module florence2.x
                found |= {f"florence2.{alias.name}" for alias in node.names}
            else:
                found.add(base)
    found.discard(module)
    return {name for name in found if name != "florence2"}  # the package itself is always being imported


def graph() -> dict[str, set[str]]:
    modules = {("florence2" if p.stem == "__init__" else f"florence2.{p.stem}"): p for p in PACKAGE.glob("*.py")}
    edges = {name: imports_of(path) for name, path in modules.items()}
    unknown = {dep for deps in edges.values() for dep in deps} - set(modules)
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    return edges


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in edges[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def cycle_through(edges: dict[str, set[str]], start: str) -> list[str]:
    """A shortest import chain from `start` back to itself ([] if there is none)."""
    paths, seen = [[start]], set()
    while paths:
        path = paths.pop(0)
        for dep in sorted(edges[path[-1]]):
            if dep == start:
                return [*path, start]
            if dep not in seen:
                seen.add(dep)
                paths.append([*path, dep])
    return []


def test_no_import_cycle():
    edges = graph()
    cycles = [" -> ".join(cycle_through(edges, name)) for name in sorted(edges) if cycle_through(edges, name)]
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_walk_sees_function_local_imports(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n    import florence2.c\n")
    assert imports_of(tmp_path / "a.py") == {"florence2.b", "florence2.c"}


def test_the_model_never_imports_the_transformers_layout_writers():
    edges = graph()
    for module in ("florence2.model", "florence2.generate", "florence2.processor", "florence2.predict"):
        assert "florence2.transformers_layout" not in reachable(edges, module), module
