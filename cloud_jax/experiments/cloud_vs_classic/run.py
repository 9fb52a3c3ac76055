"""``python -m cloud_jax pipeline --config configs/demo_cpu.yaml [key=value ...]``: CLoud against a
classic reward model, end to end, from a model trained from scratch.

    1. data          the built-in reasoning benchmark (or data.train_path / data.eval_path)
    2. lm_pretrain   next-token training from random init: the base model of both arms (skipped
                     when ``init_from`` names a pretrained model, e.g. SmolLM2-135M-Instruct)
    3. critique_sft  the base learns to write the oracle critiques
    4. self_critique the SFT model rewrites every train critique (greedy)
    5. cloud         BT + lm_coef * LM on the self-written critiques, from the SFT weights
    6. classic       BT only, from the same base, same rows, steps and batch size as `cloud`
    7. evaluate      both on the held-out split: classic, CLoud greedy (K = 1) and a K sweep of
                     sampled critiques; diagnostics that explain the gap

Everything lands in ``output_dir``: one training directory per stage, ``self_critique/`` shards,
``eval/<arm>/`` evaluation reports, ``results.json`` and ``report.md``. Rerunning the command with
the same ``output_dir`` skips the finished stages (a stage interrupted midway resumes from its last
checkpoint) and evaluates again; a changed config is refused, except the ``evaluation`` section.
See docs/RESULTS.md for measured numbers.

The config is :mod:`.config`, the diagnostics :mod:`.diagnostics`, ``report.md`` :mod:`.report`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Dict, Optional

import jax
import numpy as np

import cloud_jax
from cloud_jax import progress, records, storage
from cloud_jax.data.jsonl import read_jsonl, write_jsonl_atomic
from cloud_jax.data.schema import expand_paths, load_rows, row_record
from cloud_jax.data.synthetic.reasoning import write_splits
from cloud_jax.errors import ConfigError, Preempted
from cloud_jax.evaluation.run import EvalConfig, run_evaluation
from cloud_jax.evaluation.scorer import score_fn_from_model
from cloud_jax.experiments.cloud_vs_classic.config import PipelineConfig, StagePlan
from cloud_jax.experiments.cloud_vs_classic.diagnostics import (critique_quality, oracle_critique,
                                                                self_critique_quality)
from cloud_jax.experiments.cloud_vs_classic.report import markdown_report
from cloud_jax.sharding import SAMPLE_RULES, MeshConfig, make_mesh
from cloud_jax.training.config import Config, config_from_dict, load_config, save_config, to_dict
from cloud_jax.training.stages import STAGES

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
_DONE = "stage_summary.json"


# --- stages ---------------------------------------------------------------------------------


class _Timer:
    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - start, 2)
        return out


def _stage_config(cfg: PipelineConfig, name: str, *, train_path: str, eval_path: str,
                  init_from: str):
    plan: StagePlan = getattr(cfg.stages, name)
    steps = plan.total_steps or cfg.stages.cloud.total_steps
    everything = to_dict(cfg)
    shared = {f.name: everything[f.name] for f in dataclasses.fields(Config)}
    shared.update(output_dir=os.path.join(cfg.output_dir, name), init_from=init_from)
    shared["data"].update(train_path=train_path, eval_path=eval_path,
                          tfds_dir=os.path.join(cfg.output_dir, "tfds"))
    fixed = [f"train.stage={name}", f"train.total_steps={steps}", "train.stop_at_step=0"]
    if plan.learning_rate:
        fixed.append(f"optim.learning_rate={plan.learning_rate}")
    if plan.batch_pairs:
        fixed.append(f"data.batch_pairs={plan.batch_pairs}")
    if name == "cloud":
        # A critique the SFT model left empty cannot be trained on: its row is skipped and
        # counted in the rejects file rather than stopping the run.
        fixed.append("data.lenient=true")
    try:
        return config_from_dict(shared, fixed + list(plan.overrides),
                                source=f"stages.{name} of the pipeline config")
    except ConfigError as err:
        if str(err).startswith(f"stages.{name} "):
            raise
        raise ConfigError(f"stages.{name} of the pipeline config: {err}") from None


def _train(cfg: PipelineConfig, name: str, **paths) -> dict:
    from cloud_jax.training.loop import run

    stage_cfg = _stage_config(cfg, name, **paths)
    done = os.path.join(stage_cfg.output_dir, _DONE)
    summary = None
    if os.path.exists(done):
        try:
            with open(done, encoding="utf-8") as f:
                summary = json.load(f)
        except ValueError as err:
            # Not whole (written by a release that wrote it in place, cut by a kill): the stage
            # runs again, resuming from its last checkpoint.
            log.warning("%s: %s does not read back (%s); running the stage again", name, done,
                        err)
    if summary is not None:
        log.info("%s: already finished (%s), skipped", name, done)
        _drop_checkpoints(cfg, stage_cfg)
        return {**summary, "reused": True}
    log.info("%s: %d steps -> %s", name, stage_cfg.train.total_steps, stage_cfg.output_dir)
    start = time.perf_counter()
    summary = run(stage_cfg)
    if summary.get("preempted"):
        raise Preempted(f"{name} was stopped by SIGTERM after saving step {summary['step']}; "
                        "run the same command again to resume")
    keep = {k: summary.get(k) for k in ("step", "train", "eval", "final_dir", "data")}
    # This attempt's time (a resumed stage: the steps after its checkpoint).
    keep["seconds"] = round(time.perf_counter() - start, 2)
    # Whole or absent (a temporary file, then a rename): a kill mid-write must not leave a
    # summary that marks the stage finished but does not read back.
    storage.write_text_atomic(done, json.dumps(keep, indent=2, sort_keys=True, default=str))
    # Only after the summary is written: a stage is never left unfinished without checkpoints.
    _drop_checkpoints(cfg, stage_cfg)
    return keep


def _drop_checkpoints(cfg: PipelineConfig, stage_cfg: Config) -> None:
    """stages.keep_checkpoints=false: a finished stage's checkpoint directory is deleted."""
    from cloud_jax.training.loop import run_checkpoint_dir

    if cfg.stages.keep_checkpoints:
        return
    path = run_checkpoint_dir(stage_cfg.train.checkpoint_dir, stage_cfg.output_dir)
    if storage.remove_tree(path):
        log.info("stages.keep_checkpoints=false: deleted %s (the stage's final/ export stays)",
                 path)


