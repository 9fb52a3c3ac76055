"""One evaluation run: score the rows once, tally every K, write the report and the critiques.

Critiques are drawn once, at the largest K of the sweep; accuracy at a smaller K uses each
response's first K samples (the samples are independent draws, so the first K of a larger draw are
a draw of K). One sampling run thus serves the whole sweep, and the K values are nested: K = 4's
critiques are K = 8's first four.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from cloud_jax import storage
from cloud_jax.data.jsonl import write_jsonl_atomic
from cloud_jax.data.schema import PreferenceRow
from cloud_jax.errors import ConfigError, InputTooLongError, RowTooLongError
from cloud_jax.evaluation import best_of_n as bon
from cloud_jax.evaluation import rewardbench as rbm
from cloud_jax.evaluation.report import K_PNG, REPORT_JSON, REPORT_MD, SECTIONS_PNG, write_report
from cloud_jax.evaluation.scorer import ScoreFn, Scores, score_all

log = logging.getLogger(__name__)

CRITIQUES_JSONL = "critiques.jsonl"
BEST_OF_N_JSONL = "best_of_n_critiques.jsonl"
# What an evaluation writes into its output directory (REJECTS_JSONL: the command's --lenient).
# report.json marks a finished evaluation: it comes first here (an earlier run's is removed before
# its other files) and is written last, so a reader never sees one beside another run's files.
REJECTS_JSONL = "rejects.jsonl"
OUTPUT_FILES = (REPORT_JSON, REPORT_MD, SECTIONS_PNG, K_PNG, CRITIQUES_JSONL, BEST_OF_N_JSONL)


def clear_outputs(output_dir: str, names: Sequence[str] = OUTPUT_FILES) -> list[str]:
    """Removes the files named ``names`` that an earlier evaluation left in ``output_dir`` (a
    local directory or a URL), in the order given, so that what a new one writes there is never
    read beside an older run's critiques, plots or rejects. Other files are left alone. Returns
    the names removed."""
    present = set(storage.listdir(output_dir))
    removed = [name for name in names if name in present]
    for name in removed:
        storage.remove(storage.join(output_dir, name))
    if removed:
        log.info("removed %s of an earlier evaluation from %s", ", ".join(removed), output_dir)
    return removed


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What ``python -m cloud_jax evaluate`` measures and how critiques are sampled."""

    # The K sweep: critiques per response. Sampled once at the largest K (see the module doc).
    num_samples: tuple[int, ...] = (1,)
    # 0 is greedy: every sample is then the same critique, so K > 1 needs a temperature.
    temperature: float = 0.0
    max_critique_tokens: int = 256
    # Critique sampling, the random Best-of-N baseline and the bootstrap all derive from it.
    seed: int = 0
    # Inputs per compiled scoring batch.
    batch_size: int = 8
    # A classic reward model: one reward per response, no critique (K = 1).
    classic: bool = False
    # What a tie (equal rewards) scores: 0 is RewardBench's rule, 0.5 half a pair.
    tie_credit: float = 0.0
    # Best-of-N baseline pick: "first" candidate or a seeded "random" one.
    baseline: str = "first"
    bootstrap_resamples: int = 2000
    confidence: float = 0.95
    # Inputs per scorer call (the progress bar's step), rounded up to a multiple of batch_size:
    # every call but the last then fills whole batches.
    chunk_size: int = 64

    def validate(self, *, best_of_n: bool = False) -> "EvalConfig":
        """Raises ValueError on a bad setting; ``best_of_n``: the settings will score Best-of-N
        rows too (whose random baseline and bootstrap draw from numpy, which takes no negative
        seed)."""
        if not self.num_samples or any(k < 1 for k in self.num_samples):
            raise ValueError(f"num_samples={self.num_samples}: need one or more K >= 1")
        if self.classic and self.ks != (1,):
            raise ValueError(f"num_samples={self.num_samples}: a classic reward model writes no "
                             "critiques, so K is 1; set num_samples=(1,) or "
                             "classic=False")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if self.max_critique_tokens < 1 and not self.classic:
            raise ValueError(f"max_critique_tokens={self.max_critique_tokens}: must be >= 1")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError(f"batch_size={self.batch_size}, chunk_size={self.chunk_size}: "
                             "both must be >= 1")
        if not 0.0 <= self.tie_credit <= 1.0:
            raise ValueError(f"tie_credit={self.tie_credit}: must lie in [0, 1]")
        if self.baseline not in bon.BASELINES:
            raise ValueError(f"baseline={self.baseline!r}: expected one of "
                             f"{', '.join(bon.BASELINES)}")
        if best_of_n and self.seed < 0:
            raise ValueError(f"seed={self.seed}: must be >= 0 for Best-of-N (its random baseline "
                             "and bootstrap draw from numpy.random.default_rng(seed))")
        if self.bootstrap_resamples < 1 or not 0.0 < self.confidence < 1.0:
            raise ValueError(f"bootstrap_resamples={self.bootstrap_resamples} must be >= 1 and "
                             f"confidence={self.confidence} in (0, 1)")
        return self

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.num_samples)))


