"""``python -m cloud_jax.train --config configs/X.yaml [key=value ...]``: one training run.

The stage (``train.stage``: critique_sft, cloud, classic, lm_pretrain), model, data, optimizer and
loop settings all come from the config; dotted ``key=value`` arguments override it. A run whose
output directory holds checkpoints resumes from the newest complete one. On several hosts, start
the same command on every host: ``jax.distributed.initialize()`` runs first (see
``train.distributed``; on CPU or GPU clusters set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID). See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from cloud_jax.training.config import Config, load_config
from cloud_jax.errors import PREEMPTED_EXIT_CODE
from cloud_jax.sharding import init_distributed

log = logging.getLogger("cloud_jax.train")


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m cloud_jax.train",
        description="Train a CLoud reward model (stages critique_sft, cloud, classic, "
                    "lm_pretrain). Resumes from the newest checkpoint in output_dir.",
        epilog="--debug, first of all arguments (python -m cloud_jax.train --debug --config "
               "...), shows the traceback of an error instead of its one error: line.")
    parser.add_argument("--config", help="YAML config (configs/*.yaml); defaults if omitted")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.total_steps=200 data.batch_pairs=16")
    args = parser.parse_intermixed_args(argv)
    return args.config, list(args.overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
    config_path, overrides = parse_args(argv)
    cfg: Config = load_config(config_path, overrides)
    init_distributed(cfg.train.distributed)
    import jax

    from cloud_jax.training.loop import run

    main_process = jax.process_index() == 0
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    summary = run(cfg)
    if main_process:
        # "data": each split's rows, rejected rows (with the rejects file), dropped over-length
        # and prompt-truncated pairs: a run that reuses a tokenized dataset logs none of them.
        # "preempted": true where SIGTERM stopped the run (exit status 75 below).
        print(json.dumps({k: summary[k] for k in ("step", "train", "eval", "final_dir", "data",
                                                  "preempted")}))
    # A preempted run is not finished: a non-zero status tells schedulers (and
    # tpu_scripts/babysit.sh) to relaunch it; it then resumes from the checkpoint it just wrote.
    return PREEMPTED_EXIT_CODE if summary.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main())
