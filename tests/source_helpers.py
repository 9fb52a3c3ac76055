"""Reading the package's own sources in tests."""

import ast
import gc
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cloud_jax"


def parse(path: Path) -> ast.Module:
    # No garbage collection inside ast.parse. On Python 3.11.7 a finalizer that runs there and
    # formats a traceback (which calls ast.parse) makes the outer parse raise "SystemError: AST
    # constructor recursion depth mismatch". A failed orbax restore in an earlier test leaves such
    # objects: asyncio tasks whose exceptions were never retrieved.
    gc.collect()
    gc.disable()
    try:
        return ast.parse(path.read_text(), str(path))
    finally:
        gc.enable()