def _self_critique(cfg: PipelineConfig, sft_dir: str, train_path: str,
                   sft_step: Optional[int] = None) -> str:
    """Stage 2: the SFT model at ``sft_dir`` (trained ``sft_step`` steps, recorded in the
    provenance) rewrites the critiques of ``train_path``; returns the shards' glob."""
    # Scoring loads transformers (seconds): imported where used, so that a config error is
    # reported without that wait.
    from cloud_jax.scoring.relabel import RelabelSettings, relabel
    from cloud_jax.scoring.rewards import ScoreConfig, fit_max_length

    sc = cfg.self_critique
    devices = jax.local_devices()
    mesh = make_mesh(MeshConfig(), devices) if len(devices) > 1 else None
    rm = cloud_jax.load(sft_dir, mesh=mesh, rules=SAMPLE_RULES, dtype=cfg.model.dtype)
    # data.max_length is the training rows' length, not a scoring choice: held here to what the
    # model's positions leave after the critique (as scoring would), so no warning names it.
    max_length = fit_max_length(rm, cfg.data.max_length, 1 + sc.max_critique_tokens)
    score_cfg = ScoreConfig(temperature=sc.temperature, max_critique_tokens=sc.max_critique_tokens,
                            batch_size=sc.batch_size, seed=sc.seed, max_length=max_length,
                            critique_prefix=_trained_prefix(rm, cfg),
                            decode_phases=sc.decode_phases).validate()
    rows = load_rows(train_path, require_feedback=False).rows
    bars = []

    def progress_bar(total: int):  # a bar over the responses still to critique
        bar = progress.bar(total, "responses", desc="self_critique",
                           disable=not cfg.train.progress_bar)
        bars.append(bar)
        return lambda done, new_tokens: bar.update(done)

    try:
        summary = relabel(rm, rows, os.path.join(cfg.output_dir, "self_critique"), score_cfg,
                          RelabelSettings(checkpoint=sft_dir, checkpoint_step=sft_step,
                                          input_paths=expand_paths(train_path), shard_rows=1024),
                          progress=progress_bar)
    finally:
        for bar in bars:
            bar.close()
    if summary.unusable:
        log.warning("%d self-critiques are empty or hold NUL characters", summary.unusable)
    return summary.glob


