"""``python -m cloud_jax evaluate``: pairwise (RewardBench-format) and Best-of-N evaluation.

    python -m cloud_jax evaluate --checkpoint C --input rows.jsonl --output-dir D \\
        [--num-samples 1,4,8] [--temperature T] [--max-critique-tokens N] [--seed S] [--classic] \\
        [--best-of-n file.jsonl]

``--input`` takes preference rows (``prompt, chosen, rejected, subset, id``: RewardBench's format;
JSONL, JSON or Parquet, comma-separated or globs); ``--best-of-n`` takes Best-of-N JSONL (see
docs/EVALUATION.md). Give either or both. Writes report.json, report.md, accuracy_by_section.png,
accuracy_vs_k.png and the critiques (critiques.jsonl, best_of_n_critiques.jsonl) to the output
directory. Input files are checked before the model loads, and the earlier run's files in the
output directory are removed only once both succeed; a bad row is reported with its file, line
and field.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from typing import List, Optional, Sequence

from cloud_jax.data.schema import load_rows
from cloud_jax.evaluation.best_of_n import BASELINES, load_best_of_n
from cloud_jax.evaluation.run import (OUTPUT_FILES, REJECTS_JSONL, EvalConfig, clear_outputs,
                                      run_evaluation)
from cloud_jax.evaluation.scorer import score_fn_from_model
from cloud_jax.scoring.rewards import DEFAULT_MAX_LENGTH
from cloud_jax.cli.common import (add_input_args, add_model_args, as_flags, columns_from_args,
                                  load_model, too_long_in_flags)
from cloud_jax import storage
from cloud_jax.errors import ConfigError, RowTooLongError


def parse_ks(text: str) -> tuple[int, ...]:
    """``"1,4,8"`` -> (1, 4, 8); argparse reports a ValueError as a usage error."""
    try:
        ks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected positive integers separated by commas, e.g. 1,4,8") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"{text!r}: every K must be >= 1")
    return ks


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="python -m cloud_jax evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)  # --checkpoint, --tokenizer, --mesh, --dtype, --param-dtype
    add_input_args(p, required=False, what="preference rows (RewardBench format)")
    p.add_argument("--best-of-n", default=None, help="Best-of-N JSONL file(s)")
    p.add_argument("--output-dir", required=True,
                   help="where the report, plots and critiques go: a local directory or a "
                        "gs:// / s3:// URL")
    p.add_argument("--num-samples", type=parse_ks, default=d.num_samples,
                   help="K critiques per response; a comma list is a sweep (default 1)")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="critique sampling temperature; 0 is greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample each critique token from the K likeliest (default: off; not "
                        "with --top-p)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample each critique token from the smallest set of likeliest tokens "
                        "holding this probability (default: off; not with --top-k)")
    p.add_argument("--max-critique-tokens", type=int, default=d.max_critique_tokens,
                   help="critique-token budget; a critique that reaches it is flagged truncated "
                        "(default %(default)s; the reference samples up to 1024)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="Hugging Face's repetition penalty; 1.0 (off) if unset (the reference "
                        "samples with 1.01)")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"prefill tokens at most (default {DEFAULT_MAX_LENGTH}, held to what "
                        "the model's positions allow; a value given above them is warned about "
                        "once)")
    p.add_argument("--critique-prefix", default=None,
                   help="text the critique starts after (default: the one the checkpoint was "
                        "trained with, else the standard prefix)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds critique sampling, the random Best-of-N baseline and the "
                        "bootstrap (default %(default)s; in [0, 2**32))")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="inputs per compiled batch (default %(default)s)")
    p.add_argument("--classic", action=argparse.BooleanOptionalAction, default=None,
                   help="score without critiques, one reward per response (default: as the "
                        "checkpoint says; its feedback_method 'vanilla' is classic)")
    p.add_argument("--tie-credit", type=float, default=d.tie_credit, choices=(0.0, 0.5),
                   help="what a tie scores: 0 (RewardBench's rule, default) or 0.5")
    p.add_argument("--baseline", choices=BASELINES, default=d.baseline,
                   help="Best-of-N baseline pick (default %(default)s)")
    p.add_argument("--bootstrap-resamples", type=int, default=d.bootstrap_resamples,
                   help="resamples of the Best-of-N win rate's percentile-bootstrap interval "
                        "(default %(default)s)")
    p.add_argument("--confidence", type=float, default=d.confidence,
                   help="level of the Best-of-N intervals, in (0, 1) (default %(default)s)")
    p.add_argument("--lenient", action="store_true",
                   help="skip bad preference rows (listed in OUTPUT_DIR/rejects.jsonl) instead "
                        "of stopping at the first")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (otherwise on stderr: a bar on a terminal, a line every 30 "
                        "seconds in a log file or pipe)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.input is None and args.best_of_n is None:
        parser.error("give --input (preference rows), --best-of-n (Best-of-N rows) or both")
    if args.input is None and (args.split or args.column):
        parser.error("--split and --column apply to --input, which is not given")
    cfg = EvalConfig(num_samples=args.num_samples, temperature=args.temperature,
                     max_critique_tokens=args.max_critique_tokens, seed=args.seed,
                     batch_size=args.batch_size, classic=bool(args.classic),
                     tie_credit=args.tie_credit, baseline=args.baseline,
                     bootstrap_resamples=args.bootstrap_resamples, confidence=args.confidence)
    sampler = {k: v for k, v in (("top_k", args.top_k), ("top_p", args.top_p),
                                 ("repetition_penalty", args.repetition_penalty),
                                 ("max_length", args.max_length),
                                 ("critique_prefix", args.critique_prefix)) if v is not None}
    from cloud_jax.scoring.rewards import ScoreConfig

    if args.classic and cfg.ks != (1,):  # told in flags: --classic is a switch, not a value
        parser.error(f"--num-samples {','.join(map(str, cfg.num_samples))}: a classic reward "
                     "model writes no critiques, so K is 1; drop --num-samples or --classic")
    try:  # the sampling flags too, before the rows are read and the model loaded
        cfg.validate(best_of_n=args.best_of_n is not None)
        ScoreConfig(temperature=cfg.temperature, max_critique_tokens=cfg.max_critique_tokens,
                    batch_size=cfg.batch_size, seed=cfg.seed, **sampler).validate()
    except ValueError as err:
        parser.error(as_flags(str(err), vars(args)))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    storage.check_output_dir(args.output_dir, "--output-dir")
    # Every check that can fail on what the user gave (the input files, their rows, the
    # checkpoint and its tokenizer, the flags against the checkpoint) comes before this run
    # touches --output-dir, so a rerun with a wrong path or a bad file leaves the earlier run
    # whole. --lenient's rejects are written to a local staging file while the rows are read
    # and copied into --output-dir once the earlier run's files are gone.
    staging = tempfile.mkdtemp(prefix="cloud_jax-evaluate-")
    try:
        return _evaluate(args, cfg, sampler, staging)
    except RowTooLongError as err:
        raise too_long_in_flags(err, args) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _evaluate(args: argparse.Namespace, cfg: EvalConfig, sampler: dict, staging: str) -> int:
    # Inputs are read and checked before the (slow) model load.
    rows, loaded = None, None
    if args.input is not None:
        loaded = load_rows(args.input, require_feedback=False, lenient=args.lenient,
                           rejects_path=os.path.join(staging, REJECTS_JSONL),
                           rejects_shown_as=storage.join(args.output_dir, REJECTS_JSONL),
                           split=args.split, columns=columns_from_args(args))
        rows = loaded.rows
    items = load_best_of_n(args.best_of_n) if args.best_of_n is not None else None
    if rows is not None and not rows:
        raise ConfigError(f"no usable preference rows in {args.input}")
    settings = {"checkpoint": args.checkpoint, "input": args.input, "best_of_n": args.best_of_n}
    if args.split:
        settings["split"] = args.split
    if args.column:
        settings["columns"] = columns_from_args(args)
    settings.update(sampler)
    rm = load_model(args)
    if args.classic is None and getattr(rm, "feedback_method", "teacher") == "vanilla":
        if cfg.ks != (1,):
            raise ConfigError(f"{args.checkpoint} is a classic reward model (feedback_method "
                              f"'vanilla'): it writes no critiques, so K is 1; drop "
                              f"--num-samples, or pass --no-classic to sample critiques anyway")
        cfg = dataclasses.replace(cfg, classic=True)
    score_fn = score_fn_from_model(rm, temperature=cfg.temperature,
                                   max_critique_tokens=cfg.max_critique_tokens, seed=cfg.seed,
                                   batch_size=cfg.batch_size, classic=cfg.classic, **sampler)
    # Only now is --output-dir touched: an earlier run's files go, report.json first (it marks a
    # finished run), then this run's rejects are copied in; run_evaluation writes report.json
    # last.
    clear_outputs(args.output_dir, OUTPUT_FILES + (REJECTS_JSONL,))
    rejects_path = None
    if loaded is not None and loaded.rejects_path is not None:
        rejects_path = storage.join(args.output_dir, REJECTS_JSONL)
        if not storage.is_url(args.output_dir):
            os.makedirs(args.output_dir, exist_ok=True)
        storage.copy_file(loaded.rejects_path, rejects_path)
    report = run_evaluation(score_fn, cfg, args.output_dir, rows=rows, best_of_n_items=items,
                            settings=settings, progress=not args.no_progress,
                            rejected_rows=loaded.num_rejected if loaded else 0,
                            rejects_path=rejects_path)
    _print_summary(report)
    return 0


def _print_summary(report) -> None:
    lines: List[str] = []
    if "rewardbench" in report:
        for k, acc in report["rewardbench"]["accuracy_vs_k"].items():
            top = report["rewardbench"]["by_k"][k]
            score, official = top["score"], top.get("score_official")
            line = f"K={k}: pairwise accuracy {100 * acc:.1f}%"
            if score is not None:
                line += f", RewardBench score {100 * score:.1f}"
                if top.get("missing_sections"):
                    line += (f" over the sections present ({100 * official:.1f} with the missing "
                             f"{', '.join(top['missing_sections'])} scored 0, as the rewardbench "
                             "package does)")
            lines.append(line)
        truncated = report["rewardbench"].get("truncated_fraction")
        if truncated is not None:
            lines.append(f"critiques cut at the token budget: {100 * truncated:.1f}% of samples")
        skipped = report["rewardbench"].get("rejected_rows", 0)
        rejects = report["rewardbench"].get("rejects_path")
        if skipped or rejects is not None:
            lines.append(f"{skipped} input rows skipped (--lenient)"
                         + (f", listed in {rejects}" if skipped and rejects is not None else ""))
    if "best_of_n" in report:
        for k, m in report["best_of_n"]["by_k"].items():
            lines.append(f"K={k}: Best-of-N win rate vs baseline "
                         f"{100 * m['against_baseline']['win_rate']:.1f}%, oracle match "
                         f"{100 * m['against_oracle']['match_rate']:.1f}%")
        truncated = report["best_of_n"].get("truncated_fraction")
        if truncated is not None:
            lines.append(f"Best-of-N critiques cut at the token budget: {100 * truncated:.1f}% "
                         "of samples")
    lines.append(f"report: {report['files']['markdown']}")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
