"""``python -m cloud_jax pipeline --config configs/demo_cpu.yaml``: CLoud vs classic end to end
(:mod:`cloud_jax.experiments.cloud_vs_classic`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from cloud_jax.experiments.cloud_vs_classic.config import load_pipeline_config
from cloud_jax.experiments.cloud_vs_classic.report import summary_table
from cloud_jax.experiments.cloud_vs_classic.run import REPORT_MD, RESULTS_JSON, run_pipeline


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m cloud_jax pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pipeline YAML (configs/demo_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. output_dir=runs/x stages.cloud.total_steps=100")
    parser.add_argument("--record", metavar="PATH", default=None,
                        help="also write the results as a measurement record (JSON: date, "
                             "machine, command, result = results.json plus the host's fields), "
                             "as docs/measurements/ keeps them")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    # orbax logs every save step at INFO; the pipeline's own lines are what a user follows.
    logging.getLogger("absl").setLevel(logging.WARNING)
    cfg = load_pipeline_config(args.config, args.overrides)
    results = run_pipeline(cfg)
    print(summary_table(results))
    if args.record:
        from cloud_jax.cli.bench.host import host_info, write_record
        write_record(args.record, "python -m cloud_jax pipeline " + " ".join(argv),
                     {**results, **host_info()})
        print(f"record: {args.record}")
    with open(os.path.join(cfg.output_dir, "eval", "cloud_greedy", "critiques.jsonl"),
              encoding="utf-8") as f:
        examples = [json.loads(line) for _, line in zip(range(3), f)]
    print("\nsample critiques (greedy):")
    for rec in examples:
        for side in ("chosen", "rejected"):
            print(f"  {side:<8} reward {rec[side + '_reward']:+.3f}  {rec[side + '_critiques'][0]}")
    print(f"results: {os.path.join(cfg.output_dir, RESULTS_JSON)}, report: "
          f"{os.path.join(cfg.output_dir, REPORT_MD)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