def _trained_prefix(rm, cfg: PipelineConfig) -> str:
    """The critique prefix a stage's model was trained with, as its export records it: a stage
    started from an export that records one takes it where data.critique_prefix is at its default
    (cloud_jax.training.loop.follow_init_from), so stage 2 writes, and the evaluation reads, the
    critiques after the text that the SFT and cloud stages trained after. data.critique_prefix
    where the export records none."""
    trained = getattr(rm, "critique_prefix", None)
    return cfg.data.critique_prefix if trained is None else trained


def _arm_rows(cfg: PipelineConfig, train_path: str, rows):
    """The train rows that the cloud and classic arms share (self_critique.num_rows): every row
    at train_path, or the first N written to <output_dir>/arm_train.jsonl."""
    n = cfg.self_critique.num_rows
    if not n or n >= len(rows):
        return train_path, rows
    path = os.path.join(cfg.output_dir, "arm_train.jsonl")
    write_jsonl_atomic(path, [row_record(row) for row in rows[:n]])
    log.info("self_critique.num_rows=%d: cloud and classic train on the first %d of %d train "
             "rows (%s)", n, n, len(rows), path)
    return path, rows[:n]


# --- evaluation -----------------------------------------------------------------------------


def _evaluate(cfg: PipelineConfig, rows, cloud_dir: str, classic_dir: str,
              timer: _Timer) -> Dict[str, Any]:
    from cloud_jax.scoring.rewards import ScoreConfig, fit_max_length

    ev = cfg.evaluation
    out_dir = os.path.join(cfg.output_dir, "eval")
    common = dict(max_critique_tokens=ev.max_critique_tokens, seed=ev.seed,
                  batch_size=ev.batch_size)
    decoding = dict(decode_phases=ev.decode_phases)
    prefix = dict(critique_prefix=cfg.data.critique_prefix)
    # data.max_length is the training rows' length, not a scoring choice: each scorer gets it
    # held to what the model's positions leave (after a sampled critique), as scoring would hold
    # it, so that no warning names it.
    # Sampling and scoring compute in the model section's dtype, as training did.
    classic_rm = cloud_jax.load(classic_dir, dtype=cfg.model.dtype)
    classic = timer.run("evaluate_classic", run_evaluation,
                        score_fn_from_model(classic_rm, classic=True, **common, **prefix,
                                            max_length=fit_max_length(classic_rm,
                                                                      cfg.data.max_length)),
                        EvalConfig(classic=True, **common), os.path.join(out_dir, "classic"),
                        rows=rows, progress=True)
    rm = cloud_jax.load(cloud_dir, dtype=cfg.model.dtype)
    prefix = dict(critique_prefix=_trained_prefix(rm, cfg))
    shared = dict(max_length=fit_max_length(rm, cfg.data.max_length,
                                            1 + ev.max_critique_tokens), **prefix)
    greedy = timer.run("evaluate_cloud_greedy", run_evaluation,
                       score_fn_from_model(rm, temperature=0.0, **common, **shared,
                                           **decoding),
                       EvalConfig(num_samples=(1,), temperature=0.0, **common),
                       os.path.join(out_dir, "cloud_greedy"), rows=rows, progress=True)
    sampling = dict(temperature=ev.temperature, **({"top_p": ev.top_p} if ev.top_p else {}))
    sampled = timer.run("evaluate_cloud_sampled", run_evaluation,
                        score_fn_from_model(rm, **sampling, **common, **shared, **decoding),
                        EvalConfig(num_samples=tuple(ev.num_samples),
                                   temperature=ev.temperature, **common),
                        os.path.join(out_dir, "cloud_sampled"), rows=rows, progress=True)

    arms = {"greedy": greedy, "sampled": sampled}
    written = {name: [rec for _, rec in read_jsonl(report["files"]["critiques"])]
               for name, report in arms.items()}
    diag: Dict[str, Any] = {
        f"critiques_{name}": {
            **critique_quality([rec["chosen_critiques"] for rec in recs],
                               [rec["rejected_critiques"] for rec in recs], rows),
            "truncated_fraction": arms[name]["rewardbench"]["truncated_fraction"]}
        for name, recs in written.items()}
    oracle_rewards = timer.run(
        "evaluate_cloud_oracle", _oracle_rewards, rm, rows,
        ScoreConfig(batch_size=ev.batch_size, max_length=fit_max_length(rm, cfg.data.max_length),
                    **prefix))
    diag["cloud_accuracy_with_oracle_critiques"] = float(
        np.mean(oracle_rewards[:, 0] > oracle_rewards[:, 1]))
    acc = lambda report, k: report["rewardbench"]["accuracy_vs_k"][str(k)]  # noqa: E731
    return {
        "classic": {"accuracy": acc(classic, 1)},
        "cloud": {"accuracy": acc(greedy, 1),
                  "self_consistency": {str(k): acc(sampled, k) for k in sorted(ev.num_samples)},
                  "temperature": ev.temperature},
        "diagnostics": diag,
        "_records": written["greedy"],
    }


