"""Reading the package's own sources in tests."""

import ast
import functools
import gc
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cloud_jax"


@functools.lru_cache(maxsize=None)
def package_sources() -> dict[Path, ast.Module]:
    """Every module of the package, parsed once per test session."""
    # No garbage collection inside ast.parse. On Python 3.11.7 a finalizer that runs there and
    # formats a traceback (which calls ast.parse) makes the outer parse raise "SystemError: AST
    # constructor recursion depth mismatch". A failed orbax restore in an earlier test leaves such
    # objects: asyncio tasks whose exceptions were never retrieved. One collection for all files:
    # a full collection of a heap full of compiled programs takes a second or more.
    gc.collect()
    gc.disable()
    try:
        return {path: ast.parse(path.read_text(), str(path))
                for path in sorted(PACKAGE.rglob("*.py"))}
    finally:
        gc.enable()
