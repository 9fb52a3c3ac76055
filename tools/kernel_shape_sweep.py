"""Compiles the Pallas decode attention (cloud_jax/model/gpu_kernels.py) for a GPU from a host
without one, at a grid of shapes, and says for each whether Triton's code fits the card: how
gpu_kernels.MAX_QUERY_ELEMENTS and MAX_HEAD_DIM were chosen (docs/BENCHMARKS.md, "On one GPU").

    python tools/kernel_shape_sweep.py [--topology h100|a100|h200] [--rows 1,2,...]
        [--groups 1,2,...] [--head-dims 64,128,...] [--all]

Each line: K (rows per input), G (query heads per KV head) and head size, whether
``gpu_kernels.supported`` takes the shape, and what the compiler said (ok, or the first line of
its refusal). ``--all`` compiles the shapes ``supported`` declines too (to see where the limits
bind); without it they are listed only. Exits 1 if a shape ``supported`` takes did not compile.
Needs JAX's CUDA plugin (make venv-gpu-aot); bf16, 8 KV heads, prompt 1024, own cache 257.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="h100", help="a GPU of `aot --topology`")
    parser.add_argument("--rows", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--groups", type=_ints, default=[1, 2, 3, 4, 8, 16])
    parser.add_argument("--head-dims", type=_ints, default=[64, 128, 256])
    parser.add_argument("--all", action="store_true",
                        help="also compile the shapes gpu_kernels.supported declines")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from cloud_jax.cli import aot
    from cloud_jax.model import gpu_kernels

    device = aot.gpu_devices(aot.parse_slice(args.topology))[0]
    mesh = Mesh(np.array([device]), ("x",))
    on_gpu = NamedSharding(mesh, PartitionSpec())

    def spec(*shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_gpu)

    attention = jax.jit(lambda *a: gpu_kernels.decode_attention(*a, interpret=False))
    kv, prefix, own = 8, 1024, 257
    failed = 0
    for k, g, d in itertools.product(args.rows, args.groups, args.head_dims):
        n = max(1, 256 // k)
        takes = gpu_kernels.supported(k, g, d, prefix, own)
        said = "not compiled"
        if takes or args.all:
            saved = gpu_kernels.MAX_QUERY_ELEMENTS, gpu_kernels.MAX_HEAD_DIM
            # Lifted for the call only, so a declined shape compiles to show why.
            gpu_kernels.MAX_QUERY_ELEMENTS, gpu_kernels.MAX_HEAD_DIM = 1 << 30, 1 << 30
            try:
                with jax.set_mesh(mesh):
                    attention.lower(
                        spec(n * k, 1, kv * g, d), spec(n * k, kv, own, d),
                        spec(n * k, kv, own, d), spec(n * k, 1, own, dtype=jnp.bool_),
                        (spec(n, kv, prefix, d), spec(n, kv, prefix, d),
                         spec(n * k, 1, prefix, dtype=jnp.bool_))).compile()
                said = "ok"
            except Exception as err:  # noqa: BLE001 - the compiler's refusal is the result
                said = str(err).splitlines()[0][:160]
                failed += takes
            finally:
                gpu_kernels.MAX_QUERY_ELEMENTS, gpu_kernels.MAX_HEAD_DIM = saved
        rows = k * gpu_kernels.padded_group(g)
        print(f"K={k:<3} G={g:<2} head {d:<3} (K x G x head {rows * d:>6}): "
              f"{'taken   ' if takes else 'declined'} {said}", flush=True)
    print(f"{failed} shape(s) the kernel takes did not compile for {args.topology}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