def _oracle_rewards(rm, rows, score_cfg) -> np.ndarray:
    """float32 [N, 2]: each row's (chosen, rejected) rewards after their oracle critiques, both
    sides read after the same prompt tokens (the larger of their cuts where the prompt must be
    cut to fit), as the evaluation compares a pair."""
    from cloud_jax.scoring.rewards import prompt_tokens_cut, teacher_forced_rewards

    prompts = [row.prompt for row in rows for _ in range(2)]
    responses = [text for row in rows for text in (row.chosen, row.rejected)]
    critiques = [oracle_critique(row, side) for row in rows for side in ("chosen", "rejected")]
    cuts = prompt_tokens_cut(rm, prompts, responses, score_cfg, critiques=critiques)
    shared = np.repeat(cuts.reshape(-1, 2).max(axis=1), 2)
    return teacher_forced_rewards(rm, prompts, responses, critiques, score_cfg,
                                  min_prompt_cuts=shared).reshape(-1, 2)


# --- driver ---------------------------------------------------------------------------------


# Settings that change no stage's result: a rerun may change them (the evaluation is redone
# under its own settings; the rest is how runs report, checkpoint and batch their work).
_FREE_SETTINGS = ("evaluation", "stages.keep_checkpoints", "train.progress_bar", "train.log_every",
                  "train.tensorboard_dir", "train.wandb_project", "train.wandb_run_name",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpointing",
                  "train.peak_flops_per_device", "train.metrics_upload_every_s",
                  "data.num_threads", "data.prefetch_buffer_size",
                  "self_critique.batch_size", "self_critique.decode_phases")


def _check_same_config(cfg: PipelineConfig, path: str) -> None:
    """A rerun into the same output_dir must not mix stages trained under other settings: the
    stages of one output_dir are reused only under the settings they were trained with."""
    out = os.path.dirname(path)
    if not os.path.exists(path):
        finished = [name for name in STAGES
                    if os.path.exists(os.path.join(out, name, _DONE))]
        if finished:
            raise ConfigError(f"{out} holds finished stages ({', '.join(finished)}) but no "
                              f"{os.path.basename(path)} saying what they were trained with; "
                              "use a new output_dir, or delete those stage directories")
        return
    changed = records.changes(to_dict(load_config(path, schema=PipelineConfig)), to_dict(cfg),
                              ignore=_FREE_SETTINGS)
    if changed:
        raise ConfigError(f"{path} records other settings ({', '.join(changed)} differ): the "
                          f"stages in {out} were trained under those. Use a new output_dir, or "
                          "rerun with the recorded settings")


def stage_times(this_run: Dict[str, float], summaries: Dict[str, dict],
                total: float) -> Dict[str, Any]:
    """What results.json says of time: ``seconds`` (each stage's seconds, a reused stage's from
    the run that trained it, and ``total``, this run's wall time), ``reused_stages``, and
    ``timing``, which tells the two apart: per stage its seconds and ``ran`` ("this_run" or
    "earlier_run"), ``total_this_run``, and ``total_across_runs`` (this run's total plus the
    reused stages' earlier seconds; None when a reused stage's summary holds no time)."""
    reused = [name for name, s in summaries.items() if s.get("reused")]
    seconds = dict(this_run)
    stages = {name: {"seconds": s, "ran": "this_run"} for name, s in this_run.items()}
    earlier: Any = 0.0
    for name in reused:
        then = summaries[name].get("seconds")
        stages[name] = {"seconds": then, "ran": "earlier_run"}
        if then is None:
            earlier = None
            continue
        seconds[name] = then
        if earlier is not None:
            earlier += then
    across = None if earlier is None else round(total + earlier, 2)
    return {"seconds": {**seconds, "total": total}, "reused_stages": reused,
            "timing": {"stages": stages, "total_this_run": total,
                       "total_across_runs": across}}


