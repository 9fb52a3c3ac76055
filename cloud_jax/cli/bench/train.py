"""``python -m cloud_jax bench train``: the ``cloud`` train step, ours against transformers + torch.

On the same random Llama weights (fp32; default ~100M parameters: hidden 768, 12 layers, 12 heads,
4 KV heads, MLP 2048, vocab 32000, tied embeddings) and the same batch (P pairs of sequence T,
chosen and rejected rows, LM targets on the second half of each row, the reward read at the last
token), one optimizer update of the ``cloud`` loss (BT + 1.25 * LM):

- ours: the jitted, donated train step of ``python -m cloud_jax.train`` (``StepBuilder``);
- torch: ``transformers.LlamaForCausalLM`` plus the same reward head, forward + backward +
  gradient clipping + ``torch.optim.AdamW``.

Prints tokens/s of both and their ratio, both first-step losses (the same weights and batch give
the same loss: a check that the two do the same work), and achieved FLOP/s (PaLM's model-FLOPs
count) as a fraction of this machine's fp32 matmul FLOP/s, measured in the same run as the best of
JAX's and torch's large square matmuls. Ends with one JSON line. Both frameworks get the same CPU
threads (``--threads``). Every time is the best over ``--repeats`` rounds after a warm-up; each
round runs the matmuls, then ``--steps`` consecutive steps of ours, then of torch's, so that on a
shared machine all of them meet the same load and each step is measured in steady state. Also
prints the FLOP fraction counting the LM head at the target tokens only (ours skips the rest:
``loss.lm_chunk_size``, ``--lm-chunk``).

On a GPU (``--backend gpu``; ``--preset llama-1b``: the Llama-3.2-1B shape, sequence 2048, bf16
compute over fp32 master weights and optimizer state) torch runs on the same GPU under bf16
autocast, the peak is the best bf16 ``--matmul-n`` square matmul of either framework, and the JSON's
``mfu`` is the model FLOPs per second over that peak. There the frameworks run one after the other
(``--phases sequential``): torch's rounds first, then its memory is released and ours runs, so the
device never holds two models, two optimizer states and two steps' activations at once. Torch
failing (out of device memory, or anything else: torch not importing, no CUDA device), there or
while its step is built in the interleaved rounds, is reported (``torch_error`` in the JSON, no
ratio), not fatal: ours is still measured and recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Optional, Sequence

# torch's OpenMP threads otherwise spin after each op and take the cores from the XLA step that
# runs next in the same round (and the JAX step is measured right after torch's).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cloud_jax.cli import check_counts  # noqa: E402
from cloud_jax.model.config import ModelConfig  # noqa: E402
from cloud_jax.sharding import MeshConfig  # noqa: E402
from cloud_jax.training.config import Config  # noqa: E402
from cloud_jax.training.losses import LossConfig  # noqa: E402
from cloud_jax.model import count_params, init_params  # noqa: E402
from cloud_jax.training.optim import OptimConfig  # noqa: E402
from cloud_jax.sharding import TRAIN_RULES, make_mesh  # noqa: E402
from cloud_jax.training.config import TrainConfig  # noqa: E402
from cloud_jax.training.step import StepBuilder, model_flops_per_token  # noqa: E402
from cloud_jax.cli.bench.host import (first_line, host_info, host_line,  # noqa: E402
                                      select_backend, write_record)

LM_COEF = 1.25
MATMUL_N = 2048
# The GPU workload: Llama-3.2-1B's shape with random weights, 4 rows of 2048 tokens
# (configs/llama_1b_bench.yaml). Sized for an 80 GB GPU: compiled for an H100 by the GPU compiler
# (`python -m cloud_jax aot --topology h100`), our step needs 27.7 GiB with cuDNN's attention and
# 45.6 GiB with XLA's (fp32 weights and AdamW state 13.9 GiB of it); more pairs would likely leave
# torch, which holds every activation and the whole logits, out of memory. The two frameworks run
# one after the other.
PRESETS = {
    "llama-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, mlp=8192, vocab=128256,
                     seq=2048, pairs=2, dtype="bfloat16", matmul_n=8192, repeats=2, steps=3,
                     attention="cudnn"),
}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cloud_jax bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=1, help="pairs per step (2 rows each)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3, help="rounds over both frameworks")
    p.add_argument("--steps", type=int, default=3,
                   help="consecutive steps of each framework per round (the best one counts)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the machine's CPU count; XLA uses every core "
                        "of the machine)")
    p.add_argument("--scan-layers", action="store_true", help="ours: lax.scan over the layers")
    p.add_argument("--remat", default="none", help="ours: none | full | dots | dots_no_batch")
    p.add_argument("--attention", choices=("xla", "cudnn"), default="xla",
                   help="ours: model.attention_impl (cudnn: cuDNN flash attention, bf16 on an "
                        "NVIDIA GPU; if it fails the run says why and measures xla)")
    p.add_argument("--lm-chunk", type=int, default=LossConfig.lm_chunk_size,
                   help="ours: loss.lm_chunk_size (0: the whole [B, T, V] logits at once)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--phases", choices=("interleaved", "sequential"), default=None,
                   help="interleaved: rounds alternate the frameworks (default on a CPU, whose "
                        "load they then share); sequential: torch's rounds, its memory released, "
                        "then ours (default on a GPU, which then never holds both at once)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; parameters and optimizer state stay fp32")
    p.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None,
                   help="JAX platform (default: JAX's choice); torch runs on the same device")
    p.add_argument("--matmul-n", type=int, default=MATMUL_N,
                   help="side of the square matmul that measures the peak")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="after timing, trace one more step of ours into DIR and print the XLA "
                        "operations that took the most time (also in the JSON: profile)")
    p.add_argument("--record", metavar="PATH", default=None,
                        help="also write the result as a measurement record (JSON: date, "
                             "machine, command, result), as docs/measurements/ keeps them")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named workload; flags given explicitly still win")
    preset = p.parse_known_args(argv)[0].preset
    if preset is not None:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    if args.threads is None:  # resolved here, not a parser default: --help and the docs hold
        args.threads = os.cpu_count() or 1
    check_counts(p, args, 1, "pairs", "seq", "hidden", "layers", "heads", "kv_heads", "mlp",
                 "vocab", "repeats", "steps", "threads", "matmul_n")
    check_counts(p, args, 0, "lm_chunk")
    return args


def make_batch(pairs: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (pairs, 2, seq)).astype(np.int32)
    targets = np.concatenate([ids[..., 1:], np.zeros((pairs, 2, 1), np.int32)], axis=-1)
    loss_mask = np.zeros((pairs, 2, seq), np.float32)
    loss_mask[..., seq // 2:seq - 1] = 1.0
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
            "targets": targets, "loss_mask": loss_mask,
            "reward_index": np.full((pairs, 2), seq - 1, np.int32),
            "pair_valid": np.ones(pairs, np.int32), "pair_index": np.arange(pairs, dtype=np.int32)}


def best_times(fns: dict, repeats: int, steps: int = 1) -> dict[str, list[float]]:
    """Wall times of each closure: ``repeats`` rounds, each running every closure ``steps`` times
    in a row. Rounds interleave the closures, so on a shared machine each meets the same spread
    of load; the steps in a row measure each one in steady state, as a training loop runs it
    (the first call after the other framework's step is slower on this VM: memory the other
    framework freed and re-touched costs page faults). Returns every time, per closure."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(steps):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def _torch_device() -> str:
    return "cuda" if jax.default_backend() == "gpu" else "cpu"


