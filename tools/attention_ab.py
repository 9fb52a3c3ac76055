"""Times two builds of the CPU decode-attention kernel (cloud_jax/model/cpu_kernels.cc,
``CloudJaxDecodeAttention``) against each other in one process, interleaved, at the bench's
attention shapes (docs/BENCHMARKS.md, "The attention kernel, A against B").

    python tools/attention_ab.py [--a-source PATH] [--b-source PATH] [--a-flags "-DNAME=1"]
        [--b-flags ...] [--rounds 15] [--calls 3] [--threads 1] [--evict-mb 64]
        [--inputs 2] [--samples 8] [--prompt-len 512] [--own-slots 129] [--own-attended 65]
        [--num-heads 12] [--num-kv-heads 4] [--head-dim 64] [--layers 12]

Each build (a source, by default cpu_kernels.cc, and extra compiler flags after the usual ones,
e.g. a ``-D`` that picks a variant) is compiled and registered under its own FFI target. One
call is a decode step's attention: ``--layers`` kernel calls in one jitted chain, each layer with
its own prefix and own-segment caches (12 x 6 MiB at the defaults, more than a 32 MiB L3), each
layer's output the next one's queries. The prefix is fully attended, each row's own segment of
``--own-slots`` up to ``--own-attended`` (the bench's 129-slot phase at its mean step). Before
every timed call a ``--evict-mb`` buffer is read (not timed), as the step's weight stream
evicts the caches between two steps' attention. A round times ``--calls`` calls of A, of B, of
B, of A (the order alternating, so drift cancels) and keeps each side's fastest; the report
gives each side's median over the rounds and the per-round ratio B / A (median, spread, rounds
below 1), and whether the two builds' outputs are bitwise equal (else their largest difference).
Times are the process's CPU time (``--clock cpu``, default: a core taken by the host's other
work does not count; ``--clock wall`` for elapsed time). ``--threads 1`` (default) pins the
process to one core before JAX starts, so the kernel runs single-threaded; more spreads its
tasks over XLA's pool as the decode does. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-source", default=None, help="A's source (default cpu_kernels.cc)")
    parser.add_argument("--b-source", default=None, help="B's source (default cpu_kernels.cc)")
    parser.add_argument("--a-flags", default="", help="extra compiler flags for A")
    parser.add_argument("--b-flags", default="", help="extra compiler flags for B")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per side per round")
    parser.add_argument("--threads", type=int, default=1,
                        help="cores the process may use (XLA's intra-op pool follows)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: the process's CPU time (time the host's other work takes "
                             "the core away is not counted); wall: elapsed time")
    parser.add_argument("--evict-mb", type=int, default=64,
                        help="MiB read before each timed call (0: none)")
    parser.add_argument("--inputs", type=int, default=2, help="prefix groups")
    parser.add_argument("--samples", type=int, default=8, help="rows per group")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--own-slots", type=int, default=129)
    parser.add_argument("--own-attended", type=int, default=65)
    parser.add_argument("--num-heads", type=int, default=12)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args(argv)
    for name in ("rounds", "calls", "threads", "inputs", "samples", "prompt_len", "own_slots",
                 "num_heads", "num_kv_heads", "head_dim", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.own_attended <= args.own_slots:
        parser.error("--own-attended must be between 0 and --own-slots")
    if args.num_heads % args.num_kv_heads:
        parser.error("--num-heads must be a multiple of --num-kv-heads")
    if args.evict_mb < 0:
        parser.error("--evict-mb must be 0 or more")
    return args


def pin(threads: int) -> list[int]:
    """Keeps this process (and the threads JAX starts later) on ``threads`` of its cores."""
    cores = sorted(os.sched_getaffinity(0))
    keep = cores[:threads]
    os.sched_setaffinity(0, keep)
    return keep


def main(argv=None) -> int:
    args = parse_args(argv)
    cores = pin(args.threads)  # before JAX sizes its thread pool

    import ctypes

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cloud_jax.model import cpu_kernels
    from cloud_jax.model.layers import _MASK_VALUE

    def register(label: str, source, flags: str) -> str:
        path = cpu_kernels.build(source=source, extra_flags=tuple(shlex.split(flags)))
        library = ctypes.cdll.LoadLibrary(str(path))
        cpu_kernels._check_extensions(library.CloudJaxKernelExtensions())
        target = f"cloud_jax_attention_ab_{label}_{path.stem}"
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(library.CloudJaxDecodeAttention), platform="cpu")
        libraries.append(library)  # kept loaded
        return target

    libraries: list = []
    targets = {"A": register("a", args.a_source, args.a_flags),
               "B": register("b", args.b_source, args.b_flags)}

    n, r = args.inputs, args.samples
    b, kv, d = n * r, args.num_kv_heads, args.head_dim
    g, p, s = args.num_heads // kv, args.prompt_len, args.own_slots
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q = normal(b, kv, g, d)
    # One buffer each per layer (slices of one stacked array could be copied before the call).
    caches = tuple([normal(*shape) for _ in range(args.layers)]
                   for shape in ((n, kv, d, p), (n, kv, p, d), (b, kv, d, s), (b, kv, s, d)))
    pmask = jnp.ones((b, p), jnp.int32)
    mask = jnp.asarray(np.arange(s)[None, :].repeat(b, 0) < args.own_attended, jnp.int32)
    scale, mask_value = np.float32(1 / np.sqrt(d)), np.float32(_MASK_VALUE)

    def step(target):
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((b, kv, g, d), jnp.float32))

        def run(q, pk, pv, k, v, pmask, mask):
            for layer in range(args.layers):  # each layer's output the next one's queries
                q = call(q, pk[layer], pv[layer], k[layer], v[layer], pmask, mask,
                         scale=scale, mask_value=mask_value)
            return q
        return jax.jit(run)

    steps = {label: step(target) for label, target in targets.items()}
    outputs = {label: np.asarray(fn(q, *caches, pmask, mask)) for label, fn in steps.items()}
    equal = bool(np.array_equal(outputs["A"], outputs["B"]))
    largest = float(np.max(np.abs(outputs["A"] - outputs["B"])))
    evict = np.ones(args.evict_mb << 18, np.float32)  # MiB of floats

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def timed(label: str) -> float:
        times = []
        for _ in range(args.calls):
            if evict.size:
                evict.sum()
            start = clock()
            jax.block_until_ready(steps[label](q, *caches, pmask, mask))
            times.append(clock() - start)
        return min(times)  # the call least disturbed by the host's other work

    per_side: dict[str, list[float]] = {"A": [], "B": []}
    ratios = []
    for round_ in range(args.rounds):
        order = ("A", "B", "B", "A") if round_ % 2 == 0 else ("B", "A", "A", "B")
        got = {"A": [], "B": []}
        for label in order:
            got[label].append(timed(label))
        a, b_ = statistics.median(got["A"]), statistics.median(got["B"])
        per_side["A"].append(a)
        per_side["B"].append(b_)
        ratios.append(b_ / a)

    def ms(x: float) -> float:
        return round(x * 1e3, 3)

    quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    summary = {
        "a": {"source": args.a_source or "cpu_kernels.cc", "flags": args.a_flags,
              "median_ms": ms(statistics.median(per_side["A"])),
              "best_ms": ms(min(per_side["A"]))},
        "b": {"source": args.b_source or "cpu_kernels.cc", "flags": args.b_flags,
              "median_ms": ms(statistics.median(per_side["B"])),
              "best_ms": ms(min(per_side["B"]))},
        "ratio_b_over_a": {"median": round(statistics.median(ratios), 4),
                           "q1": round(quart[0], 4), "q3": round(quart[2], 4),
                           "min": round(min(ratios), 4), "max": round(max(ratios), 4),
                           "rounds_below_1": sum(x < 1 for x in ratios), "rounds": len(ratios)},
        "outputs_bitwise_equal": equal, "outputs_max_abs_difference": largest,
        "shape": {"rows": b, "groups": n, "kv_heads": kv, "query_heads_per_kv": g,
                  "head_dim": d, "prefix": p, "own_slots": s, "own_attended": args.own_attended,
                  "layers": args.layers},
        "cores": len(cores), "evict_mb": args.evict_mb, "clock": args.clock,
        "kernel_vector_floats": int(libraries[0].CloudJaxKernelVectorFloats()),
    }
    ratio = summary["ratio_b_over_a"]
    print(f"A {summary['a']['median_ms']} ms (best {summary['a']['best_ms']}), "
          f"B {summary['b']['median_ms']} ms (best {summary['b']['best_ms']}) a call of "
          f"{args.layers} layers on {len(cores)} core(s), {args.clock} time; B / A per round: "
          f"median {ratio['median']}, quartiles {ratio['q1']}-{ratio['q3']}, range "
          f"{ratio['min']}-{ratio['max']}, {ratio['rounds_below_1']} of {len(ratios)} rounds "
          f"below 1; outputs "
          + ("bitwise equal" if equal else f"differ by up to {largest:.3g}"), flush=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
