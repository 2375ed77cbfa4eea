"""The package's layers: each module imports only from its own layer and those below, and no import cycles.

Every import counts, at module level or inside a function, relative or absolute, read from the source files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "sdvae"  # read as files: an import cycle may not even load
# lowest first; the package root (the public names), the CLI and the demo sit on top
LAYERS = ("_version", "util", "model", "fast", "tiled", "vae", "checkpoint", "data", "top")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The rank of `sdvae.X...` in LAYERS; modules outside the named layers are on top."""
    head = module.split(".")[1] if "." in module else "top"
    return LAYERS.index(head if head in LAYERS else "top")


def imports(path: Path) -> set[str]:
    """The sdvae modules a source file imports (a `from package import name` counts name's module if it is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "sdvae"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "sdvae":
                target = node.module
            else:
                continue
            modules = {f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")}
            found |= modules if len(modules) == len(node.names) else modules | {target}
    return {m for m in found if m != name}


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(ROOT.rglob("*.py"))}


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} ({LAYERS[layer(m)]}) imports {t} ({LAYERS[layer(t)]})"
              for m, targets in graph().items() for t in sorted(targets)
              if t != "sdvae" and layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_the_layers_are_folders_a_reader_sees():
    for name in LAYERS[2:-1]:
        assert (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file(), name


def test_no_import_cycles():
    edges = graph()
    for module in edges:  # packages import their modules' parents implicitly; only explicit imports count
        edges[module] = {t for t in edges[module] if t in edges}
    seen: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for target in sorted(edges[node]):
            if seen.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [node, target]))
            if target not in seen:
                visit(target, path + [node])
        seen[node] = 2

    for module in sorted(edges):
        if module not in seen:
            visit(module, [])