def matmuls(threads: int, n: int = MATMUL_N, dtype: str = "float32",
            with_torch: bool = True) -> dict:
    """n x n matmuls in ``dtype`` in JAX (XLA) and in torch (on JAX's device), as closures; the
    best FLOP/s of either is the machine's peak for this benchmark."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: x @ y)
    out = {"matmul_jax": lambda: f(a, a).block_until_ready()}
    if not with_torch:
        return out
    try:
        import torch

        torch.set_num_threads(threads)
        device = _torch_device()
        t = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    except Exception as err:  # noqa: BLE001 - no torch matmul; JAX's still measures the peak
        print(f"torch's {n}^3 matmul not measured ({type(err).__name__}: {first_line(err)})",
              flush=True)
        return out

    def mm():
        torch.mm(t, t)
        if device == "cuda":
            torch.cuda.synchronize()

    out["matmul_torch"] = mm
    return out


def ours(cfg: Config, batch: dict, params_host: dict):
    """One update of our jitted step as a closure (it blocks until done), and its losses."""
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    builder = StepBuilder(cfg, mesh, TRAIN_RULES, cfg.model)
    state = builder.init_state(jax.device_put(params_host, builder.param_shardings))
    step = builder.train_step()
    device_batch = builder.device_batch(batch)
    losses = []

    def run():
        nonlocal state
        state, metrics = step(state, device_batch)
        losses.append(float(metrics["loss"]))  # blocks until the step is done

    run()  # compiles
    print(step.reports[0])
    return run, losses


def torch_step(cfg: ModelConfig, batch: dict, params_host: dict, threads: int):
    """One update of transformers + torch as a closure, and its losses: fp32 weights and AdamW,
    the forward under bf16 autocast when ``cfg.dtype`` is bfloat16, on JAX's device."""
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cloud_jax.checkpoints.hf import hf_config_from_model_config, hf_state_dict

    torch.set_num_threads(threads)
    hf_cfg = hf_config_from_model_config(cfg)
    model = LlamaForCausalLM(LlamaConfig(**hf_cfg))
    weights = {k: torch.from_numpy(np.array(v))
               for k, v in hf_state_dict(params_host, cfg, with_head=False).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weight mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    head = torch.nn.Sequential(torch.nn.Linear(cfg.hidden_size, cfg.hidden_size), torch.nn.Tanh(),
                               torch.nn.Linear(cfg.hidden_size, 1))
    rh = params_host["reward_head"]
    with torch.no_grad():
        head[0].weight.copy_(torch.from_numpy(np.array(rh["dense"]["kernel"]).T))
        head[0].bias.copy_(torch.from_numpy(np.array(rh["dense"]["bias"])))
        head[2].weight.copy_(torch.from_numpy(np.array(rh["out_proj"]["kernel"]).T))
        head[2].bias.copy_(torch.from_numpy(np.array(rh["out_proj"]["bias"])))
    device = _torch_device()
    model.to(device)
    head.to(device)
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if cfg.dtype == "bfloat16"
                else contextlib.nullcontext())
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-10, weight_decay=1.0)
    p, _, t = batch["input_ids"].shape
    ids = torch.from_numpy(batch["input_ids"].reshape(2 * p, t)).long().to(device)
    pos = torch.from_numpy(batch["positions"].reshape(2 * p, t)).long().to(device)
    targets = torch.from_numpy(batch["targets"].reshape(2 * p, t)).long().to(device)
    mask = torch.from_numpy(batch["loss_mask"].reshape(2 * p, t)).bool().to(device)
    ridx = torch.from_numpy(batch["reward_index"].reshape(2 * p)).long().to(device)
    attn = torch.ones_like(ids)
    losses = []

    def run():
        with autocast:
            hidden = model.model(input_ids=ids, attention_mask=attn, position_ids=pos)[0]
            logits = model.lm_head(hidden).float()
            lm = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
            rewards = head(hidden[torch.arange(2 * p, device=device), ridx]).float()
            rewards = rewards[:, 0].view(p, 2)
            bt = -torch.nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()
            loss = bt + LM_COEF * lm
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    run()
    return run, losses


