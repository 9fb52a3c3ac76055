"""``python -m cloud_jax bench serve``: the reward server under a stream of requests whose critique
budgets differ widely, with static batching against continuous batching.

A random Llama (default ~80M parameters: hidden 768, 12 layers, 12 heads, 4 KV heads, MLP 2048,
fp32, the byte tokenizer's vocabulary) is written as a checkpoint and served twice by
``python -m cloud_jax serve`` on 127.0.0.1, once per ``--batching`` mode, with the same slots
and a budget limit (``--max-critique-tokens-limit``) of ``--max-tokens``.
Each time, ``--clients`` concurrent clients send the same ``--requests`` requests over HTTP
(``POST /v1/score``, one item each, K critiques, budgets drawn uniformly from
[``--min-tokens``, ``--max-tokens``] with a fixed seed), each client sending its next request as
soon as the last is answered. A random model seldom writes the end-of-turn token, so critiques
mostly run to their budget: the spread of budgets is the spread of critique lengths.

Static batching admits a batch and answers it when its longest critique is done; continuous
batching refills a decode row as soon as its critique ends. Before timing, each server answers
one warm-up round of requests (compiles). Prints critiques/s and p50 / p99 latency of each mode,
then one JSON line::

    {"continuous_critiques_per_s", "static_critiques_per_s", "ratio", "p50_s", "p99_s", ...}

(``p50_s`` and ``p99_s`` are the continuous mode's; the static ones are alongside.)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional, Sequence

import numpy as np

from cloud_jax.cli import check_counts
from cloud_jax.cli.bench.host import host_info, host_line, write_record


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cloud_jax bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--num-samples", type=int, default=1, help="K critiques per request")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-steps", type=int, default=8,
                   help="decode steps per compiled chunk of the continuous engine")
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--num-heads", type=int, default=12)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=2048)
    p.add_argument("--modes", default="static,continuous",
                   help="comma-separated batching modes to run (default: both)")
    p.add_argument("--small", action="store_true",
                   help="a tiny model and workload (seconds; what the tests run)")
    p.add_argument("--record", metavar="PATH", default=None,
                   help="also write the result as a measurement record (docs/measurements/)")
    args = p.parse_args(argv)
    if args.small:
        for name, value in dict(requests=12, clients=4, slots=4, min_tokens=2, max_tokens=24,
                                hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                intermediate_size=64).items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    if not 1 <= args.min_tokens <= args.max_tokens:
        p.error("need 1 <= --min-tokens <= --max-tokens")
    if not args.temperature >= 0:  # NaN too; 0 is greedy, as the server takes it
        p.error(f"--temperature {args.temperature}: must be >= 0")
    check_counts(p, args, 1, "requests", "clients", "slots", "num_samples", "chunk_steps",
                 "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ("static", "continuous")]
    if unknown or not modes:
        p.error(f"--modes {args.modes!r}: a comma list of static, continuous")
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workload(args) -> list[dict]:
    rng = np.random.default_rng(0)
    words = "the a of sum is answer why how two three four blue sky reason step".split()
    out = []
    for i in range(args.requests):
        prompt = " ".join(rng.choice(words, size=int(rng.integers(4, 24))))
        response = " ".join(rng.choice(words, size=int(rng.integers(2, 12))))
        out.append({"items": [{"prompt": prompt, "response": response}],
                    "num_samples": args.num_samples, "temperature": args.temperature,
                    "max_critique_tokens": int(rng.integers(args.min_tokens, args.max_tokens + 1)),
                    "seed": i})
    return out


def _run_clients(url: str, bodies: list[dict], clients: int) -> tuple[float, list[float]]:
    import requests

    todo = list(range(len(bodies)))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def client():
        session = requests.Session()
        while True:
            with lock:
                if not todo or errors:
                    return
                i = todo.pop(0)
            t0 = time.perf_counter()
            r = session.post(url + "/v1/score", json=bodies[i], timeout=3600)
            if r.status_code != 200:
                with lock:
                    errors.append(f"request {i}: {r.status_code} {r.text[:200]}")
                return
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return time.perf_counter() - start, latencies


def _serve(checkpoint: str, mode: str, args) -> tuple[subprocess.Popen, str]:
    import requests

    port = _free_port()
    # The budget limit is the workload's largest budget: the continuous engine sizes every row's
    # decode cache for the limit (the server's default, 1024, has each of its steps read 4x the
    # slots at --max-tokens 256), as static batching sizes each batch for its longest budget.
    cmd = [sys.executable, "-m", "cloud_jax", "serve", "--checkpoint", checkpoint,
           "--port", str(port), "--batching", mode, "--slots", str(args.slots),
           "--max-critique-tokens", str(args.max_tokens),
           "--max-critique-tokens-limit", str(args.max_tokens),
           "--max-queue", str(4 * args.requests), "--max-length", "512",
           "--chunk-steps", str(args.chunk_steps), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {mode} server exited: {proc.stdout.read()}")
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the {mode} server did not become ready")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import jax

    import cloud_jax
    from cloud_jax.data.tokenizer import byte_tokenizer
    from cloud_jax.model import count_params
    from cloud_jax.model.config import ModelConfig

    tok = byte_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=args.hidden_size,
                      intermediate_size=args.intermediate_size, num_layers=args.num_layers,
                      num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                      max_position_embeddings=1024 + args.max_tokens).validate()
    host = host_info()
    print(f"[bench serve] {host_line(host)}", flush=True)
    bodies = _workload(args)
    budgets = [b["max_critique_tokens"] for b in bodies]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    result: dict = {**host}
    with tempfile.TemporaryDirectory() as tmp:
        rm = cloud_jax.from_config(cfg, seed=0, tokenizer=tok)
        n_params = count_params(rm.params)
        rm.save_pretrained(os.path.join(tmp, "model"))
        del rm
        jax.clear_caches()
        print(f"[bench serve] {n_params / 1e6:.1f}M params fp32; {args.requests} requests from "
              f"{args.clients} clients, K={args.num_samples}, budgets {args.min_tokens}-"
              f"{args.max_tokens} (mean {np.mean(budgets):.0f}), {args.slots} slots", flush=True)
        for mode in modes:
            proc, url = _serve(os.path.join(tmp, "model"), mode, args)
            try:
                # Warm-up: every request once, untimed (compiles the shapes the run needs).
                _run_clients(url, bodies, args.clients)
                wall, lat = _run_clients(url, bodies, args.clients)
            finally:
                proc.terminate()
                proc.wait(timeout=120)
            critiques = args.requests * args.num_samples
            rate = critiques / wall
            p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
            print(f"[bench serve] {mode:>10}: {rate:7.2f} critiques/s  p50 {p50:6.2f} s  "
                  f"p99 {p99:6.2f} s  ({wall:.1f} s for {critiques} critiques)", flush=True)
            result.update({f"{mode}_critiques_per_s": rate, f"{mode}_p50_s": p50,
                           f"{mode}_p99_s": p99, f"{mode}_wall_s": wall})
    if "continuous" in modes:
        result["p50_s"], result["p99_s"] = result["continuous_p50_s"], result["continuous_p99_s"]
    if {"static", "continuous"} <= set(modes):
        result["ratio"] = result["continuous_critiques_per_s"] / result["static_critiques_per_s"]
    result.update(params=n_params, requests=args.requests, clients=args.clients,
                  slots=args.slots, num_samples=args.num_samples,
                  min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                  chunk_steps=args.chunk_steps)
    print(json.dumps(result), flush=True)
    if args.record:
        write_record(args.record, "python -m cloud_jax bench serve " + " ".join(argv), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
