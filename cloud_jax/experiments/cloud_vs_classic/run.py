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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from cloud_jax.data.synthetic.reasoning import ReasoningBenchmarkConfig
from cloud_jax.training.config import Config, config_from_dict, load_config, save_config, to_dict
from cloud_jax.errors import ConfigError, Preempted

log = logging.getLogger("cloud_jax.experiments.cloud_vs_classic.run")

TRAIN_STAGES = ("lm_pretrain", "critique_sft", "cloud", "classic")
RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
_DONE = "stage_summary.json"


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One training stage of the pipeline; 0 / empty fields take the shared sections' values."""

    total_steps: int = 0
    learning_rate: float = 0.0
    batch_pairs: int = 0
    # Further `key=value` overrides of this stage's config, e.g. ["loss.lm_coef=1.0"].
    overrides: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class StagesConfig:
    lm_pretrain: StagePlan = StagePlan(total_steps=300)
    critique_sft: StagePlan = StagePlan(total_steps=600)
    cloud: StagePlan = StagePlan(total_steps=200)
    # total_steps 0: as many as `cloud` (the comparison is at equal data and steps).
    classic: StagePlan = StagePlan()


@dataclasses.dataclass(frozen=True)
class SelfCritiqueConfig:
    """How the SFT model rewrites the train critiques (stage 2)."""

    temperature: float = 0.0
    max_critique_tokens: int = 96
    batch_size: int = 256
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PipelineEvalConfig:
    """The final evaluation on the held-out split."""

    # The K sweep of sampled critiques (sampled once at the largest K).
    num_samples: Tuple[int, ...] = (1, 4, 8)
    temperature: float = 0.7
    top_p: Optional[float] = None
    max_critique_tokens: int = 96
    batch_size: int = 64
    seed: int = 0
    # Held-out rows evaluated; 0: all of them.
    num_rows: int = 0
    # Sample critiques shown in report.md.
    num_examples: int = 6


@dataclasses.dataclass(frozen=True)
class PipelineConfig(Config):
    """A training config (its sections are shared by every stage) plus the pipeline's own
    sections. Each stage starts from the shared sections, with ``train.stage``, ``output_dir``,
    ``init_from`` and the data paths set by the pipeline, then its ``stages.<name>`` plan on top.
    ``init_from`` names the base model of both arms: "" trains one from scratch (stage
    lm_pretrain); a local HF or CLoud directory (or hub id) is used as is, and lm_pretrain is
    skipped."""

    output_dir: str = "runs/pipeline"
    # Written to <output_dir>/data when data.train_path is empty.
    benchmark: ReasoningBenchmarkConfig = dataclasses.field(
        default_factory=ReasoningBenchmarkConfig)
    stages: StagesConfig = dataclasses.field(default_factory=StagesConfig)
    self_critique: SelfCritiqueConfig = dataclasses.field(default_factory=SelfCritiqueConfig)
    evaluation: PipelineEvalConfig = dataclasses.field(default_factory=PipelineEvalConfig)

    def validate(self) -> "PipelineConfig":
        if bool(self.data.train_path) != bool(self.data.eval_path):
            raise ConfigError("data.train_path and data.eval_path go together: give both (rows "
                              "with oracle feedback) or neither (the built-in benchmark)")
        if not self.data.train_path:
            self.benchmark.validate()
            if self.benchmark.num_eval < 1:
                raise ConfigError("benchmark.num_eval must be >= 1: the evaluation needs a "
                                  "held-out split")
        for name in TRAIN_STAGES:
            if name == "lm_pretrain" and self.init_from:
                continue
            plan: StagePlan = getattr(self.stages, name)
            if plan.total_steps < 0 or (plan.total_steps == 0 and name != "classic"):
                raise ConfigError(f"stages.{name}.total_steps={plan.total_steps}: must be >= 1"
                                  + (" (0 only for classic: as many as cloud)"
                                     if name == "classic" else ""))
            if plan.learning_rate < 0 or plan.batch_pairs < 0:
                raise ConfigError(f"stages.{name}: learning_rate and batch_pairs must be >= 0 "
                                  "(0: the shared optim / data value)")
        ev = self.evaluation
        if not ev.num_samples or any(k < 1 for k in ev.num_samples):
            raise ConfigError(f"evaluation.num_samples={list(ev.num_samples)}: need K >= 1")
        if ev.temperature <= 0 and max(ev.num_samples) > 1:
            raise ConfigError(f"evaluation.temperature={ev.temperature}: the K sweep needs "
                              "sampled critiques (e.g. 0.7)")
        if ev.max_critique_tokens < 1 or self.self_critique.max_critique_tokens < 1:
            raise ConfigError("max_critique_tokens must be >= 1 (evaluation and self_critique)")
        if ev.num_rows < 0 or ev.num_examples < 0:
            raise ConfigError("evaluation.num_rows and evaluation.num_examples must be >= 0")
        return self