def torch_failed(err: BaseException) -> str:
    """Prints why torch's step did not run and returns that for the JSON's ``torch_error``."""
    if type(err).__name__ == "OutOfMemoryError":
        error = f"out of memory: {first_line(err)}"
        print(f"torch ran out of device memory at this workload ({error}); no ratio", flush=True)
    else:
        error = f"{type(err).__name__}: {first_line(err)}"
        print(f"torch's step did not run ({error}); no ratio", flush=True)
    return error


def torch_alone(model_cfg: ModelConfig, batch: dict, params_host: dict,
                args: argparse.Namespace, matmul_torch) -> tuple[dict, list, Optional[str]]:
    """torch's rounds on their own (``--phases sequential``): its step and matmul timed, then
    its model, optimizer state and cached device memory released, so that ours, built after,
    has the device to itself. Returns (times per closure, torch's losses, an error message when
    torch ran out of device memory, else None: reported, not raised, and ours still runs)."""
    import gc

    fns = {} if matmul_torch is None else {"matmul_torch": matmul_torch}
    times, losses, error = {}, [], None
    try:
        fns["torch"], losses = torch_step(model_cfg, batch, params_host, args.threads)
        times = best_times(fns, args.repeats, args.steps)
    except Exception as err:  # noqa: BLE001 - reported, not raised: ours runs next either way
        error = torch_failed(err)
        losses = []
    fns.clear()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - torch that would not import holds no device memory
        pass
    return times, losses, error


