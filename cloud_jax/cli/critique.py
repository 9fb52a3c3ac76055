"""``python -m cloud_jax critique``: stage 2, the critique-SFT model rewrites every critique.

    python -m cloud_jax critique --checkpoint runs/sft/final --input train.jsonl --output DIR

For every row, new ``chosen_feedback`` and ``rejected_feedback`` are sampled (greedy by default)
and the row is written in the format the ``cloud`` stage reads, plus
``chosen_feedback_truncated`` / ``rejected_feedback_truncated`` (the critique hit the token
budget). Rows go to shards ``DIR/critiques-SSSSS-of-NNNNN.jsonl`` of ``--shard-rows`` rows each;
``DIR/provenance.json`` records the checkpoint, its step, the seed and every sampling setting.

Resuming: a shard file appears only when complete, so a rerun after an interruption (Ctrl-C,
SIGTERM, a kill) skips the finished shards and redoes the rest, to files identical to an
uninterrupted run. A rerun with other settings (or rows, or weights) into the same directory is
refused. Until every shard is written, a glob over them (``DIR/critiques-*.jsonl``, what the
``cloud`` stage reads) is refused by every reader, naming a missing shard, so a stopped run never
passes for the whole data set.

Several hosts: start the same command on every host. ``jax.distributed.initialize()`` runs first
where the environment asks for it (``--distributed``, as in training); each process then takes
the shards ``s`` with ``s % num_hosts == host_index`` (from ``jax.process_count()`` /
``jax.process_index()`` unless given) and samples them on its own devices (``--mesh``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from cloud_jax.cli.common import (add_sampling_args, columns_from_args, config_from_args,
                                  load_model, progress_bar, too_long_in_flags)
from cloud_jax import storage
from cloud_jax.data.schema import expand_paths, load_rows
from cloud_jax.errors import ConfigError, RowTooLongError
from cloud_jax.scoring.relabel import RelabelSettings, relabel
from cloud_jax.scoring.rewards import ScoreConfig
from cloud_jax.sharding import DISTRIBUTED_MODES, init_distributed


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_jax critique", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(parser, ScoreConfig(max_critique_tokens=512))
    parser.add_argument("--output", required=True,
                        help="directory for the shards: a local path or a gs:// / s3:// URL")
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
    if args.checkpoint_step is not None and args.checkpoint_step < 0:
        parser.error(f"--checkpoint-step {args.checkpoint_step}: must be >= 0 (the checkpoint's "
                     "training step)")
    if args.num_hosts is not None and args.num_hosts < 1:
        parser.error(f"--num-hosts {args.num_hosts}: must be >= 1")
    storage.check_output_dir(args.output, "--output")
    init_distributed(args.distributed)
    import jax

    num_hosts = jax.process_count() if args.num_hosts is None else args.num_hosts
    host = jax.process_index() if args.host_index is None else args.host_index
    if not 0 <= host < num_hosts:
        parser.error(f"--host-index {host} must lie in [0, {num_hosts})")

    columns = columns_from_args(args)
    rows = load_rows(args.input, require_feedback=False, split=args.split, columns=columns).rows
    if not rows:
        raise ConfigError(f"no rows in {args.input}: nothing to critique")
    rm = load_model(args)
    settings = RelabelSettings(
        checkpoint=args.checkpoint, checkpoint_step=args.checkpoint_step,
        input_paths=expand_paths(args.input), input_split=args.split, columns=columns,
        shard_rows=args.shard_rows, num_hosts=num_hosts,
        host=host, dtype=args.dtype, param_dtype=args.param_dtype)
    bars = []

    def progress(total: int):
        bar, on_batch = progress_bar(total, "responses", args.no_progress, "critique")
        bars.append(bar)
        return on_batch

    try:
        summary = relabel(rm, rows, args.output, cfg, settings, progress)
    except RowTooLongError as err:
        raise too_long_in_flags(err, args) from None
    finally:
        for bar in bars:
            bar.close()
    print(f"host {host}/{num_hosts}: {summary.shards} shards, {summary.already_done} already "
          "done", file=sys.stderr)
    if summary.written:
        print(f"critiques cut at the token budget (--max-critique-tokens "
              f"{cfg.max_critique_tokens}): {summary.truncated} of {summary.written} "
              f"({100 * summary.truncated / summary.written:.1f}%)"
              + ("; raise --max-critique-tokens" if summary.truncated else ""), file=sys.stderr)
    if summary.unusable:
        print(f"warning: {summary.unusable} critiques are empty or hold NUL characters; the cloud "
              "stage rejects their rows (data.lenient=true skips and counts them)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
