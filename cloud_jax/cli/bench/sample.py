"""``python -m cloud_jax bench sample``: the CLoud scoring workload, ours against transformers.

On the same random Llama weights (fp32; default ~100M parameters: hidden 768, 12 layers, 12 heads,
4 KV heads, MLP 2048, vocab 32000, tied embeddings) and the same prompts: B inputs x K critiques,
prompt length P, N new tokens, temperature sampling. Prints

- critiques per second of our sampler (prefill once per input, cache repeated to K rows, a jitted
  while-loop decode that also reads each reward) and of ``transformers`` ``generate`` with
  ``num_return_sequences=K``, and their ratio;
- our decode step time against two floors measured in the same run: reading every weight and the
  whole KV cache once per step at the machine's memory bandwidth (a jitted sum over a large
  array), and doing the step's FLOPs at the machine's fp32 matmul rate at the step's own shapes
  (every weight matrix of the model times a [rows, in] activation; see :func:`decode_step_flops`
  and :func:`matmul_rate`). With 16 rows a CPU step is bound by the second;
- our wall time for K samples relative to K = 1;

and, last, one JSON line with those numbers. Both frameworks get the same CPU threads
(``--threads``; XLA's pool is sized by the machine, torch's by ``torch.set_num_threads``).
Every time is the best of ``--repeats`` runs after a warm-up.

On a GPU (``--backend gpu``; ``--preset llama-1b`` gives the Llama-3.2-1B shape, bf16 weights, 32
inputs x K = 8, prompt 1024, 256 new tokens) the same run times transformers on the same GPU and
weights, and the decode step is set against the HBM floor: the weights plus the KV cache slots
that hold tokens, averaged over the steps, read once per step at the bandwidth measured in the
same run (``decode_step_over_hbm_floor``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cloud_jax.cli import check_counts
from cloud_jax.model.config import DECODE_ATTENTION_IMPLS, ModelConfig
from cloud_jax.model import CLoudModel, count_params, init_params
from cloud_jax.model import cpu_kernels, gpu_kernels
from cloud_jax.model.decode_step import LAYOUTS, decode_layout, prepare_decode_weights_jit
from cloud_jax.sampling import Temperature, content_row_ids, pad_prefixes, sample
from cloud_jax.sampling.loop import (DECODE_PHASES, decode, phase_lengths, prefill, row_keys,
                                    stop_array)
from cloud_jax.sharding import SAMPLE_RULES
from cloud_jax.cli.bench.host import (first_line, host_info, host_line, select_backend,
                                      write_record)
from cloud_jax.cli.bench.profile import loop_kernels


def _best(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: compiles
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def read_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second a jitted reduction reads from memory."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds, _ = _best(lambda: total(x).block_until_ready(), repeats)
    del x
    return num_bytes / seconds


def _weight_matrices(params, cfg: ModelConfig) -> list[jax.Array]:
    """Every weight matrix a decode step multiplies by, as [in, out]: per layer q, k, v, o, gate,
    up, down, then the LM head (the transposed embedding when tied)."""
    mats = []
    for i in range(cfg.num_layers):
        attn, mlp = params[f"layers_{i}"]["attn"], params[f"layers_{i}"]["mlp"]
        for name in ("q_proj", "k_proj", "v_proj"):
            mats.append(attn[name]["kernel"].reshape(cfg.hidden_size, -1))
        mats.append(attn["o_proj"]["kernel"].reshape(-1, cfg.hidden_size))
        mats += [mlp[name]["kernel"] for name in ("gate_proj", "up_proj", "down_proj")]
    mats.append(params["embed"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"])
    return mats


def decode_step_flops(cfg: ModelConfig, rows: int, kv_slots_per_row: float) -> tuple[int, int]:
    """(weight-matmul FLOPs, attention FLOPs) of one decode step of ``rows`` rows, each attending
    to ``kv_slots_per_row`` cached keys: 2 per weight per row, and per layer, head and key 2 for
    the score plus 2 for the weighted value."""
    weights = cfg.num_layers * cfg.layer_matmul_params + cfg.hidden_size * cfg.vocab_size
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * kv_slots_per_row
    return 2 * rows * weights, int(rows * attention)


def mean_slots_attended(steps: int) -> float:
    """Own-segment cache slots a row attends to in a decode step, averaged over ``steps`` steps:
    the tokens it has fed so far (step s: s + 1). The floor counts these, not the slots of the
    cache phase XLA's attention reads (:func:`cloud_jax.sampling.loop.phase_lengths`): the CPU
    attention kernel reads only the slots a row attends to."""
    return (steps + 1) / 2


def matmul_rate(matrices_io: Sequence[jax.Array], rows: int, repeats: int = 5,
                kernel: bool = False) -> float:
    """fp32 FLOP/s of multiplying a [rows, in] activation by each [in, out] matrix, the fastest
    of the ways a decode step may take the product: ``x @ W``, the weight stored [out, in] as
    XLA's left operand (``W_oi . x^T``, output [out, rows]), and with ``kernel`` the CPU matmul
    kernel on that layout (:func:`cloud_jax.model.cpu_kernels.decode_matmul`). Each matrix is a
    distinct array, so the weights are read from memory as in a step; the products are
    independent (summed so none is dropped)."""
    xs = {w.shape[0]: jax.random.normal(jax.random.key(w.shape[0]), (rows, w.shape[0]), w.dtype)
          for w in matrices_io}

    @jax.jit
    def right(ws, xs):
        return sum(jnp.sum(xs[w.shape[0]] @ w) for w in ws)

    @jax.jit
    def left(ws_oi, xs):
        return sum(jnp.sum(jnp.einsum("oi,ni->on", w, xs[w.shape[1]])) for w in ws_oi)

    @jax.jit
    def kernel_left(ws_oi, xs):
        return sum(jnp.sum(cpu_kernels.decode_matmul(w, xs[w.shape[1]].T)) for w in ws_oi)

    transposed = [jnp.asarray(w.T) for w in matrices_io]
    flops = sum(2 * rows * w.size for w in matrices_io)
    seconds = min(_best(lambda: right(list(matrices_io), xs).block_until_ready(), repeats)[0],
                  _best(lambda: left(transposed, xs).block_until_ready(), repeats)[0])
    if kernel:
        seconds = min(seconds,
                      _best(lambda: kernel_left(transposed, xs).block_until_ready(), repeats)[0])
    del transposed
    return flops / seconds


def pallas_difference(cfg: ModelConfig, inputs: int, samples: int, prefix_len: int,
                      own_len: int) -> float:
    """The largest difference between the Pallas decode attention and XLA's (``gqa_attention``)
    on this machine, over random queries, keys and masks of one decode step's shapes (``samples``
    rows per input) in the compute dtype: the kernel's check on the device it runs on (the tests
    check its values through the interpreter only)."""
    from cloud_jax.model.layers import gqa_attention

    rng = np.random.default_rng(1)
    b, kv, d = inputs * samples, cfg.num_kv_heads, cfg.resolved_head_dim
    dtype = jnp.dtype(cfg.dtype)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    pmask = rng.random((b, 1, prefix_len)) < 0.9
    pmask[:, :, 0] = True
    args = (normal(b, 1, cfg.num_heads, d), normal(b, kv, own_len, d),
            normal(b, kv, own_len, d), jnp.asarray(rng.random((b, 1, own_len)) < 0.5),
            (normal(inputs, kv, prefix_len, d), normal(inputs, kv, prefix_len, d),
             jnp.asarray(pmask)))
    got = jax.jit(gpu_kernels.decode_attention)(*args)
    want = jax.jit(gqa_attention)(*args[:4], args[4])
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))


def _hf_model(cfg: ModelConfig, params, device: str = "cpu"):
    import torch
    import transformers

    from cloud_jax.checkpoints.hf import hf_config_from_model_config, hf_state_dict

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config_from_model_config(cfg).items()
                                         if k not in ("architectures", "model_type")})
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.param_dtype]
    # numpy has no bfloat16 torch understands: through fp32, then the weights' own dtype (a
    # writable copy: a JAX array's numpy view is read-only, which torch warns about).
    state = {k: torch.from_numpy(np.array(v, np.float32)).to(dtype)
             for k, v in hf_state_dict(params, cfg, with_head=False).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"weight transfer to transformers failed: missing {missing}, "
                           f"unexpected {unexpected}")
    return model.to(device=device, dtype=dtype)


# The GPU workload: Llama-3.2-1B's shape with random weights.
PRESETS = {
    "llama-1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                     intermediate_size=8192, vocab_size=128256, inputs=32, samples=8,
                     prompt_len=1024, new_tokens=256, dtype="bfloat16"),
}


def transformers_critiques_per_s(cfg: ModelConfig, params, prompts: list[list[int]],
                                 args: argparse.Namespace, stop: int) -> float:
    """transformers ``generate`` on the same weights, prompts and device as ours: critiques per
    second, the best of ``args.repeats`` after a warm-up. First checks that one forward gives our
    logits (the comparison is on the same model)."""
    import torch

    b, k, p, m = len(prompts), args.samples, args.prompt_len, args.new_tokens
    torch.set_num_threads(args.threads)
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("JAX runs on a GPU but torch sees no CUDA device")
    model = _hf_model(cfg, params, device)
    input_ids = torch.tensor(prompts, dtype=torch.long, device=device)
    # Same weights, same function: compare one forward's logits before timing anything.
    with torch.inference_mode():
        n = min(32, p)
        hf_logits = model(input_ids[:1, :n]).logits.float().cpu().numpy()
    our_logits = CLoudModel(cfg).apply({"params": params}, jnp.asarray(prompts[0][:n])[None],
                                       jnp.ones((1, n), jnp.int32)).logits
    diff = float(np.abs(np.asarray(our_logits) - hf_logits).max())
    # bf16 rounds differently in the two frameworks' kernels; fp32 agrees to ~1e-5.
    tolerance = 1e-3 if args.dtype == "float32" else 0.25
    if diff > tolerance:
        raise RuntimeError(f"transformers and our logits differ by {diff}: the comparison "
                           "would not be on the same model")

    def hf():
        with torch.inference_mode():
            return model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                  do_sample=True, temperature=args.temperature, top_k=0,
                                  top_p=1.0, max_new_tokens=m, num_return_sequences=k,
                                  eos_token_id=stop, pad_token_id=stop)

    def hf_synced():
        out = hf()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    hf_s, _ = _best(hf_synced, args.repeats)
    hf_cps = b * k / hf_s
    print(f"[bench sample] transformers generate ({device}, {args.threads} torch threads): "
          f"{hf_s:.2f}s for {b * k} critiques ({hf_cps:.2f}/s)", flush=True)
    return hf_cps


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cloud_jax bench sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8, help="K critiques per input")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--num-heads", type=int, default=12)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--skip-hf", action="store_true", help="time our sampler only")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and activations (logits and rewards are fp32 either way)")
    parser.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None,
                        help="JAX platform (default: JAX's choice); transformers runs on the "
                             "same device (cuda for gpu)")
    parser.add_argument("--record", metavar="PATH", default=None,
                        help="also write the result as a measurement record (JSON: date, "
                             "machine, command, result), as docs/measurements/ keeps them")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="trace one more decode loop into DIR and print the XLA operations "
                             "that took the most time (also in the JSON: profile)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a named workload; flags given explicitly still win")
    parser.add_argument("--bandwidth-bytes", type=int, default=1 << 30,
                        help="bytes the bandwidth measurement reads")
    parser.add_argument("--steps-per-check", type=int, default=1, metavar="C",
                        help="decode steps between two checks of whether every row has ended "
                             "(on a GPU each check waits for the device; see "
                             "cloud_jax.sampling.loop.decode)")
    parser.add_argument("--decode-phases", type=int, default=DECODE_PHASES, metavar="P",
                        help="loops the decode grows its critiques' cache in, each compiled on "
                             "its own (default %(default)s; see "
                             "cloud_jax.sampling.loop.phase_lengths)")
    parser.add_argument("--decode-attention-impl", choices=DECODE_ATTENTION_IMPLS,
                        default="xla",
                        help="model.decode_attention_impl: the decode step's attention as XLA's "
                             "operations or as one Pallas (Triton) kernel a layer on an NVIDIA "
                             "GPU (cloud_jax.model.gpu_kernels; elsewhere its interpreter); "
                             "auto: the kernel on an NVIDIA GPU, XLA's elsewhere; pallas runs "
                             "the standard decode layout unless --decode-layout says otherwise")
    parser.add_argument("--decode-layout", choices=LAYOUTS, default=None,
                        help="our decode step's weight layout (default: the machine's choice, "
                             "see cloud_jax.model.decode_step)")
    if argv is None:
        import sys
        argv = sys.argv[1:]
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    if args.steps_per_check < 1:
        parser.error(f"--steps-per-check {args.steps_per_check}: give a whole number >= 1")
    if args.decode_phases < 1:
        parser.error(f"--decode-phases {args.decode_phases}: give a whole number >= 1")
    check_counts(parser, args, 1, "inputs", "samples", "prompt_len", "new_tokens", "repeats",
                 "threads", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "intermediate_size", "vocab_size")
    # Checked here, not after the whole run: the floors divide by the bandwidth it measures.
    check_counts(parser, args, 4, "bandwidth_bytes")  # one fp32 value
    if not args.temperature > 0:  # NaN too
        parser.error(f"--temperature {args.temperature}: must be > 0 (the workload samples)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    select_backend(args.backend)
    host = host_info()  # before the bench's own work, which would count as other work's

    cfg = ModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                      intermediate_size=args.intermediate_size, num_layers=args.num_layers,
                      num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                      tie_word_embeddings=True, param_dtype=args.dtype, dtype=args.dtype,
                      max_position_embeddings=args.prompt_len + args.new_tokens + 1,
                      decode_attention_impl=args.decode_attention_impl).validate()
    params = init_params(cfg, jax.random.key(0))
    n_params = count_params(params)
    b, k, p, m = args.inputs, args.samples, args.prompt_len, args.new_tokens
    stop = 0
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, p).tolist() for _ in range(b)]
    method = Temperature(args.temperature)
    # The Pallas kernel is written for the standard layout's cache (the GPU's).
    layout = args.decode_layout or ("standard" if args.decode_attention_impl == "pallas"
                                    else decode_layout(cfg))
    # The feature-major fp32 step's attention and weight products: the CPU kernels where they
    # build, else XLA's.
    kernels = {name: ("cpu_kernel" if layout == "feature_major" and args.dtype == "float32"
                      and cpu_kernels.active(name) else "xla") for name in cpu_kernels.KERNELS}
    attention, matmul = kernels["attention"], kernels["matmul"]

    def kernel_takes(samples: int, own_len: int) -> bool:  # the Pallas kernel, at these shapes
        return gpu_kernels.supported(samples, cfg.num_heads // cfg.num_kv_heads,
                                     cfg.resolved_head_dim, args.prompt_len, own_len)

    # The Pallas kernel where it takes the K-critique decode's shapes (its shortest phase);
    # with auto, on an NVIDIA GPU only.
    asked = args.decode_attention_impl == "pallas" or (
        args.decode_attention_impl == "auto" and gpu_kernels.on_nvidia_gpu())
    if (attention == "xla" and asked
            and kernel_takes(args.samples, min(phase_lengths(args.new_tokens + 1,
                                                             args.decode_phases)))):
        attention = "pallas"
    # What the kernel library was compiled for (CLOUD_JAX_KERNEL_ARCH; -march=native by default).
    vector_floats = cpu_kernels.vector_floats() if "cpu_kernel" in kernels.values() else None
    built_for = f" ({vector_floats}-float vectors)" if vector_floats else ""
    print(f"[bench sample] {host_line(host)}", flush=True)
    print(f"[bench sample] {n_params / 1e6:.1f}M params {args.dtype}, {b} inputs x K={k}, prompt {p}, "
          f"{m} new tokens, temperature {args.temperature}, {jax.device_count()} "
          f"{jax.default_backend()} device(s), {layout} decode layout, {attention} decode "
          f"attention, {matmul} decode matmul{built_for}", flush=True)

    # The feature-major weights are prepared once, as a caller scoring many batches does.
    weights, prepare_s = None, 0.0
    if layout == "feature_major":
        prepare_s, weights = _best(lambda: jax.block_until_ready(
            prepare_decode_weights_jit(params, cfg=cfg)), 1)
        print(f"[bench sample] feature-major decode weights prepared once in {prepare_s:.2f}s "
              "(not in the times below)", flush=True)

    def ours(samples: int):
        out = sample(cfg, params, prompts, max_new_tokens=m, stop_ids=(stop,),
                     num_samples=samples, method=method, seed=0, decode_layout=layout,
                     decode_weights=weights, steps_per_check=args.steps_per_check,
                     decode_phases=args.decode_phases)
        return out

    ours_s, out = _best(lambda: ours(k), args.repeats)
    ours_k1_s, _ = _best(lambda: ours(1), args.repeats)
    ours_cps = b * k / ours_s
    # The critiques' tokens and lengths, hashed: two runs of one workload that differ only in
    # how the decode is run (XLA flags, --steps-per-check) must write the same critiques.
    critiques_sha256 = hashlib.sha256(np.ascontiguousarray(out.tokens, np.int32).tobytes()
                                      + np.ascontiguousarray(out.lengths, np.int32).tobytes()
                                      ).hexdigest()[:16]
    print(f"[bench sample] ours: {ours_s:.2f}s for {b * k} critiques ({ours_cps:.2f}/s), "
          f"mean critique length {out.lengths.mean():.1f} (tokens sha256 {critiques_sha256}); "
          f"K=1: {ours_k1_s:.2f}s, K={k}/K=1 = {ours_s / ours_k1_s:.2f}", flush=True)

    # Decode step alone: the prefill is timed apart and the loop's step count read back.
    ids, mask = pad_prefixes(prompts, p)
    logits_bv, cache = prefill(params, ids, mask, cfg=cfg, cache_len=p,
                               rules=tuple(SAMPLE_RULES))
    keys = row_keys(0, content_row_ids(prompts))
    stops = stop_array((stop,))

    decode_args = (params, cache, logits_bv, keys, stops, None, None, weights)
    decode_kwargs = dict(cfg=cfg, rules=tuple(SAMPLE_RULES), method=method, num_samples=k,
                         max_new_tokens=m, pad_id=0, layout=layout,
                         steps_per_check=args.steps_per_check, decode_phases=args.decode_phases)

    def run_decode():
        return jax.block_until_ready(decode(*decode_args, **decode_kwargs))

    decode_s, res = _best(run_decode, args.repeats)
    # The operations a decode step launches, read from the loop the timing ran (JAX's cache
    # hands back the same compiled program): on a GPU each is at least one kernel, so the step
    # time over their count says how much of a step launching and draining them can take.
    per_iteration = loop_kernels(decode.lower(*decode_args, **decode_kwargs).compile())
    ops_per_step = (sum(per_iteration) / len(per_iteration) / args.steps_per_check
                    if per_iteration else None)
    profile_summary = None
    if args.profile:
        from cloud_jax.cli.bench import profile

        profile_summary = profile.traced_summary(run_decode, args.profile, "one decode loop",
                                                 prefix="[bench sample] ")
    # Steps up to the last row's end; the loop runs on to its next check of the end.
    steps = int(np.max(np.asarray(res[1]))) + 1
    c = args.steps_per_check
    steps_run = -(-steps // c) * c
    step_s = decode_s / steps_run
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    # The decode cache: each input's prompt once (shared by its K samples), plus K sample segments.
    kv_slots = b * p + b * k * (m + 1)
    slot_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim * jnp.dtype(
        cfg.dtype).itemsize
    kv_bytes = kv_slots * slot_bytes
    # Slots that hold a token, averaged over the steps: the prompts, plus half the critiques.
    valid_kv_bytes = (b * p + b * k * (steps + 1) / 2) * slot_bytes
    bandwidth = read_bandwidth(args.bandwidth_bytes)
    floor_s = (weight_bytes + kv_bytes) / bandwidth
    hbm_floor_s = (weight_bytes + valid_kv_bytes) / bandwidth
    checks = (f" ({steps} up to the last row's end, which is checked every {c} steps)"
              if c > 1 else "")
    print(f"[bench sample] decode: {steps_run} steps{checks} in {decode_s:.2f}s = "
          f"{step_s * 1e3:.1f} ms/step; "
          f"floor {floor_s * 1e3:.1f} ms (weights {weight_bytes / 1e6:.0f} MB + KV cache "
          f"{kv_bytes / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s read); "
          f"step/floor = {step_s / floor_s:.2f}; against the valid KV only "
          f"({valid_kv_bytes / 1e6:.0f} MB on average) {hbm_floor_s * 1e3:.1f} ms, "
          f"step/memory floor = {step_s / hbm_floor_s:.2f}", flush=True)
    us_per_op = step_s / ops_per_step * 1e6 if ops_per_step else None
    if us_per_op is not None:
        print(f"[bench sample] decode: {ops_per_step:.0f} operations a step ({min(per_iteration)}"
              f"-{max(per_iteration)} per iteration of its {len(per_iteration)} loop(s), "
              f"{c} step(s) each); {us_per_op:.2f} us of a step per operation", flush=True)
    own_slots = mean_slots_attended(steps)
    weight_flops, attn_flops = decode_step_flops(cfg, b * k, p + own_slots)
    # The floor's rate is the fastest way this machine takes the step's products, the matmul
    # kernel included where the step uses it.
    rate = matmul_rate(_weight_matrices(params, cfg), b * k, repeats=max(args.repeats, 5),
                       kernel=matmul == "cpu_kernel")
    compute_floor_s = (weight_flops + attn_flops) / rate
    print(f"[bench sample] compute floor {compute_floor_s * 1e3:.1f} ms ({weight_flops / 1e9:.2f} "
          f"GFLOP weight matmuls + {attn_flops / 1e9:.2f} GFLOP attention over {p} prompt + "
          f"{own_slots:.1f} own slots attended on average, at {rate / 1e9:.1f} "
          f"GFLOP/s, this machine's {args.dtype} matmul rate at the step's [{b * k}, in] x [in, out] "
          f"shapes); step/compute floor = {step_s / compute_floor_s:.2f}", flush=True)

    pallas_diff = pallas_parts = None
    if attention == "pallas":
        # Programs of the kernel per (input, KV head): more than 1 where the step has few inputs.
        pallas_parts = gpu_kernels.splits(b * cfg.num_kv_heads, p)
        # At K and at 1 (the K = 1 run takes the kernel too where 1 x G is a shape it takes).
        pallas_diff = max(pallas_difference(cfg, b, samples, p, m + 1) for samples in {k, 1}
                          if kernel_takes(samples, m + 1))
        # bf16 outputs of values about 1 round at ~4e-3; a wrong kernel is off by about 1.
        verdict = "agrees" if pallas_diff < 0.05 else "DISAGREES: do not trust its timings"
        print(f"[bench sample] the Pallas decode attention against XLA's on this device, one "
              f"step's shapes (K = {k} and 1, prompt {p}, own cache {m + 1}): largest "
              f"difference {pallas_diff:.2e}, {verdict}; each input's keys in {pallas_parts} "
              f"part(s) (programs) per KV head", flush=True)

    result = {
        "ours_critiques_per_s": round(ours_cps, 3),
        "hf_critiques_per_s": None,  # null where transformers did not run (hf_error says why)
        "ratio": None,
        "hf_error": None,
        "decode_step_over_floor": round(step_s / floor_s, 3),
        "decode_step_over_compute_floor": round(step_s / compute_floor_s, 3),
        "decode_step_over_hbm_floor": round(step_s / hbm_floor_s, 3),
        "decode_step_ms": round(step_s * 1e3, 3),
        "decode_ops_per_step": None if us_per_op is None else round(ops_per_step, 1),
        "decode_us_per_op": None if us_per_op is None else round(us_per_op, 3),
        "bandwidth_gb_per_s": round(bandwidth / 1e9, 1),
        "dtype": args.dtype,
        "decode_layout": layout,
        "decode_attention": attention,
        "pallas_max_abs_diff": None if pallas_diff is None else round(pallas_diff, 6),
        "pallas_parts": pallas_parts,
        "decode_matmul": matmul,
        "steps_per_check": c,
        "decode_phases": args.decode_phases,
        "decode_steps": steps_run,
        "kernel_vector_floats": vector_floats,
        "prepare_s": round(prepare_s, 3),
        "workload": {"inputs": b, "samples": k, "prompt_len": p, "new_tokens": m,
                     "params_m": round(n_params / 1e6, 1)},
        "k8_over_k1": round(ours_s / ours_k1_s, 3),
        "critiques_sha256": critiques_sha256,
        "profile": profile_summary,
        **host,
    }
    command = "python -m cloud_jax bench sample " + " ".join(argv or [])
    if not args.skip_hf:
        if args.record:
            # Ours is measured: recorded before transformers starts, so a run stopped during
            # transformers' (a time limit) keeps it. Rewritten below with the ratio.
            write_record(args.record, command, {
                **result, "hf_error": "not finished: the run stopped while transformers ran"})
        hf_cps, hf_error = None, None
        try:
            hf_cps = transformers_critiques_per_s(cfg, params, prompts, args, stop)
        except Exception as err:  # noqa: BLE001 - reported, not raised
            # Our numbers above are measured and still written, whatever stopped transformers
            # (out of memory, torch failing to import or to find the GPU, logits that differ).
            if type(err).__name__ == "OutOfMemoryError":
                hf_error = f"out of memory: {first_line(err)}"
                print(f"[bench sample] transformers generate ran out of GPU memory at this "
                      f"workload ({hf_error}); no ratio", flush=True)
            else:
                hf_error = f"{type(err).__name__}: {first_line(err)}"
                print(f"[bench sample] transformers did not run ({hf_error}); no ratio",
                      flush=True)
        if hf_cps is not None:
            result.update(hf_critiques_per_s=round(hf_cps, 3),
                          ratio=round(ours_cps / hf_cps, 3))
        result["hf_error"] = hf_error
    print(json.dumps(result))
    if args.record:
        write_record(args.record, command, result)
    return 0