def _shared_cuts(score_fn: ScoreFn, prompts: List[str], responses: List[str],
                 groups: Sequence[int]) -> Optional[np.ndarray]:
    """The prompt tokens to cut from each input so that the inputs of one group (the two sides of
    a pair, the candidates of a Best-of-N prompt: one prompt each) read the same prompt tokens:
    the largest cut any of them needs to fit. None where the scorer does not say what it cuts."""
    cut_fn = getattr(score_fn, "prompt_tokens_cut", None)
    if cut_fn is None:
        return None
    cuts = np.asarray(cut_fn(prompts, responses), np.int64).reshape(len(prompts))
    groups = np.asarray(groups)
    most = np.zeros(int(groups.max()) + 1, np.int64)
    np.maximum.at(most, groups, cuts)
    return most[groups]


def _score(score_fn: ScoreFn, cfg: EvalConfig, prompts: List[str], responses: List[str],
           sources: Sequence[tuple[str, str]], progress: bool, desc: str,
           groups: Optional[Sequence[int]] = None) -> Scores:
    """``sources[i]``: where response i comes from, as (``file:line``, field); ``groups[i]``:
    the inputs of one group share a prompt and are scored after the same prompt tokens."""
    # A call of a number of inputs that is no multiple of batch_size pads its last batch with
    # copies (rm.score), and one below batch_size runs smaller batches than asked for.
    chunk_size = -(-cfg.chunk_size // cfg.batch_size) * cfg.batch_size
    if cfg.classic:
        score_fn = _without_critiques(score_fn)
    try:
        scores = score_all(score_fn, prompts, responses, max(cfg.ks),
                           expected_samples=1 if cfg.classic else max(cfg.ks),
                           chunk_size=chunk_size, progress=progress, desc=desc,
                           min_prompt_cuts=None if groups is None else
                           _shared_cuts(score_fn, prompts, responses, groups))
    except InputTooLongError as err:  # named by its row and field, not its place in the list
        where, field = sources[err.index]
        raise RowTooLongError(f"{where}: field '{field}'", err.detail) from None
    bad = np.flatnonzero(~np.all(np.isfinite(scores.sample_rewards), axis=1))
    if bad.size:
        where, field = sources[bad[0]]
        # Not a bug of this program but of the model the user gave, so a user error (one line,
        # exit status 2) that says what to look at.
        raise ConfigError(f"{where} ({field}): the model gave a non-finite reward "
                          f"({scores.sample_rewards[bad[0]].tolist()}); {bad.size} responses "
                          "affected: the checkpoint's weights hold NaN or inf (a diverged "
                          "training run), or the compute dtype overflows (with bfloat16, try "
                          "--dtype float32)")
    return scores


def _without_critiques(score_fn: ScoreFn) -> ScoreFn:
    """``score_fn`` for a classic evaluation, refused at its first call that writes a critique:
    the report would call the model classic ("no critiques") beside the critiques it wrote."""

    def classic_score_fn(prompts: List[str], responses: List[str], num_samples: int,
                         **kwargs):
        out = score_fn(prompts, responses, num_samples, **kwargs)
        if any(len(c) for c in out.critiques):
            raise ValueError(
                "EvalConfig(classic=True) evaluates a classic reward model, but the score_fn "
                "wrote critiques (it samples them: score_fn_from_model over a CLoud model takes "
                "the model's kind); build it with score_fn_from_model(rm, classic=True) to read "
                "the rewards without critiques, or drop classic=True to evaluate the critiques")
        return out

    if hasattr(score_fn, "prompt_tokens_cut"):  # what it cuts: the same scorer's
        classic_score_fn.prompt_tokens_cut = score_fn.prompt_tokens_cut
    return classic_score_fn


def _truncated_fraction(scores: Scores) -> Optional[float]:
    if scores.truncated is None or not any(scores.critiques):
        return None
    return float(scores.truncated.mean())


def _sample_fields(scores: Scores, i: int, prefix: str) -> Dict[str, Any]:
    out = {f"{prefix}sample_rewards": scores.sample_rewards[i].tolist(),
           f"{prefix}critiques": scores.critiques[i]}
    if scores.truncated is not None:
        out[f"{prefix}truncated"] = scores.truncated[i].tolist()
    return out


def evaluate_rewardbench(rows: Sequence[PreferenceRow], score_fn: ScoreFn, cfg: EvalConfig, *,
                         progress: bool = False) -> tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Pairwise accuracy of ``rows`` at every K: (report section, one record per row)."""
    if not rows:
        raise ValueError("no preference rows to evaluate")
    n = len(rows)
    unknown = rbm.unknown_subsets_warning([r.subset for r in rows])
    if unknown is not None:  # before the (long) scoring, so a misspelt subset shows at once
        log.warning(unknown)
    sources = [(r.source, "chosen") for r in rows] + [(r.source, "rejected") for r in rows]
    scores = _score(score_fn, cfg, [r.prompt for r in rows] * 2,
                    [r.chosen for r in rows] + [r.rejected for r in rows], sources, progress,
                    "pairs (chosen + rejected)", groups=list(range(n)) * 2)
    subsets = [r.subset for r in rows]
    chosen, rejected = scores.sample_rewards[:n], scores.sample_rewards[n:]
    by_k = rbm.accuracy_by_k(subsets, chosen, rejected, cfg.ks, tie_credit=cfg.tie_credit)
    outcome_names = {rbm.CORRECT: "correct", rbm.TIE: "tie", rbm.WRONG: "wrong"}
    r_chosen, r_rejected = chosen.mean(axis=1), rejected.mean(axis=1)
    outcomes = rbm.pair_outcomes(r_chosen, r_rejected)
    records = []
    for i, row in enumerate(rows):
        records.append({
            "id": row.id, "subset": row.subset, "section": rbm.section_of(row.subset),
            "source": row.source, "outcome": outcome_names[int(outcomes[i])],
            "chosen_reward": float(r_chosen[i]), "rejected_reward": float(r_rejected[i]),
            **_sample_fields(scores, i, "chosen_"), **_sample_fields(scores, n + i, "rejected_")})
    section = {"num_rows": n, "by_k": {str(k): s.to_dict() for k, s in by_k.items()},
               "accuracy_vs_k": {str(k): s.accuracy for k, s in by_k.items()},
               "truncated_fraction": _truncated_fraction(scores)}
    return section, records


def evaluate_best_of_n(items: Sequence[bon.BestOfNItem], score_fn: ScoreFn, cfg: EvalConfig, *,
                       progress: bool = False) -> tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Best-of-N picks and win rates at every K: (report section, one record per prompt)."""
    if not items:
        raise ValueError("no Best-of-N rows to evaluate")
    prompts, responses, sources = [], [], []
    for item in items:
        prompts += [item.prompt] * len(item.candidates)
        responses += list(item.candidates)
        sources += [(item.source, f"candidates[{j}]") for j in range(len(item.candidates))]
    groups = [i for i, item in enumerate(items) for _ in item.candidates]
    scores = _score(score_fn, cfg, prompts, responses, sources, progress, "Best-of-N candidates",
                    groups)
    offsets = np.cumsum([0] + [len(item.candidates) for item in items])
    sizes = [len(item.candidates) for item in items]
    base = bon.baseline_picks(sizes, cfg.baseline, cfg.seed)
    qualities = [np.asarray(item.scores) for item in items]
    by_k = {}
    for k in cfg.ks:
        rewards = [rbm.mean_over_first_k(scores.sample_rewards[a:b], k)
                   for a, b in zip(offsets[:-1], offsets[1:])]
        by_k[str(k)] = bon.best_of_n_metrics(qualities, rewards, base, seed=cfg.seed,
                                             num_resamples=cfg.bootstrap_resamples,
                                             level=cfg.confidence)
    records = []
    for i, item in enumerate(items):
        a, b = offsets[i], offsets[i + 1]
        part = dataclasses.replace(scores, sample_rewards=scores.sample_rewards[a:b],
                                   critiques=scores.critiques[a:b],
                                   truncated=None if scores.truncated is None
                                   else scores.truncated[a:b])
        rewards = part.sample_rewards.mean(axis=1)
        records.append({
            "id": item.id, "subset": item.subset, "source": item.source,
            "scores": list(item.scores), "rewards": rewards.tolist(),
            "model_pick": int(np.argmax(rewards)), "baseline_pick": int(base[i]),
            "oracle_picks": np.flatnonzero(qualities[i] == qualities[i].max()).tolist(),
            "sample_rewards": part.sample_rewards.tolist(), "critiques": part.critiques,
            **({"truncated": part.truncated.tolist()} if part.truncated is not None else {})})
    section = {"num_prompts": len(items), "baseline": cfg.baseline, "seed": cfg.seed,
               "confidence": cfg.confidence, "bootstrap_resamples": cfg.bootstrap_resamples,
               "by_k": by_k, "truncated_fraction": _truncated_fraction(scores)}
    return section, records


def run_evaluation(score_fn: ScoreFn, cfg: EvalConfig, output_dir: str, *,
                   rows: Optional[Sequence[PreferenceRow]] = None,
                   best_of_n_items: Optional[Sequence[bon.BestOfNItem]] = None,
                   settings: Optional[Dict[str, Any]] = None,
                   progress: bool = False, rejected_rows: int = 0,
                   rejects_path: Optional[str] = None) -> Dict[str, Any]:
    """Evaluates ``rows`` and/or ``best_of_n_items``; writes into ``output_dir``:

    report.json, report.md, accuracy_by_section.png (with rows), accuracy_vs_k.png,
    critiques.jsonl (with rows), best_of_n_critiques.jsonl (with Best-of-N items).
    Returns the report dictionary (what report.json holds) with the written paths under "files".
    ``rejected_rows`` / ``rejects_path``: the input rows a lenient load skipped and the file that
    lists them (:class:`~cloud_jax.data.schema.LoadResult`'s ``num_rejected`` and
    ``rejects_path``), recorded beside ``num_rows`` so the report tells that rows were left out.
    The settings are checked first (a ValueError leaves ``output_dir`` as it was); then the
    files of an earlier evaluation in ``output_dir`` are removed (:func:`clear_outputs`).
    A ``gs://`` / ``s3://`` ``output_dir`` gets the files once all are written (they are written
    to a local directory first: the plots and reports are written with local file calls).
    report.json is removed first and written (uploaded) last: a directory that holds one holds
    that run's other files, and a run stopped part-way leaves none.
    """
    # What can fail on the caller's settings is checked before the earlier run's files go.
    cfg.validate(best_of_n=bool(best_of_n_items))
    if not rows and not best_of_n_items:
        raise ValueError("nothing to evaluate: give preference rows, Best-of-N rows or both")
    clear_outputs(output_dir)
    if storage.is_url(output_dir):
        with storage.staged_output(output_dir, last=(REPORT_JSON,)) as local:
            report = run_evaluation(score_fn, cfg, local, rows=rows,
                                    best_of_n_items=best_of_n_items, settings=settings,
                                    progress=progress, rejected_rows=rejected_rows,
                                    rejects_path=rejects_path)
        report["files"] = {k: storage.join(output_dir, os.path.relpath(v, local))
                           for k, v in report["files"].items()}
        return report
    if not cfg.classic and max(cfg.ks) > 1 and cfg.temperature == 0:
        # rm.score's own warning (once per process and K): a model's score_fn, which samples
        # max(ks) critiques, does not give a second one.
        from cloud_jax.scoring.rewards import warn_greedy_samples

        warn_greedy_samples(max(cfg.ks))
    os.makedirs(output_dir, exist_ok=True)
    start = time.perf_counter()
    report: Dict[str, Any] = {"settings": {**dataclasses.asdict(cfg), "num_samples": list(cfg.ks),
                                           **(settings or {})}}
    files: Dict[str, str] = {}
    wrote_critiques = False
    if rows:
        report["rewardbench"], records = evaluate_rewardbench(rows, score_fn, cfg,
                                                              progress=progress)
        report["rewardbench"].update(rejected_rows=rejected_rows, rejects_path=rejects_path)
        wrote_critiques |= any(r["chosen_critiques"] or r["rejected_critiques"] for r in records)
        files["critiques"] = os.path.join(output_dir, CRITIQUES_JSONL)
        write_jsonl_atomic(files["critiques"], records)
    if best_of_n_items:
        report["best_of_n"], records = evaluate_best_of_n(best_of_n_items, score_fn, cfg,
                                                          progress=progress)
        wrote_critiques |= any(any(c) for r in records for c in r["critiques"])
        files["best_of_n_critiques"] = os.path.join(output_dir, BEST_OF_N_JSONL)
        write_jsonl_atomic(files["best_of_n_critiques"], records)
    if not cfg.classic and not wrote_critiques and cfg.ks == (1,):
        # A scorer that wrote no critiques at K = 1 (score_fn_from_model over a vanilla
        # checkpoint) read one reward per response: a classic evaluation, reported as the
        # command reports that checkpoint, not with a critique budget and temperature.
        log.info("the scorer wrote no critiques: reported as a classic reward model")
        report["settings"]["classic"] = True
    report["wall_seconds"] = time.perf_counter() - start
    files.update(write_report(report, output_dir))
    report["files"] = files
    return report