def run_pipeline(cfg: PipelineConfig) -> Dict[str, Any]:
    """Runs every stage (skipping finished ones) and returns what ``results.json`` holds."""
    cfg = cfg.validate()
    # Every stage's config (its stages.<name> plan and overrides on the shared sections) is
    # checked before the first stage runs, not when its turn comes, maybe hours later.
    checked = [_stage_config(cfg, name, train_path=cfg.data.train_path,
                             eval_path=cfg.data.eval_path, init_from=cfg.init_from)
               for name in STAGES if not (name == "lm_pretrain" and cfg.init_from)]
    # The stages share the tokenizer and the model section: one check of their fit, before the
    # benchmark's data is written.
    from cloud_jax.training.loop import load_fitting_tokenizer

    load_fitting_tokenizer(checked[0])
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    saved = os.path.join(out, "pipeline_config.yaml")
    _check_same_config(cfg, saved)
    save_config(cfg, saved)
    timer = _Timer()
    start = time.perf_counter()

    train_path, eval_path = cfg.data.train_path, cfg.data.eval_path
    if not train_path:
        paths = timer.run("data", write_splits, os.path.join(out, "data"),
                          dataclasses.replace(cfg.benchmark, num_test=0))
        train_path, eval_path = paths["train"], paths["eval"]
    train_rows = load_rows(train_path, require_feedback=True).rows
    eval_rows = load_rows(eval_path, require_feedback=True).rows
    if cfg.evaluation.num_rows:
        eval_rows = eval_rows[:cfg.evaluation.num_rows]
    log.info("data: %d train rows (%s), %d held-out rows (%s)", len(train_rows), train_path,
             len(eval_rows), eval_path)

    summaries = {}
    if cfg.init_from:
        base = cfg.init_from
        log.info("lm_pretrain: skipped, the base model is %s", base)
    else:
        summaries["lm_pretrain"] = timer.run("lm_pretrain", _train, cfg, "lm_pretrain",
                                             train_path=train_path, eval_path=eval_path,
                                             init_from="")
        base = summaries["lm_pretrain"]["final_dir"]
    summaries["critique_sft"] = timer.run("critique_sft", _train, cfg, "critique_sft",
                                          train_path=train_path, eval_path=eval_path,
                                          init_from=base)
    sft = summaries["critique_sft"]["final_dir"]
    arm_path, arm_rows = _arm_rows(cfg, train_path, train_rows)
    log.info("self_critique: the SFT model rewrites %d x 2 train critiques", len(arm_rows))
    critiqued = timer.run("self_critique", _self_critique, cfg, sft, arm_path,
                          summaries["critique_sft"].get("step"))
    summaries["cloud"] = timer.run("cloud", _train, cfg, "cloud", train_path=critiqued,
                                   eval_path=eval_path, init_from=sft)
    summaries["classic"] = timer.run("classic", _train, cfg, "classic", train_path=arm_path,
                                     eval_path=eval_path, init_from=base)
    log.info("evaluate: classic, CLoud greedy and K = %s on %d held-out pairs",
             list(cfg.evaluation.num_samples), len(eval_rows))
    results = _evaluate(cfg, eval_rows, summaries["cloud"]["final_dir"],
                        summaries["classic"]["final_dir"], timer)
    greedy_critiques = results.pop("_records")
    results["diagnostics"]["sft_self_critique_train"] = self_critique_quality(critiqued,
                                                                             arm_rows)
    results["cloud_minus_classic"] = results["cloud"]["accuracy"] - results["classic"]["accuracy"]
    results["num_train_rows"] = len(train_rows)
    results["num_arm_train_rows"] = len(arm_rows)
    results["num_eval_rows"] = len(eval_rows)
    results["stages"] = {name: {"steps": s.get("step"), "final_dir": s.get("final_dir"),
                                "train": s.get("train"), "eval": s.get("eval"),
                                "data": s.get("data")} for name, s in summaries.items()}
    results.update(stage_times(timer.seconds, summaries, round(time.perf_counter() - start, 2)))
    # Whole or absent: a kill mid-write leaves no cut results file.
    storage.write_text_atomic(os.path.join(out, RESULTS_JSON),
                              json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    storage.write_text_atomic(os.path.join(out, REPORT_MD), markdown_report(
        results, greedy_critiques, eval_rows, cfg.evaluation.num_examples))
    return results
