"""Evaluation: RewardBench-style pairwise accuracy and Best-of-N, with reports and plots.

    from cloud_jax.data.schema import load_rows
    from cloud_jax.evaluation import EvalConfig, run_evaluation, score_fn_from_model

    cfg = EvalConfig(num_samples=(1, 4, 8), temperature=0.7)
    score_fn = score_fn_from_model(rm, temperature=cfg.temperature, seed=cfg.seed)
    rows = load_rows("rewardbench.jsonl", require_feedback=False).rows
    report = run_evaluation(score_fn, cfg, "out/", rows=rows)

``python -m cloud_jax evaluate`` is :func:`cloud_jax.cli.evaluate.main`; docs/EVALUATION.md
describes the scoring rules and the file formats.
"""

from cloud_jax.evaluation.best_of_n import (BestOfNItem, best_of_n_metrics, bootstrap_ci,
                                            load_best_of_n, wilson_ci)
from cloud_jax.evaluation.rewardbench import (EXAMPLE_COUNTS, SECTIONS, RewardBenchScores,
                                              score_pairs)
from cloud_jax.evaluation.run import (EvalConfig, evaluate_best_of_n, evaluate_rewardbench,
                                      run_evaluation)
from cloud_jax.evaluation.scorer import ScoreFn, Scores, score_all, score_fn_from_model

__all__ = ["BestOfNItem", "EXAMPLE_COUNTS", "EvalConfig", "RewardBenchScores", "SECTIONS",
           "ScoreFn", "Scores", "best_of_n_metrics", "bootstrap_ci", "evaluate_best_of_n",
           "evaluate_rewardbench", "load_best_of_n", "run_evaluation", "score_all",
           "score_fn_from_model", "score_pairs", "wilson_ci"]
