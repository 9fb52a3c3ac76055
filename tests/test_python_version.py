"""The Python the project asks for: pyproject.toml's requires-python and README's set-up line
name a version every pinned requirement installs on, and `make` names a Python too old for them
before it installs anything."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _floor() -> str:
    spec = re.search(r'^requires-python = ">=([\d.]+)"', _read("pyproject.toml"), re.M).group(1)
    return spec + ".0" if spec.count(".") == 1 else spec


def test_every_pin_installs_on_the_python_the_project_asks_for():
    floor = _floor()
    assert f"Python {floor.rsplit('.', 1)[0]}+" in _read("README.md")
    too_new = []
    for line in _read("requirements.txt").splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            meta = importlib.metadata.metadata(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        needs = meta.get("Requires-Python")
        if needs and floor not in SpecifierSet(needs):
            too_new.append(f"{req.name} {meta['Version']}: Requires-Python {needs}")
    assert not too_new, f"pyproject.toml says Python >={floor}, but: {too_new}"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_names_a_python_too_old_before_installing(tmp_path):
    for name in ("Makefile", "requirements.txt", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    old = tmp_path / "python3.10"
    # This interpreter, reporting 3.10 to the code `make` runs with -c.
    old.write_text(f"#!{sys.executable}\nimport sys\nsys.version_info = (3, 10, 12, 'final', 0)\n"
                   "exec(sys.argv[sys.argv.index('-c') + 1])\n")
    old.chmod(0o755)
    done = subprocess.run(["make", "venv", f"PYTHON={old}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert "is Python 3.10; the pinned requirements need 3.11 or newer" in done.stderr
    assert not (tmp_path / ".venv").exists()
