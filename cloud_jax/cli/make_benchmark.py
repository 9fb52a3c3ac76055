"""``python -m cloud_jax make-benchmark --out DIR``: write the built-in arithmetic reasoning
benchmark (docs/REASONING_BENCHMARK.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence, Tuple

from cloud_jax import storage
from cloud_jax.data.synthetic.arithmetic import OPS
from cloud_jax.cli.common import as_flags
from cloud_jax.data.synthetic.reasoning import (BenchmarkSettingError, ReasoningBenchmarkConfig,
                                                write_splits)
from cloud_jax.data.synthetic.reasoning_text import STYLES
from cloud_jax.errors import ConfigError


def _floats(text: str, flag: str) -> Tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated numbers, such as "
                          f"0.6,0.3,0.1") from None


def _error_weights(args: argparse.Namespace, d: ReasoningBenchmarkConfig) -> Tuple[float, ...]:
    """--error-weights as given; else the default weights for the default kinds, and equal
    weights for kinds of the user's own (the defaults are one weight per default kind)."""
    if args.error_weights is not None:
        return _floats(args.error_weights, "--error-weights")
    kinds = _names(args.error_kinds)
    return d.error_weights if kinds == tuple(d.error_kinds) else (1.0,) * len(kinds)


# The flags of the settings whose config name is not the flag's.
_FLAG_OF = {"num_train": "train", "num_eval": "eval", "num_test": "test"}


def _in_flags(err: BenchmarkSettingError, args: argparse.Namespace) -> ConfigError:
    """A bad setting told as the flag the user typed (--digits for a digit bound it set), with
    what was typed; a flag left out, with its default."""
    dest = _FLAG_OF.get(err.key, err.key)
    if err.key in ("min_digits", "max_digits") and args.digits is not None:
        dest = "digits"
    typed = getattr(args, dest, None)
    shown = (f"{err.value} (its default)" if typed is None else
             repr(typed) if isinstance(typed, str) else str(typed))
    return ConfigError(f"--{dest.replace('_', '-')} {shown}: {as_flags(err.why, vars(args))}")


def _names(text: str) -> Tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: Optional[Sequence[str]] = None) -> int:
    d = ReasoningBenchmarkConfig()
    parser = argparse.ArgumentParser(
        prog="python -m cloud_jax make-benchmark",
        description="Write the built-in arithmetic reasoning benchmark (train/eval/test JSONL in "
                    "the row format, with oracle critiques) and benchmark.json.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=d.num_train, help="rows in train.jsonl (even)")
    parser.add_argument("--eval", type=int, default=d.num_eval, help="rows in eval.jsonl (even)")
    parser.add_argument("--test", type=int, default=d.num_test, help="rows in test.jsonl (even)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--style", choices=STYLES, default=d.style)
    parser.add_argument("--ops", default=",".join(d.ops), help=f"comma list of {', '.join(OPS)}")
    parser.add_argument("--op-weights", default="", help="comma list, one per op (default equal)")
    parser.add_argument("--digits", type=int,
                        help="operand digits (sets min and max; not with --min/--max-digits)")
    parser.add_argument("--min-digits", type=int, help=f"default {d.min_digits}")
    parser.add_argument("--max-digits", type=int, help=f"default {d.max_digits}")
    parser.add_argument("--max-multiplier", type=int, default=d.max_multiplier)
    parser.add_argument("--error-kinds", default=",".join(d.error_kinds),
                        help="comma list of the wrong answers' kinds (default %(default)s)")
    parser.add_argument("--error-weights", default=None,
                        help="comma list, one per error kind (default "
                             f"{','.join(map(str, d.error_weights))} for the default kinds, "
                             "equal for others)")
    parser.add_argument("--train-random-share", type=float, default=d.train_random_share,
                        help="share of train pairs with a random (implausible) wrong answer")
    parser.add_argument("--split-fractions", default=",".join(map(str, d.split_fractions)))
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress of the generation (otherwise on stderr: a bar on a "
                             "terminal, a line every 30 seconds in a log file or pipe)")
    args = parser.parse_args(argv)
    storage.check_output_dir(args.out, "--out")
    for name in ("train", "eval", "test"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0")
        if getattr(args, name) % 2:
            parser.error(f"--{name} {getattr(args, name)}: must be even (rows come in twos whose "
                         "responses swap roles; docs/REASONING_BENCHMARK.md)")
    if not args.train + args.eval + args.test:
        parser.error("--train, --eval and --test are all 0: nothing to write")
    if args.digits is not None and args.digits < 1:
        parser.error(f"--digits {args.digits}: must be >= 1")
    if args.digits is not None:
        for flag in ("min_digits", "max_digits"):
            if getattr(args, flag) is not None:
                parser.error(f"--digits {args.digits} with --{flag.replace('_', '-')} "
                             f"{getattr(args, flag)}: --digits sets both --min-digits and "
                             f"--max-digits; give --digits alone or the two bounds")
        digits = (args.digits, args.digits)
    else:
        digits = (d.min_digits if args.min_digits is None else args.min_digits,
                  d.max_digits if args.max_digits is None else args.max_digits)
    cfg = ReasoningBenchmarkConfig(
        num_train=args.train, num_eval=args.eval, num_test=args.test, seed=args.seed,
        style=args.style, ops=_names(args.ops), op_weights=_floats(args.op_weights, "--op-weights"),
        min_digits=digits[0], max_digits=digits[1],
        max_multiplier=args.max_multiplier, error_kinds=_names(args.error_kinds),
        error_weights=_error_weights(args, d),
        train_random_share=args.train_random_share,
        split_fractions=_floats(args.split_fractions, "--split-fractions"))
    try:
        cfg.validate()
    except BenchmarkSettingError as err:
        raise _in_flags(err, args) from None
    paths = write_splits(args.out, cfg, progress=not args.no_progress)
    summary = json.loads(storage.read_text(storage.join(args.out, "benchmark.json")))
    for split, path in paths.items():
        info = summary["splits"][split]
        # Every row has both critiques: their mean is the mean of the two fields' means.
        chosen, rejected = info["bytes"]["chosen_feedback"], info["bytes"]["rejected_feedback"]
        print(f"{split:5s} {info['rows']:6d} rows  {path}  (critique bytes: mean "
              f"{(chosen['mean'] + rejected['mean']) / 2:.1f}, max "
              f"{max(chosen['max'], rejected['max'])})")
    print(f"on {summary['measured_on']}, pairwise accuracy (0.5 = chance) of shortcut predictors: "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary["shortcut_accuracy"].items())
          + "; of partial checks: " + ", ".join(
              f"{k} {v:.3f}" for k, v in summary["partial_check_accuracy"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