def load_pipeline_config(path: Optional[str], overrides: Sequence[str] = ()) -> PipelineConfig:
    # config_from_dict validates the shared sections (PipelineConfig is a Config).
    return load_config(path, overrides, schema=PipelineConfig).validate()


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
    return config_from_dict(shared, fixed + list(plan.overrides),
                            source=f"stages.{name} of the pipeline config")


def _train(cfg: PipelineConfig, name: str, **paths) -> dict:
    from cloud_jax.training.loop import run

    stage_cfg = _stage_config(cfg, name, **paths)
    done = os.path.join(stage_cfg.output_dir, _DONE)
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            summary = json.load(f)
        log.info("%s: already finished (%s), skipped", name, done)
        return summary
    log.info("%s: %d steps -> %s", name, stage_cfg.train.total_steps, stage_cfg.output_dir)
    summary = run(stage_cfg)
    if summary.get("preempted"):
        raise Preempted(f"{name} was stopped by SIGTERM after saving step {summary['step']}; "
                        "run the same command again to resume")
    keep = {k: summary.get(k) for k in ("step", "train", "eval", "final_dir", "data")}
    with open(done, "w", encoding="utf-8") as f:
        json.dump(keep, f, indent=2, sort_keys=True, default=str)
    return keep


def _self_critique(cfg: PipelineConfig, sft_dir: str, train_path: str) -> str:
    import jax

    import cloud_jax
    from cloud_jax.data.schema import expand_paths, load_rows
    from cloud_jax.scoring.relabel import RelabelSettings, relabel
    from cloud_jax.scoring.rewards import ScoreConfig
    from cloud_jax.sharding import SAMPLE_RULES, MeshConfig, make_mesh

    sc = cfg.self_critique
    devices = jax.local_devices()
    mesh = make_mesh(MeshConfig(), devices) if len(devices) > 1 else None
    rm = cloud_jax.load(sft_dir, mesh=mesh, rules=SAMPLE_RULES)
    score_cfg = ScoreConfig(temperature=sc.temperature, max_critique_tokens=sc.max_critique_tokens,
                            batch_size=sc.batch_size, seed=sc.seed, max_length=cfg.data.max_length,
                            critique_prefix=cfg.data.critique_prefix).validate()
    rows = load_rows(train_path, require_feedback=False).rows
    summary = relabel(rm, rows, os.path.join(cfg.output_dir, "self_critique"), score_cfg,
                      RelabelSettings(checkpoint=sft_dir, input_paths=expand_paths(train_path),
                                      shard_rows=1024))
    if summary.unusable:
        log.warning("%d self-critiques are empty or hold NUL characters", summary.unusable)
    return summary.glob


# --- evaluation -----------------------------------------------------------------------------


def _rewards_with_critiques(rm, rows, critiques: List[List[str]], cfg: PipelineConfig):
    """Rewards of teacher-forced ``[prompt][response][critique]`` sequences: [N, 2] (chosen,
    rejected) for the given critique texts."""
    import numpy as np

    from cloud_jax.data.layout import encode_example
    from cloud_jax.sampling import pad_prefixes

    seqs = []
    for row, (c_chosen, c_rejected) in zip(rows, critiques):
        for response, crit in ((row.chosen, c_chosen), (row.rejected, c_rejected)):
            ex = encode_example(rm.tokenizer, row.prompt, response, crit, "cloud",
                                cfg.data.critique_prefix, 1 << 30)
            seqs.append(ex.input_ids.tolist())
    out = np.zeros(len(seqs), np.float32)
    batch = max(1, cfg.evaluation.batch_size)
    longest = max(map(len, seqs))
    for start in range(0, len(seqs), batch):
        chunk = seqs[start:start + batch]
        chunk = chunk + [chunk[0]] * (batch - len(chunk))
        ids, mask = pad_prefixes(chunk, longest, side="right")
        _, rewards = rm.forward(ids, mask)
        n = min(batch, len(seqs) - start)
        out[start:start + n] = np.asarray(rewards)[:n]
    return out.reshape(-1, 2)


