"""Every import points downwards: a module imports only from its own layer or a lower one.

The layers (DESIGN.md §2), lowest first. Imports inside functions count; only those under
``if TYPE_CHECKING:`` are skipped (they never run). ``pat/__init__.py`` (the public facade)
and ``pat/__main__.py`` sit on top and are not checked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PAT = Path(__file__).resolve().parents[1] / "pat"

# first name under pat -> layer; a new module must be placed here
LAYERS = {
    "errors": 0, "registry": 0, "modes": 0,
    "io": 1, "records": 1, "data": 1, "models": 1, "config": 1, "budget": 1,
    "masks": 2,
    "engine": 3,
    "children": 4, "splitting": 4, "pack": 4, "tuner": 4, "producers": 4, "jobs": 4, "parent": 4, "store": 4, "lock": 4,
    "ensemble": 5,
    "comparison": 6, "pipeline": 6,
    "cli": 7,
}  # fmt: skip
EXEMPT = {"pat", "pat.__main__"}
FACADE_CONSTANTS = {"__version__"}  # plain values of pat/__init__.py, safe to read from anywhere


def module_name(path: Path) -> str:
    parts = path.relative_to(PAT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    top = module.split(".")[1]
    assert top in LAYERS, f"pat.{top} has no layer; add it to LAYERS in tests/test_layers.py"
    return LAYERS[top]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.AST, package: str) -> list[tuple[int, str, list[str]]]:
    """``(line, target module, imported names)`` of every pat import outside TYPE_CHECKING."""
    found: list[tuple[int, str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "pat")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            if base.split(".")[0] == "pat":
                names = [a.name for a in node.names]
                if base == "pat":  # ``from pat import masks`` imports the module pat.masks
                    found.extend((node.lineno, f"pat.{n}", []) for n in names if n not in FACADE_CONSTANTS)
                else:
                    found.append((node.lineno, base, names))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def modules() -> list[Path]:
    return sorted(PAT.rglob("*.py"))


def violations(path: Path, source: str | None = None) -> list[str]:
    name = module_name(path)
    if name in EXEMPT:
        return []
    tree = ast.parse(source if source is not None else path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for line, target, _ in imports(tree, package):
        if target in EXEMPT:
            out.append(f"{name} (line {line}) imports the facade {target}")
        elif layer(target) > layer(name):
            out.append(f"{name} (line {line}) imports {target}: layer {layer(target)} is above its {layer(name)}")
    return out


def test_every_module_has_a_layer():
    for path in modules():
        name = module_name(path)
        if name not in EXEMPT:
            layer(name)


def test_no_import_points_upwards():
    found = [v for path in modules() for v in violations(path)]
    assert not found, "imports that point upwards:\n" + "\n".join(found)


@pytest.mark.parametrize(("module", "added"), [
    ("config.py", "from pat.engine.checkpoint import atomic_write\n"),
    ("masks/apply.py", "def f():\n    import pat.engine.callbacks\n"),
    ("engine/cost.py", "from pat import ensemble\n"),
])  # fmt: skip
def test_an_upward_import_is_named(module, added):
    path = PAT / module
    found = violations(path, path.read_text() + added)
    assert len(found) == 1 and module_name(path) in found[0] and "line" in found[0], found


def test_type_checking_imports_are_skipped():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pat.cli import cli\n"
    assert violations(PAT / "io.py", source) == []


def test_a_checkpoint_loads_with_only_the_checkpoint_module_imported(tmp_path):
    """The physical-child rebuilder is registered by pat.masks, which load_model imports."""
    from pat.children import save_child, split
    from pat.models import create_model

    child = split(create_model("lenet-s"), 2, level="neuron", physical=True, sparsity=0.5)[0]
    save_child(tmp_path / "child.pt", child)
    code = ("import sys; from pat.engine.checkpoint import load_model\n"
            "assert 'pat.children' not in sys.modules\n"
            f"model, ckpt = load_model({str(tmp_path / 'child.pt')!r})\n"
            "print(sum(p.numel() for p in model.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == sum(p.numel() for p in child.parameters())
