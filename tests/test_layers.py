"""The package's layers: every import inside nmspmm (module level or inside a function) goes down the layers
or stays within one, never up: kernels -> formats -> prune -> ops and perf -> nn and training -> bench, cli and
the studies -> the package's front door."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nmspmm"
# Rank of each top-level part of the package; an import may name a part of the same rank or lower.
LAYERS = {
    "_version": 0, "progress": 0, "kernels": 0, "formats": 1, "prune": 2, "ops": 3, "perf": 3,
    "nn": 4, "training": 4, "pretrained": 4, "bench": 5, "cli": 5, "demo": 5,
    "__init__": 6, "__main__": 6,
}


def _part(module: str) -> str:
    """The top-level part of a dotted module name inside nmspmm ('ops' for 'nmspmm.ops.nm')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root.parent).with_suffix("")
    return ".".join(relative.parts)


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import of an nmspmm module in the file, at any depth."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "nmspmm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.split(".")[0] == "nmspmm":
                    found.append((node.lineno, node.module))
                continue
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            # "from . import ops" names submodules: each alias is a module of its own.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names] if not node.module else []
            if node.module:
                found.append((node.lineno, target))
    return found


def upward_imports(root: Path = PACKAGE) -> list[str]:
    """Every import in the package that names a part of a higher layer than its own file's part."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        own = _part(_module_name(path, root))
        for line, target in _imports(path, root):
            other = _part(target)
            if other not in LAYERS or own not in LAYERS:
                problems.append(f"{path.relative_to(root)}:{line}: part {other!r} or {own!r} has no layer")
            elif LAYERS[other] > LAYERS[own]:
                problems.append(f"{path.relative_to(root)}:{line}: {own} imports {target} (a higher layer)")
    return problems


def test_no_import_goes_up_the_layers():
    assert upward_imports() == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    package = tmp_path / "nmspmm"
    (package / "formats").mkdir(parents=True)
    (package / "prune").mkdir()
    (package / "__init__.py").write_text("")
    (package / "prune" / "__init__.py").write_text("")
    (package / "formats" / "__init__.py").write_text("")
    (package / "formats" / "csr.py").write_text("def f():\n    from ..prune import mask\n    return mask\n")
    assert upward_imports(package) == ["formats/csr.py:2: formats imports nmspmm.prune (a higher layer)"]


@pytest.mark.parametrize("part", sorted({path.parent.name for path in PACKAGE.rglob("*.py")} - {"nmspmm"}))
def test_every_subpackage_has_a_layer(part):
    assert part in LAYERS
