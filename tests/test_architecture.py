"""The layers of docs/architecture.md hold: the torch-free core stays torch-free, and no import cycles (that it
imports with torch unimportable is tested in test_export.test_runtime_imports_no_torch)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "patchcore"
HEAVY = {"torch", "torchvision", "timm", "scipy", "sklearn", "skimage", "faiss", "safetensors", "onnx", "typer",
         "rich", "fastapi", "ray"}


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the modules ``path`` imports (outside ``if TYPE_CHECKING:`` blocks)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST, depth: int) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if isinstance(child, ast.Import) and (depth == 0 or not top_level_only):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and (depth == 0 or not top_level_only):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                found.add(mod)
                # `from . import x` may name a submodule
                found.update(f"{mod}.{a.name}" for a in child.names)
            visit(child, depth + (1 if nested else 0))

    visit(tree, 0)
    return found


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", [p for p in _sources() if "core" in p.relative_to(SRC).parts
                                  or p.name in ("runtime.py", "errors.py", "prediction.py")],
                         ids=lambda p: str(p.relative_to(SRC)))
def test_the_torch_free_layer_imports_nothing_heavy(path):
    """core/ and the runtime import numpy, Pillow and the standard library (faiss only inside a function, to
    build the search cells where the estimator is installed); and nothing of the package above them."""
    heavy_top = {m.split(".")[0] for m in _imports(path, top_level_only=True)} & HEAVY
    assert not heavy_top, f"{path.name} imports {heavy_top} at module level"
    anywhere = {m.split(".")[0] for m in _imports(path, top_level_only=False)} & (HEAVY - {"faiss"})
    assert not anywhere, f"{path.name} imports {anywhere}"
    own = {m for m in _imports(path, top_level_only=False) if m.startswith("patchcore")}
    allowed = ("patchcore.core", "patchcore.errors")
    assert all(m.startswith(allowed) for m in own), f"{path.name} imports {own - set(allowed)}"


def test_no_import_cycles_at_module_level():
    graph = {}
    names = {_module(p) for p in _sources()}
    for p in _sources():
        graph[_module(p)] = {m for m in _imports(p, top_level_only=True) if m in names and m != _module(p)}
    # the package's __init__ imports its submodules, and a submodule's `from . import x` reads the package:
    # that is Python's own structure, not a cycle between steps
    for deps in graph.values():
        deps.discard("patchcore")
    seen: dict[str, int] = {}

    def walk(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for dep in sorted(graph.get(node, ())):
            if seen.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [node, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in seen:
                walk(dep, stack + [dep])
        seen[node] = 2

    for n in sorted(graph):
        if n not in seen:
            walk(n, [n])


def test_no_module_calls_another_modules_private_names():
    """`other._name(...)` / `from .other import _name` across modules: a public method is the way in."""
    offences = []
    for p in _sources():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                offences += [f"{p.name}: from .{node.module} import {a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                offences.append(f"{p.name}:{node.lineno}: {ast.unparse(node)}")
    assert not offences, "\n".join(offences)