def _oracle_verdicts(texts: Sequence[str]) -> List[Optional[bool]]:
    from cloud_jax.data.synthetic.reasoning import verdict_of

    return [verdict_of(t) for t in texts]


def _verdicts(critiques_nk: List[List[str]], oracle: List[Optional[bool]]) -> Dict[str, Any]:
    """How often the model's critiques end in the verdict the oracle critique ends in."""
    from cloud_jax.data.synthetic.reasoning import verdict_of

    agree = total = missing = 0
    for crits, want in zip(critiques_nk, oracle):
        if want is None:
            continue
        for c in crits:
            total += 1
            got = verdict_of(c)
            missing += got is None
            agree += got == want
    if not total:
        return {"agreement": None, "no_verdict": None, "critiques": 0,
                "note": "the oracle critiques end in no recognisable verdict"}
    return {"agreement": agree / total, "no_verdict": missing / total, "critiques": total}


def _pairs_judged_right(chosen_nk, rejected_nk) -> Optional[float]:
    from cloud_jax.data.synthetic.reasoning import verdict_of

    right = [verdict_of(c) is True and verdict_of(r) is False
             for cs, rs in zip(chosen_nk, rejected_nk) for c, r in zip(cs, rs)]
    return sum(right) / len(right) if right else None


def _exact(critiques_nk, oracle_texts) -> float:
    hits = [c.strip() == o.strip() for cs, o in zip(critiques_nk, oracle_texts) for c in cs]
    return sum(hits) / max(1, len(hits))


def _feedback(row, field: str) -> str:
    return getattr(row, field) or ""


