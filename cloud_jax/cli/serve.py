"""``python -m cloud_jax serve --checkpoint DIR``: CLoud rewards over HTTP for RL loops and
Best-of-N.

    POST /get_reward   OpenRLHF's remote reward model ({"query", "prompts", "labels"} -> "rewards")
    POST /v1/score     {"items": [{"prompt", "response"}], "num_samples": K, ...}
    GET  /health       200 once loaded and compiled
    GET  /metrics      Prometheus text

The server answers once the model is loaded and compiled. SIGTERM stops admitting, answers every
accepted request and exits 0 (while the server still loads and compiles, it stops there and exits
0). docs/SERVING.md has the protocols, curl examples and sizing.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Optional, Sequence

from cloud_jax.cli.common import add_model_args, field_error, load_model
from cloud_jax.serving.types import DEFAULT_MAX_BODY_MIB, WARMUP, BackendOptions, Settings

BATCHING = ("continuous", "static")


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    o = BackendOptions()
    p = argparse.ArgumentParser(prog="python -m cloud_jax serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on, an IPv6 one with or without brackets (default "
                        "%(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--num-samples", type=int, default=d.num_samples,
                   help="K critiques per response, unless a request says otherwise "
                        "(default %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="default sampling temperature; 0 is greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=None,
                   help="default top-k cut, applied when the temperature is > 0 (default: none; "
                        "give --top-k or --top-p, not both; a request that sets top_p replaces it)")
    p.add_argument("--top-p", type=float, default=None,
                   help="default top-p (nucleus) cut in (0, 1], applied when the temperature is "
                        "> 0 (default: none; a request that sets top_k replaces it)")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="default repetition penalty; 1.0 is off, the reference uses 1.01 "
                        "(default %(default)s)")
    p.add_argument("--max-critique-tokens", type=int, default=d.max_critique_tokens,
                   help="default critique budget (default %(default)s); requests may ask for up "
                        "to --max-critique-tokens-limit")
    p.add_argument("--max-critique-tokens-limit", type=int, default=None,
                   help="the largest budget a request may ask for (default: "
                        f"max(--max-critique-tokens, {o.max_critique_tokens}))")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="default seed in [0, 2**32) of the critiques' sampling; each item's "
                        "stream also derives from its own tokens (default %(default)s)")
    p.add_argument("--slots", type=int, default=o.slots,
                   help="decode rows in flight (an item takes K); size it to the accelerator "
                        "(default %(default)s)")
    p.add_argument("--max-queue", type=int, default=o.max_queue,
                   help="items waiting at most; beyond it requests get 503 (default %(default)s); "
                        "a client that sends each item of a batch as a request of its own "
                        "(OpenRLHF) needs its batch's size")
    p.add_argument("--max-length", type=int, default=o.max_length,
                   help="prefill tokens per item at most, and never more than the model's "
                        "positions leave after the critique budget + 1; longer items get 413 "
                        "(default %(default)s)")
    p.add_argument("--max-body-mib", type=float, default=DEFAULT_MAX_BODY_MIB,
                   help="the largest request body read, in MiB (2**20 bytes); a larger one gets "
                        "413 before the rest of it is read (default %(default)s)")
    p.add_argument("--batching", choices=BATCHING, default="continuous",
                   help="continuous (default): decode slots refilled as critiques finish; "
                        "static: a batch is admitted and waits for its longest critique")
    p.add_argument("--chunk-steps", type=int, default=8,
                   help="continuous batching: decode steps per compiled chunk, between which "
                        "finished rows leave and waiting items enter (default %(default)s)")
    p.add_argument("--warmup", choices=WARMUP, default=o.warmup,
                   help="what the server compiles for the default settings before it answers "
                        "/health: request (default), the shapes of a one-item request; buckets, "
                        "those of every prefill length bucket up to --max-length at every batch "
                        "size, so that no request with these settings compiles later (a longer "
                        "start: docs/SERVING.md)")
    p.add_argument("--classic", action=argparse.BooleanOptionalAction, default=None,
                   help="serve without critiques (default: as the checkpoint says)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="the server's log level; compiles under traffic are logged at info "
                        "(default %(default)s)")
    return p


def make_backend(kind: str, rm, options: BackendOptions, chunk_steps: int = 8):
    if kind == "static":
        from cloud_jax.serving.static import StaticBackend

        return StaticBackend(rm, options)
    from cloud_jax.serving.engine import ContinuousBackend

    return ContinuousBackend(rm, options, chunk_steps=chunk_steps)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.host.startswith("[") and args.host.endswith("]"):  # an IPv6 address as URLs write it
        args.host = args.host[1:-1]
    for name in ("slots", "max_queue", "max_length", "num_samples", "chunk_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not (args.max_body_mib * 2**20 >= 1 and math.isfinite(args.max_body_mib)):
        parser.error(f"--max-body-mib {args.max_body_mib:g}: must be a finite number of MiB of "
                     "at least one byte (2**-20)")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must lie in [0, 65535] (0: any free port)")
    defaults = Settings(num_samples=args.num_samples, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p,
                        max_critique_tokens=args.max_critique_tokens, seed=args.seed,
                        repetition_penalty=args.repetition_penalty)
    limit = args.max_critique_tokens_limit
    if limit is None:
        limit = max(args.max_critique_tokens, BackendOptions().max_critique_tokens)
    from cloud_jax.serving.protocol import InvalidField, check_settings

    try:  # the sampling flags do not depend on the model: checked before it loads
        check_settings(defaults, BackendOptions(max_critique_tokens=limit), False)
    except InvalidField as err:
        parser.error(field_error(err.field, err, vars(args)))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(levelname)s %(name)s: %(message)s")
    from cloud_jax.serving.server import listen_socket

    sock = listen_socket(args.host, args.port)  # a port in use is an error before the load
    try:
        return _load_and_serve(parser, args, defaults, limit, sock)
    finally:
        sock.close()


def _load_and_serve(parser, args, defaults: Settings, limit: int, sock) -> int:
    from cloud_jax.errors import Preempted
    from cloud_jax.serving.server import log_stopped_before_listening, serve

    try:  # SIGTERM here (run_command raises Preempted) stops a server as it does once it serves
        backend, tokenizer = _backend(parser, args, defaults, limit)
    except Preempted:
        log_stopped_before_listening()
        return 0
    return serve(backend, defaults, tokenizer, host=args.host, port=args.port,
                 log_level=args.log_level, sock=sock,
                 max_body_bytes=int(args.max_body_mib * 2**20))


def _backend(parser, args, defaults: Settings, limit: int):
    """(the backend, the model's tokenizer): the model loaded, the settings checked."""
    # The continuous engine runs on one device: without --mesh, it takes the first.
    rm = load_model(args, all_devices=args.batching != "continuous")
    classic = args.classic if args.classic is not None else rm.is_classic
    options = BackendOptions(slots=args.slots, max_queue=args.max_queue,
                             max_length=args.max_length, max_critique_tokens=limit,
                             defaults=defaults, classic=classic, warmup=args.warmup)
    from cloud_jax.errors import ConfigError
    from cloud_jax.serving.protocol import InvalidField, check_options, check_settings

    try:
        check_settings(defaults, options, classic)
        check_options(options, classic)
    except InvalidField as err:
        parser.error(field_error(err.field, err, vars(args)))
    except ConfigError as err:
        parser.error(str(err))
    return make_backend(args.batching, rm, options, args.chunk_steps), rm.tokenizer


if __name__ == "__main__":
    sys.exit(main())