def main(argv: Optional[Sequence[str]] = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    select_backend(args.backend)
    host = host_info()
    print(host_line(host), flush=True)
    model_cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                            intermediate_size=args.mlp, num_layers=args.layers,
                            num_heads=args.heads, num_kv_heads=args.kv_heads,
                            tie_word_embeddings=True, max_position_embeddings=max(args.seq, 2048),
                            scan_layers=args.scan_layers, remat=args.remat, dtype=args.dtype,
                            attention_impl=args.attention).validate()
    cfg = Config(model=model_cfg, mesh=MeshConfig(data=1),
                 optim=OptimConfig(learning_rate=1e-5, warmup_ratio=0.0),
                 loss=LossConfig(lm_coef=LM_COEF, lm_chunk_size=args.lm_chunk),
                 train=TrainConfig(stage="cloud", total_steps=1000))
    batch = make_batch(args.pairs, args.seq, args.vocab)
    tokens = 2 * args.pairs * args.seq
    flops_per_step = model_flops_per_token(model_cfg, args.seq, "cloud") * tokens
    # The loss needs the LM head only at its target tokens; PaLM's count (above) runs every token
    # through it. Both are printed; the JSON's matmul_fraction keeps PaLM's count.
    targets = int(batch["loss_mask"].sum())
    needed_flops = flops_per_step - 6.0 * args.hidden * args.vocab * (tokens - targets)
    params_host = jax.device_get(init_params(model_cfg, jax.random.key(0)))
    n_params = count_params(params_host)
    print(f"model: {n_params / 1e6:.1f}M parameters, fp32 master weights, {args.dtype} compute; "
          f"batch {args.pairs} pairs x 2 rows x "
          f"{args.seq} tokens = {tokens} tokens ({targets} LM targets); "
          f"{flops_per_step / 1e12:.3f} TFLOP per step (PaLM's count), "
          f"{needed_flops / 1e12:.3f} with the LM head on the targets only; "
          f"{os.cpu_count()} CPU cores, torch threads {args.threads}; ours: "
          f"loss.lm_chunk_size={args.lm_chunk}, model.attention_impl={args.attention}")

    if args.scan_layers:
        from cloud_jax.model import stack_layers

        params_ours = stack_layers(params_host, model_cfg.num_layers)
    else:
        params_ours = params_host
    phases = args.phases or ("sequential" if jax.default_backend() == "gpu" else "interleaved")
    fns = matmuls(args.threads, args.matmul_n, args.dtype, with_torch=not args.skip_torch)
    all_times: dict[str, list[float]] = {}
    torch_losses, torch_error = [], None
    if not args.skip_torch and phases == "sequential":
        all_times, torch_losses, torch_error = torch_alone(
            model_cfg, batch, params_host, args, fns.pop("matmul_torch", None))
    attention_error = None
    try:
        fns["ours"], ours_losses = ours(cfg, batch, params_ours)
    except Exception as err:  # noqa: BLE001 - any failure of the cuDNN call falls back, told
        if model_cfg.attention_impl != "cudnn":
            raise
        attention_error = f"{type(err).__name__}: {first_line(err)}"
        print(f"ours with cuDNN attention failed ({attention_error}); measuring ours with "
              "model.attention_impl=xla instead", flush=True)
        model_cfg = dataclasses.replace(model_cfg, attention_impl="xla")
        cfg = dataclasses.replace(cfg, model=model_cfg)
        fns["ours"], ours_losses = ours(cfg, batch, params_ours)
    if not args.skip_torch and phases == "interleaved":
        try:
            fns["torch"], torch_losses = torch_step(model_cfg, batch, params_host, args.threads)
        except Exception as err:  # noqa: BLE001 - reported, not raised: ours is still timed
            torch_error = torch_failed(err)
    all_times.update(best_times(fns, args.repeats, args.steps))
    times = {k: min(v) for k, v in all_times.items()}
    for k in ("ours", "torch"):
        if k in all_times:
            print(f"{k} step times (s): " + " ".join(f"{t:.2f}" for t in all_times[k]))
    peaks = {k: 2 * args.matmul_n**3 / v for k, v in times.items() if k.startswith("matmul")}
    peak = max(peaks.values())
    print(f"{args.dtype} matmul {args.matmul_n}^3: " + ", ".join(
        f"{k.split('_')[1]} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    ours_tps = tokens / times["ours"]
    fraction = flops_per_step / times["ours"] / peak
    print(f"ours:  {times['ours']:.3f} s/step, {ours_tps:.1f} tokens/s, "
          f"{flops_per_step / times['ours'] / 1e9:.1f} GFLOP/s = {fraction:.1%} of matmul peak; "
          f"first loss {ours_losses[0]:.6f}")
    needed_fraction = needed_flops / times["ours"] / peak
    print(f"       {needed_fraction:.1%} of matmul peak counting the LM head on the targets only")
    result = {"ours_tokens_per_s": ours_tps, "torch_tokens_per_s": None, "ratio": None,
              "matmul_fraction": fraction, "matmul_fraction_targets_only": needed_fraction,
              # Model FLOPs utilisation against the peak measured above, in the compute dtype.
              "mfu": fraction, "peak_flops": peak, "dtype": args.dtype,
              "step_s": times["ours"], "tokens_per_step": tokens,
              "params_m": round(n_params / 1e6, 1), "phases": phases, "torch_error": torch_error,
              "attention": model_cfg.attention_impl, "attention_error": attention_error}
    if "torch" in times:
        t_torch = times["torch"]
        torch_tps = tokens / t_torch
        print(f"torch: {t_torch:.3f} s/step, {torch_tps:.1f} tokens/s, "
              f"{flops_per_step / t_torch / 1e9:.1f} GFLOP/s = "
              f"{flops_per_step / t_torch / peak:.1%} of matmul peak; first loss "
              f"{torch_losses[0]:.6f}")
        print(f"ratio ours / torch: {ours_tps / torch_tps:.2f}x")
        result.update(torch_tokens_per_s=torch_tps, ratio=ours_tps / torch_tps)
    if args.profile:
        from cloud_jax.cli.bench import profile

        result["profile"] = profile.traced_summary(fns["ours"], args.profile, "one step of ours")
    result.update(host)
    print(json.dumps(result))
    if args.record:
        write_record(args.record, "python -m cloud_jax bench train " + " ".join(argv), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