def _evaluate(cfg: PipelineConfig, rows, cloud_dir: str, classic_dir: str,
              timer: _Timer) -> Dict[str, Any]:
    import cloud_jax
    from cloud_jax.evaluation.run import EvalConfig, run_evaluation
    from cloud_jax.evaluation.scorer import score_fn_from_model

    ev = cfg.evaluation
    out_dir = os.path.join(cfg.output_dir, "eval")
    common = dict(max_critique_tokens=ev.max_critique_tokens, seed=ev.seed,
                  batch_size=ev.batch_size)
    shared = dict(max_length=cfg.data.max_length, critique_prefix=cfg.data.critique_prefix)
    classic_rm = cloud_jax.load(classic_dir)
    classic = timer.run("evaluate_classic", run_evaluation,
                        score_fn_from_model(classic_rm, classic=True, **common, **shared),
                        EvalConfig(classic=True, **common), os.path.join(out_dir, "classic"),
                        rows=rows, progress=True)
    rm = cloud_jax.load(cloud_dir)
    greedy = timer.run("evaluate_cloud_greedy", run_evaluation,
                       score_fn_from_model(rm, temperature=0.0, **common, **shared),
                       EvalConfig(num_samples=(1,), temperature=0.0, **common),
                       os.path.join(out_dir, "cloud_greedy"), rows=rows, progress=True)
    sampling = dict(temperature=ev.temperature, **({"top_p": ev.top_p} if ev.top_p else {}))
    sampled = timer.run("evaluate_cloud_sampled", run_evaluation,
                        score_fn_from_model(rm, **sampling, **common, **shared),
                        EvalConfig(num_samples=tuple(ev.num_samples),
                                   temperature=ev.temperature, **common),
                        os.path.join(out_dir, "cloud_sampled"), rows=rows, progress=True)

    def records(report):
        with open(report["files"]["critiques"], encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    greedy_recs, sampled_recs = records(greedy), records(sampled)
    oracle_c = [_feedback(r, "chosen_feedback") for r in rows]
    oracle_r = [_feedback(r, "rejected_feedback") for r in rows]
    oracle_verdicts = _oracle_verdicts(oracle_c + oracle_r)
    diag: Dict[str, Any] = {}
    for name, recs in (("greedy", greedy_recs), ("sampled", sampled_recs)):
        chosen = [rec["chosen_critiques"] for rec in recs]
        rejected = [rec["rejected_critiques"] for rec in recs]
        diag[f"critiques_{name}"] = {
            **_verdicts(chosen + rejected, oracle_verdicts),
            "pairs_judged_right": _pairs_judged_right(chosen, rejected),
            "exact_match_with_oracle": _exact(chosen + rejected, oracle_c + oracle_r),
            "truncated_fraction": (greedy if name == "greedy" else sampled)["rewardbench"][
                "truncated_fraction"],
        }
    import numpy as np

    oracle_rewards = timer.run("evaluate_cloud_oracle", _rewards_with_critiques, rm, rows,
                               list(zip(oracle_c, oracle_r)), cfg)
    diag["cloud_accuracy_with_oracle_critiques"] = float(
        np.mean(oracle_rewards[:, 0] > oracle_rewards[:, 1]))
    acc = lambda report, k: report["rewardbench"]["accuracy_vs_k"][str(k)]  # noqa: E731
    return {
        "classic": {"accuracy": acc(classic, 1)},
        "cloud": {"accuracy": acc(greedy, 1),
                  "self_consistency": {str(k): acc(sampled, k) for k in sorted(ev.num_samples)},
                  "temperature": ev.temperature},
        "diagnostics": diag,
        "_records": greedy_recs,
    }


# --- report ---------------------------------------------------------------------------------


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _report(results: Dict[str, Any], records: List[dict], rows, num_examples: int) -> str:
    c, k = results["classic"], results["cloud"]
    d = results["diagnostics"]
    gap = k["accuracy"] - c["accuracy"]
    lines = ["# CLoud vs classic: pipeline results", "",
             f"Held-out pairs: {results['num_eval_rows']}. Pairwise accuracy (a tie counts as "
             "wrong):", "",
             "| model | accuracy |", "|---|---|",
             f"| classic reward model | {_pct(c['accuracy'])} |",
             f"| CLoud, greedy critique (K = 1) | {_pct(k['accuracy'])} |"]
    for kk, a in k["self_consistency"].items():
        lines.append(f"| CLoud, K = {kk} sampled critiques (T = {k['temperature']}) | {_pct(a)} |")
    lines += [f"| CLoud given the oracle critiques (the reward head's ceiling) | "
              f"{_pct(d['cloud_accuracy_with_oracle_critiques'])} |", "",
              f"CLoud (greedy) minus classic: **{100 * gap:+.1f} points**.", "",
              "## Diagnostics", "",
              "| critiques | verdict agrees with the oracle | no verdict | pairs judged right | "
              "word for word the oracle's | truncated |", "|---|---|---|---|---|---|"]
    for name in ("sft_self_critique_train", "critiques_greedy", "critiques_sampled"):
        if name not in d:
            continue
        x = d[name]
        lines.append(f"| {name} | {_pct(x.get('agreement'))} | {_pct(x.get('no_verdict'))} | "
                     f"{_pct(x.get('pairs_judged_right'))} | "
                     f"{_pct(x.get('exact_match_with_oracle'))} | "
                     f"{_pct(x.get('truncated_fraction'))} |")
    lines += ["", "Stage times (s): " + ", ".join(f"{n} {s:.0f}"
                                                  for n, s in results["seconds"].items()), "",
              "## Sample critiques (greedy)", ""]
    for rec, row in list(zip(records, rows))[:num_examples]:
        lines += [f"### {row.id} ({rec['outcome']})", "", f"- prompt: `{row.prompt}`"]
        for side in ("chosen", "rejected"):
            lines += [f"- {side}: `{getattr(row, side)}`, reward {rec[side + '_reward']:+.3f}",
                      f"  - model:  `{rec[side + '_critiques'][0]}`",
                      f"  - oracle: `{_feedback(row, side + '_feedback')}`"]
        lines.append("")
    return "\n".join(lines) + "\n"


# --- driver ---------------------------------------------------------------------------------


def _check_same_config(cfg: PipelineConfig, path: str) -> None:
    """A rerun into the same output_dir must not mix stages trained under other settings."""
    if not os.path.exists(path):
        return
    old = to_dict(load_config(path, schema=PipelineConfig))
    new = to_dict(cfg)
    changed = [k for k in sorted(set(old) | set(new))
               if k != "evaluation" and old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(f"{path} records other settings ({', '.join(changed)} differ); use a "
                          "new output_dir, or delete the stages that should be redone")


def _sft_self_critique_quality(train_glob: str, original_rows) -> Dict[str, Any]:
    """The SFT model's greedy train critiques (stage 2's output) against the oracle's; a row the
    shards lack counts as a miss."""
    import glob

    written = {}
    for path in sorted(glob.glob(train_glob)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                written[obj["id"]] = obj
    chosen, rejected = [], []
    for row in original_rows:
        obj = written.get(row.id, {})
        chosen.append([obj.get("chosen_feedback") or ""])
        rejected.append([obj.get("rejected_feedback") or ""])
    oracle_c = [_feedback(r, "chosen_feedback") for r in original_rows]
    oracle_r = [_feedback(r, "rejected_feedback") for r in original_rows]
    return {**_verdicts(chosen + rejected, _oracle_verdicts(oracle_c + oracle_r)),
            "pairs_judged_right": _pairs_judged_right(chosen, rejected),
            "exact_match_with_oracle": _exact(chosen + rejected, oracle_c + oracle_r)}


def run_pipeline(cfg: PipelineConfig) -> Dict[str, Any]:
    """Runs every stage (skipping finished ones) and returns what ``results.json`` holds."""
    from cloud_jax.data.synthetic.reasoning import write_splits
    from cloud_jax.data.schema import load_rows

    cfg = cfg.validate()
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
    log.info("self_critique: the SFT model rewrites %d x 2 train critiques", len(train_rows))
    critiqued = timer.run("self_critique", _self_critique, cfg, sft, train_path)
    summaries["cloud"] = timer.run("cloud", _train, cfg, "cloud", train_path=critiqued,
                                   eval_path=eval_path, init_from=sft)
    summaries["classic"] = timer.run("classic", _train, cfg, "classic", train_path=train_path,
                                     eval_path=eval_path, init_from=base)
    log.info("evaluate: classic, CLoud greedy and K = %s on %d held-out pairs",
             list(cfg.evaluation.num_samples), len(eval_rows))
    results = _evaluate(cfg, eval_rows, summaries["cloud"]["final_dir"],
                        summaries["classic"]["final_dir"], timer)
    records = results.pop("_records")
    results["diagnostics"]["sft_self_critique_train"] = _sft_self_critique_quality(critiqued,
                                                                                  train_rows)
    results["cloud_minus_classic"] = results["cloud"]["accuracy"] - results["classic"]["accuracy"]
    results["num_train_rows"] = len(train_rows)
    results["num_eval_rows"] = len(eval_rows)
    results["stages"] = {name: {"steps": s.get("step"), "final_dir": s.get("final_dir"),
                                "train": s.get("train"), "eval": s.get("eval"),
                                "data": s.get("data")} for name, s in summaries.items()}
    results["seconds"] = {**timer.seconds, "total": round(time.perf_counter() - start, 2)}
    with open(os.path.join(out, RESULTS_JSON), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    with open(os.path.join(out, REPORT_MD), "w", encoding="utf-8") as f:
        f.write(_report(results, records, eval_rows, cfg.evaluation.num_examples))
    return results


def summary_table(results: Dict[str, Any]) -> str:
    c, k = results["classic"], results["cloud"]
    lines = [f"{'model':<44}accuracy", f"{'classic':<44}{_pct(c['accuracy'])}",
             f"{'CLoud, greedy critique (K=1)':<44}{_pct(k['accuracy'])}"]
    temperature = k["temperature"]
    lines += [f"{f'CLoud, K={kk} sampled (T={temperature})':<44}{_pct(a)}"
              for kk, a in k["self_consistency"].items()]
    d = results["diagnostics"]
    lines += [f"{'CLoud given oracle critiques (ceiling)':<44}"
              f"{_pct(d['cloud_accuracy_with_oracle_critiques'])}",
              f"CLoud - classic: {100 * results['cloud_minus_classic']:+.1f} points; "
              f"greedy critiques reach the oracle's verdict "
              f"{_pct(d['critiques_greedy']['agreement'])} of the time; "
              f"total {results['seconds']['total']:.0f} s"]
    return "\n".join(lines)
