"""``python -m cloud_jax score --checkpoint C --input rows.jsonl --output scored.jsonl`` writes every
input row back with its rewards and critiques: rows with ``prompt`` + ``response`` get ``reward``,
``sample_rewards``, ``reward_std``, ``critiques``, ``truncated``; preference rows (``prompt``,
``chosen``, ``rejected``) get those fields prefixed ``chosen_`` and ``rejected_``; where the
prompt must be cut to fit, both sides lose the same prompt tokens, so the two rewards read one
prompt.

The output is written once, whole, when every row is scored: a run stopped midway (Ctrl-C,
SIGTERM) leaves no output (nor an earlier one changed), and the same command scores every row
again; split a large input into several runs to keep what finished. Every input row is written
back, duplicates included; a row that is not an object, or lacks a text field, stops the run
before the model loads, naming its file, line and field.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

import numpy as np

from cloud_jax.cli.common import (add_sampling_args, columns_from_args, config_from_args,
                                  load_model, progress_bar, too_long_in_flags)
from cloud_jax import storage
from cloud_jax.data.jsonl import unwritable, write_jsonl_atomic
from cloud_jax.data.schema import lone_surrogate, read_records
from cloud_jax.errors import ConfigError, RowTooLongError
from cloud_jax.scoring.rewards import (InputTooLongError, ScoreConfig, prompt_tokens_cut,
                                      resolve_classic, score)


def _texts(rows: list[tuple[str, dict]]) -> tuple[list[str], list[tuple[int, str]]]:
    """The fields to score in each row: ``response``, or ``chosen`` and ``rejected``."""
    jobs = []
    for i, (where, obj) in enumerate(rows):
        fields = ["response"] if "response" in obj else ["chosen", "rejected"]
        for field in ["prompt"] + fields:
            if not isinstance(obj.get(field), str):
                raise ConfigError(f"{where}: field '{field}': must be a string (a row needs "
                                  "'prompt' and 'response', or 'prompt', 'chosen' and "
                                  "'rejected'; --column renames a dataset's columns)")
            bad = lone_surrogate(obj[field])
            if bad is not None:
                raise ConfigError(f"{where}: field '{field}': {bad}")
        unfit = unwritable(obj)  # every column is written back out, with the rewards
        if unfit is not None:
            raise ConfigError(f"{where}: field '{unfit[0]}': {unfit[1]}")
        jobs.extend((i, f) for f in fields)
    return [rows[i][1]["prompt"] for i, _ in jobs], jobs


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_jax score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(parser, ScoreConfig())
    parser.add_argument("--output", required=True,
                        help="scored rows (JSONL): a local path or a gs:// / s3:// URL")
    parser.add_argument("--num-samples", type=int, default=1, help="K critiques per response")
    parser.add_argument("--classic", action=argparse.BooleanOptionalAction, default=None,
                        help="score without critiques, one forward per response (default: as "
                             "the checkpoint says; its feedback_method 'vanilla' is classic)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, num_samples=args.num_samples, classic=args.classic)
    if args.classic and args.num_samples != 1:
        parser.error(f"--num-samples {args.num_samples} with --classic: a classic reward model "
                     "writes no critiques, so K is 1; drop one of them")
    storage.check_output_file(args.output, "--output")
    rows = read_records(args.input, args.split, columns_from_args(args))
    if not rows:
        raise ConfigError(f"no rows in {args.input}: nothing to score")
    prompts, jobs = _texts(rows)
    rm = load_model(args)
    cfg = dataclasses.replace(cfg, classic=resolve_classic(rm, cfg))
    if cfg.classic and cfg.num_samples != 1:
        raise ConfigError(f"{args.checkpoint} is a classic reward model (feedback_method "
                          f"'vanilla'): it writes no critiques, so K is 1; drop --num-samples, "
                          "or pass --no-classic to sample critiques anyway")
    responses = [rows[i][1][f] for i, f in jobs]
    # The two sides of a preference row are rewarded after the same prompt tokens: where the
    # prompt must be cut to fit, both lose the larger of their two cuts (as evaluate does).
    cuts = prompt_tokens_cut(rm, prompts, responses, cfg)
    most = np.zeros(len(rows), np.int64)
    np.maximum.at(most, [i for i, _ in jobs], cuts)
    bar, on_batch = progress_bar(len(jobs), "responses", args.no_progress, "score")
    try:
        with bar:
            result = score(rm, prompts, responses, cfg, on_batch,
                           min_prompt_cuts=[int(most[i]) for i, _ in jobs])
    except InputTooLongError as err:  # named by its row and field, not its place in the batch
        i, field = jobs[err.index]
        where = f"{rows[i][0]}: field '{field}'"
        raise too_long_in_flags(RowTooLongError(where, err.detail), args) from None
    out = [dict(obj) for _, obj in rows]
    for j, (i, field) in enumerate(jobs):
        prefix = "" if field == "response" else f"{field}_"
        out[i].update({
            f"{prefix}reward": float(result.rewards[j]),
            f"{prefix}sample_rewards": result.sample_rewards[j].tolist(),
            f"{prefix}reward_std": float(result.reward_std[j]),
        })
        if not cfg.classic:
            out[i][f"{prefix}critiques"] = result.critiques[j]
            out[i][f"{prefix}truncated"] = result.truncated[j].tolist()
    write_jsonl_atomic(args.output, out)
    print(f"scored {len(jobs)} responses of {len(rows)} rows -> {args.output}", file=sys.stderr)
    if not cfg.classic:
        cut = int(result.truncated.sum())
        print(f"critiques cut at the token budget (--max-critique-tokens "
              f"{cfg.max_critique_tokens}): {cut} of {result.truncated.size} samples "
              f"({100 * cut / result.truncated.size:.1f}%)"
              + ("; raise --max-critique-tokens" if cut else ""), file=sys.stderr)
    return 0
