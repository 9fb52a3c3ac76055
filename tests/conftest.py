"""Shared test set-up: CPU only, fp32, 1 torch thread, a persistent compilation cache, and the
--runslow switch."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _compilation_cache_dir() -> str | None:
    """Most of the suite's time is XLA compiling the same tiny programs; a cache on disk makes
    every later session (and every subprocess a test starts) load them instead. An existing
    JAX_COMPILATION_CACHE_DIR wins; an unwritable location leaves the cache off."""
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not path:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = Path(xdg) / "cloud_jax" if xdg else Path(__file__).resolve().parents[1] / ".cache"
        path = str(root / "jax_compilation_cache")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    return path


# Set as environment variables before JAX is imported so that this process and every
# subprocess read the same settings. Tiny test programs compile in well under JAX's default
# one-second threshold, so both size and time thresholds go to zero.
_cache = _compilation_cache_dir()
if _cache:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
else:
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (real SmolLM2 weights, long runs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _torch_one_thread():
    try:
        import torch
    except ImportError:
        return
    # Two torch threads on a busy 2-core machine can be 10-20x slower than one.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A command run in a test configures the root logger (``logging.basicConfig``) with a
    handler on that test's ``sys.stderr``; under ``capsys`` that stream is closed when the test
    ends, and a later test's log line would then print "--- Logging error ---" tracebacks into
    whatever it captures. Each test leaves the root logger's handlers and level as it found
    them."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):  # pytest's own capture handlers come and go by phase
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers and not type(handler).__module__.startswith("_pytest"):
            root.addHandler(handler)
    root.setLevel(level)
