"""pyproject.toml's dependencies install what the code imports.

`make venv` installs requirements.txt (exact pins) and then the package with --no-deps, so a
package missing from pyproject.toml goes unnoticed there; a user who installs with pip alone
(`pip install .`, `pip install 'cloud-jax[datasets]'`, docs/TRAINING.md) gets only pyproject's
list. Every runtime pin of requirements.txt is declared there (a dependency or an extra) with a
floor the pin meets, and every package a cloud_jax module imports is one of them or an optional
package named below with where it is needed.
"""

import ast
import importlib.metadata
import os
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# requirements.txt lines that run the tests, not the code.
TEST_RUNNERS = {"pytest", "pytest-xdist"}
# Imported only where an optional feature asks for it, each with its own install line.
OPTIONAL = {
    "torch": "bench train / bench sample's PyTorch side (requirements-test.txt)",
    "wandb": "train.wandb_project (pip install wandb)",
    "libtpu": "aot for TPU topologies (requirements-tpu.txt)",
    "jax-cuda12-plugin": "aot for NVIDIA GPUs (requirements-gpu-aot.txt)",
    "requests": "bench serve's HTTP client (installed with gguf and tensorflow-datasets)",
}
# Import names whose distribution is not installed here (optional ones).
NOT_INSTALLED = {"wandb": "wandb", "libtpu": "libtpu", "jax_cuda12_plugin": "jax-cuda12-plugin",
                 "torch": "torch"}


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    declared = {}
    for line in project["dependencies"] + [
            r for extra in project.get("optional-dependencies", {}).values() for r in extra]:
        req = Requirement(line)
        declared[canonicalize_name(req.name)] = req
    return declared


def _pins():
    pins = {}
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                req = Requirement(line)
                pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return pins


def _imported_distributions():
    """{distribution: a module importing it} over every import in cloud_jax/, at any depth."""
    by_module = importlib.metadata.packages_distributions()
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "cloud_jax")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top == "cloud_jax":
                        continue
                    dists = by_module.get(top) or [NOT_INSTALLED.get(top, top)]
                    for dist in dists:
                        found.setdefault(canonicalize_name(dist),
                                         os.path.relpath(path, ROOT))
    return found


def test_every_runtime_pin_is_declared_in_pyproject_with_a_floor_it_meets():
    declared, problems = _pyproject(), []
    for name, version in _pins().items():
        if name in TEST_RUNNERS:
            continue
        if name not in declared:
            problems.append(f"{name}=={version}: not in pyproject.toml")
        elif not declared[name].specifier.contains(version, prereleases=True):
            problems.append(f"{name}=={version}: pyproject.toml asks for "
                            f"{declared[name].specifier}")
    assert not problems, "\n".join(problems)


def test_every_package_the_code_imports_is_declared_or_optional():
    declared = _pyproject()
    missing = [f"{dist} (imported by {where})"
               for dist, where in sorted(_imported_distributions().items())
               if dist not in declared and dist not in OPTIONAL]
    assert not missing, "\n".join(missing)
