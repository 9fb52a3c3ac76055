"""``python -m cloud_jax bench sample|train [args...]``: benchmarks that print numbers."""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

BENCHMARKS = {
    "sample": ("cloud_jax.cli.bench.sample", "critiques/s of our sampler against transformers"),
    "train": ("cloud_jax.cli.bench.train", "training step time and throughput"),
    "serve": ("cloud_jax.cli.bench.serve", "the reward server: continuous against static batching"),
}


def _usage() -> str:
    lines = ["usage: python -m cloud_jax bench <benchmark> [args...]", "", "benchmarks:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in BENCHMARKS:
        print(f"error: unknown benchmark {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    name = BENCHMARKS[argv[0]][0]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        print(f"benchmark {argv[0]!r} is not available: module {name} is missing from this "
              "checkout", file=sys.stderr)
        return 2
    return int(module.main(argv[1:]) or 0)
