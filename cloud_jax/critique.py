"""Stage 2 (self-critique): the critique-SFT model rewrites every critique of a dataset.

    python -m cloud_jax critique --checkpoint runs/sft/export --input train.jsonl --output DIR

For every row, new ``chosen_feedback`` and ``rejected_feedback`` are sampled (greedy by default)
and the row is written in the format the ``cloud`` stage reads, plus
``chosen_feedback_truncated`` / ``rejected_feedback_truncated`` (the critique hit the token
budget). Rows go to shards ``DIR/critiques-SSSSS-of-NNNNN.jsonl`` of ``--shard-rows`` rows each;
``DIR/provenance.json`` records the checkpoint, its step, the seed and every sampling setting.

Resuming: a shard file appears only when complete (written to a temporary name, then renamed),
so a rerun after an interruption skips the finished shards and redoes the rest. Critiques depend
on the seed and each input's tokens only, so the files are identical to an uninterrupted run.
A rerun with other settings into the same directory is refused.

Several hosts: start the same command on every host. ``jax.distributed.initialize()`` runs first
where the environment asks for it (``--distributed``, as in training); each process then takes
the shards ``s`` with ``s % num_hosts == host_index`` (from ``jax.process_count()`` /
``jax.process_index()`` unless given) and samples them on its own devices (``--mesh``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Optional, Sequence

from cloud_jax.data.schema import FEEDBACK_FIELDS, PreferenceRow, expand_paths, load_rows
from cloud_jax.scoring import (ScoreConfig, add_sampling_args, config_from_args, load_model,
                               progress_bar, resolve_critique_prefix, score, write_jsonl_atomic)

from cloud_jax.train_config import DISTRIBUTED_MODES

PROVENANCE = "provenance.json"


def _usable(critique: str) -> bool:
    # What the row loader accepts as feedback text.
    return bool(critique.strip()) and "\x00" not in critique


def shard_name(index: int, count: int) -> str:
    return f"critiques-{index:05d}-of-{count:05d}.jsonl"


def _row_out(row: PreferenceRow, chosen: str, rejected: str, chosen_cut: bool,
             rejected_cut: bool) -> dict:
    out = {"id": row.id, "prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected,
           "chosen_feedback": chosen, "rejected_feedback": rejected,
           "chosen_feedback_truncated": chosen_cut, "rejected_feedback_truncated": rejected_cut}
    if row.subset is not None:
        out["subset"] = row.subset
    out.update({k: v for k, v in row.extra.items() if k not in out})
    return out


def regenerate(rm, rows: Sequence[PreferenceRow], cfg: ScoreConfig, on_batch=None) -> list[dict]:
    """The rows with freshly sampled critiques of both responses."""
    prompts = [r.prompt for r in rows for _ in range(2)]
    responses = [text for r in rows for text in (r.chosen, r.rejected)]
    result = score(rm, prompts, responses, cfg, on_batch)
    return [_row_out(row, result.critiques[2 * i][0], result.critiques[2 * i + 1][0],
                     bool(result.truncated[2 * i, 0]), bool(result.truncated[2 * i + 1, 0]))
            for i, row in enumerate(rows)]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _write_provenance(out_dir: str, provenance: dict, host: int = 0) -> None:
    path = os.path.join(out_dir, PROVENANCE)
    # Through JSON once, so tuples compare equal to the lists read back.
    provenance = json.loads(json.dumps(provenance))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = _flat(json.load(f))
        new = _flat(provenance)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise SystemExit(f"{path} records other settings ({', '.join(changed)} differ); "
                             "write to a new --output directory or restore the settings")
        return
    # Each host writes its own temporary file: all hosts may get here at once, with equal contents.
    tmp = f"{path}.tmp{host}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(provenance, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_jax critique", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(parser, ScoreConfig(max_critique_tokens=512))
    parser.add_argument("--output", required=True, help="directory for the shards")
    parser.add_argument("--shard-rows", type=int, default=512, help="rows per output shard")
    parser.add_argument("--checkpoint-step", type=int, default=None,
                        help="training step of the checkpoint, recorded in the provenance")
    parser.add_argument("--num-hosts", type=int, default=None,
                        help="processes sharing the work (default: jax.process_count())")
    parser.add_argument("--host-index", type=int, default=None,
                        help="this process's share (default: jax.process_index())")
    parser.add_argument("--distributed", choices=DISTRIBUTED_MODES, default="auto",
                        help="jax.distributed.initialize() first: auto (default) on a multi-host "
                             "TPU slice or where JAX_COORDINATOR_ADDRESS is set, as training does")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.shard_rows < 1:
        parser.error("--shard-rows must be >= 1")
    for name in ("input", "output"):
        if "://" in getattr(args, name):
            parser.error(f"--{name} {getattr(args, name)}: local paths only; mount the bucket "
                         "(e.g. gcsfuse) and give the mounted path")
    from cloud_jax.train import init_distributed

    init_distributed(args.distributed)
    import jax

    num_hosts = jax.process_count() if args.num_hosts is None else args.num_hosts
    host = jax.process_index() if args.host_index is None else args.host_index
    if not 0 <= host < num_hosts:
        parser.error(f"--host-index {host} must lie in [0, {num_hosts})")

    rows = load_rows(args.input, require_feedback=False).rows
    num_shards = max(1, math.ceil(len(rows) / args.shard_rows))
    os.makedirs(args.output, exist_ok=True)
    rm = load_model(args)
    cfg = dataclasses.replace(cfg, critique_prefix=resolve_critique_prefix(rm, cfg))
    from cloud_jax.data.tokenizer import tokenizer_fingerprint

    _write_provenance(args.output, {
        "checkpoint": os.path.abspath(args.checkpoint) if os.path.exists(args.checkpoint)
        else args.checkpoint,
        "checkpoint_step": args.checkpoint_step,
        "input": [os.path.abspath(p) for p in expand_paths(args.input)],
        "num_rows": len(rows),
        "shard_rows": args.shard_rows,
        "num_shards": num_shards,
        "sampling": dataclasses.asdict(cfg),
        "tokenizer_sha256": tokenizer_fingerprint(rm.tokenizer),
        # Precision changes the critiques; the mesh does not, so a run may resume on another one.
        **{key: value for key, value in (("dtype", args.dtype),
                                         ("param_dtype", args.param_dtype)) if value is not None},
    }, host)
    mine = [s for s in range(num_shards) if s % num_hosts == host]
    todo = [s for s in mine
            if not os.path.exists(os.path.join(args.output, shard_name(s, num_shards)))]
    print(f"host {host}/{num_hosts}: {len(mine)} shards, {len(mine) - len(todo)} already done",
          file=sys.stderr)
    bar, on_batch = progress_bar(2 * sum(len(rows[s * args.shard_rows:(s + 1) * args.shard_rows])
                                         for s in todo), "responses")
    unusable = 0
    with bar:
        for s in todo:
            chunk = rows[s * args.shard_rows:(s + 1) * args.shard_rows]
            out = regenerate(rm, chunk, cfg, on_batch)
            unusable += sum(not _usable(r[f]) for r in out for f in FEEDBACK_FIELDS)
            write_jsonl_atomic(os.path.join(args.output, shard_name(s, num_shards)), out)
    if unusable:
        print(f"warning: {unusable} critiques are empty or hold NUL characters; the cloud stage "
              "rejects their rows (data.lenient=true skips and counts them)", file=sys.stderr)
    return 0
