"""Every import in the package respects the layers of docs/ARCHITECTURE.md."""

import ast
import re
from pathlib import Path

from source_helpers import PACKAGE, package_sources

DOC = PACKAGE.parent / "docs" / "ARCHITECTURE.md"


def documented_layers() -> dict[str, int]:
    block = re.search(r"```layers\n(.*?)```", DOC.read_text(), re.S)
    assert block, f"{DOC} has no ```layers block"
    layers = {}
    for line in block.group(1).splitlines():
        level, *names = line.split()
        for name in names:
            layers[name] = int(level)
    return layers


def unit_of(module: str) -> str:
    """``cloud_jax.model.cache`` -> ``model``; the package root stands for ``api``."""
    parts = module.split(".")
    return "api" if len(parts) == 1 else parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(tree: ast.Module, here: str, is_package: bool):
    """(line, imported cloud_jax module) for every import, at any depth of the file."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + is_package]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                # `from cloud_jax import model` imports the subpackage, `from cloud_jax import load`
                # the package root.
                sub = f"{module}.{alias.name}"
                if module == "cloud_jax" and (PACKAGE / alias.name).exists():
                    yield node.lineno, sub
                elif module == "cloud_jax" and (PACKAGE / f"{alias.name}.py").exists():
                    yield node.lineno, sub
                else:
                    yield node.lineno, module


def test_the_documented_layers_name_every_module_of_the_package():
    layers = documented_layers()
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units - set(layers) == set(), "modules missing from docs/ARCHITECTURE.md's layers"


def test_no_module_imports_a_layer_above_it_or_a_sibling_package():
    layers = documented_layers()
    wrong = []
    for path, tree in package_sources().items():
        here = module_name(path)
        mine = unit_of(here)
        seen = set()
        for line, target in imported_modules(tree, here, path.name == "__init__.py"):
            if (line, target) in seen:
                continue
            seen.add((line, target))
            if target != "cloud_jax" and not target.startswith("cloud_jax."):
                continue
            theirs = unit_of(target)
            if theirs == mine:
                continue
            if layers[theirs] > layers[mine]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {mine} (layer "
                             f"{layers[mine]}) imports {target} (layer {layers[theirs]})")
            elif layers[theirs] == layers[mine]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {mine} imports its "
                             f"sibling {target} (both layer {layers[mine]})")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check itself: a function-level import of a higher layer is found."""
    tree = ast.parse("def f():\n    from cloud_jax.api import load\n    import cloud_jax.cli.common\n")
    found = [t for _, t in imported_modules(tree, "cloud_jax.model.layers", False)]
    assert found == ["cloud_jax.api", "cloud_jax.cli.common"]
    assert [unit_of(t) for t in found] == ["api", "cli"]
    layers = documented_layers()
    assert all(layers[unit_of(t)] > layers["model"] for t in found)
