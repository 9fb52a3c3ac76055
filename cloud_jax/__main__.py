"""``python -m cloud_jax <command> ...``: one entry point for everything but training.

Training has its own entry point, ``python -m cloud_jax.train``. Both pin JAX to the CPU on a host
without an accelerator where ``JAX_PLATFORMS`` is unset
(:func:`cloud_jax.cli.common.default_to_cpu_without_accelerator`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# command -> (module with a `main(argv) -> int`, one-line help). Modules load only when used, so
# `--help` stays fast.
COMMANDS = {
    "demo": ("cloud_jax.cli.demo", "SmolLM2-135M scores a few responses with critiques (make "
                               "demo-smollm2)"),
    "convert-gguf": ("cloud_jax.cli.convert",
                     "convert a Llama GGUF (default: bundled SmolLM2-135M) to a HF directory"),
    "export-hf": ("cloud_jax.cli.export",
                  "re-export a checkpoint: CLoud reference layout or plain HF backbone"),
    "score": ("cloud_jax.cli.score", "score rows: sample K critiques each and read the rewards"),
    "critique": ("cloud_jax.cli.critique",
                 "stage 2: regenerate every critique of a dataset with the SFT model"),
    "evaluate": ("cloud_jax.cli.evaluate",
                 "RewardBench-style pairwise accuracy (with a K sweep) and Best-of-N"),
    "make-benchmark": ("cloud_jax.cli.make_benchmark",
                       "write the built-in arithmetic reasoning benchmark (rows with oracle "
                       "critiques)"),
    "pipeline": ("cloud_jax.cli.pipeline",
                 "CLoud vs classic end to end: pretrain, critique SFT, self-critique, train both, "
                 "evaluate"),
    "aot": ("cloud_jax.cli.aot", "compile the train and sampling steps for a TPU topology from a CPU "
                             "host; print memory, FLOPs, step time"),
    "serve": ("cloud_jax.cli.serve", "an HTTP reward server for RL loops (OpenRLHF protocol and "
                                     "a native one)"),
    "bench": ("cloud_jax.cli.bench", "benchmarks: `bench train`, `bench sample`, `bench serve`"),
}


def _usage() -> str:
    lines = ["usage: python -m cloud_jax [--debug] <command> [args...]", "", "commands:"]
    width = max(len(c) for c in COMMANDS)
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "training: python -m cloud_jax.train [--debug] --config configs/X.yaml "
              "[key=value ...]",
              "`python -m cloud_jax <command> -h` describes one command.",
              "A user error (a missing file, a bad flag or config value, a malformed row) prints "
              "one `error:` line and exits 2; --debug shows its traceback instead.",
              "With JAX_PLATFORMS unset, a host with no accelerator device (NVIDIA, AMD, TPU) "
              "runs JAX on the CPU without probing for one; JAX_PLATFORMS (\"\" for JAX's own "
              "search) decides where set."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"]
    argv = argv[debug:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from cloud_jax.cli.common import default_to_cpu_without_accelerator, run_command

    default_to_cpu_without_accelerator()  # before a command's modules could make a backend
    module = importlib.import_module(COMMANDS[command][0])
    return run_command(module.main, ["--debug"] * debug + rest)


if __name__ == "__main__":
    sys.exit(main())
