"""The pipeline's config: a training config whose sections every stage shares, plus the
pipeline's own sections (``benchmark``, ``stages``, ``self_critique``, ``evaluation``).

    cfg = load_pipeline_config("configs/demo_cpu.yaml", ["stages.cloud.total_steps=100"])
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Tuple

from cloud_jax.data.synthetic.reasoning import ReasoningBenchmarkConfig
from cloud_jax.errors import ConfigError
from cloud_jax.sampling.loop import DECODE_PHASES, check_decode_phases
from cloud_jax.sampling.methods import check_seed, method_from
from cloud_jax.data.config import DataConfig
from cloud_jax.training.config import Config, TrainConfig, load_config
from cloud_jax.training.stages import STAGES



@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One training stage of the pipeline; 0 / empty fields take the shared sections' values."""

    total_steps: int = 0
    learning_rate: float = 0.0
    batch_pairs: int = 0
    # Further `key=value` overrides of this stage's config, e.g. ["loss.lm_coef=1.0"].
    overrides: Tuple[str, ...] = ()


# The keys the pipeline sets in each stage's config, and what to set instead: a stage's
# overrides giving one would replace the pipeline's value (train.stage=cloud turned the classic
# baseline into a second CLoud run).
_WIRED_STAGE_KEYS = {
    "train.stage": "each stage has its own",
    "train.total_steps": "set stages.<name>.total_steps",
    "train.stop_at_step": "every stage runs to its end",
    "output_dir": "each stage writes <output_dir>/<name>",
    "init_from": "each stage starts from the stage before it; the top-level init_from names "
                 "the base model",
    "data.train_path": "each stage reads the rows the pipeline gives it; set data.train_path "
                       "at the top level",
    "data.eval_path": "each stage reads the rows the pipeline gives it; set data.eval_path at "
                      "the top level",
    "data.tfds_dir": "the stages share <output_dir>/tfds",
}


def _check_stage_overrides(name: str, overrides: Sequence[str]) -> None:
    for item in overrides:
        key = str(item).split("=", 1)[0].strip()
        # A whole section (train={...}) sets its keys too.
        hit = [wired for wired in _WIRED_STAGE_KEYS
               if wired == key or wired.startswith(key + ".")]
        if hit:
            raise ConfigError(f"stages.{name}.overrides: {item!r} sets {hit[0]}, which the "
                              f"pipeline sets for this stage ({_WIRED_STAGE_KEYS[hit[0]]})")


@dataclasses.dataclass(frozen=True)
class StagesConfig:
    # At most one epoch of the default benchmark (4000 train rows) at the default 8 pairs a batch
    # (data.num_epochs 1): a run with no config trains every stage.
    lm_pretrain: StagePlan = StagePlan(total_steps=300)
    critique_sft: StagePlan = StagePlan(total_steps=500)
    cloud: StagePlan = StagePlan(total_steps=200)
    # total_steps 0: as many as `cloud` (the comparison is at equal data and steps).
    classic: StagePlan = StagePlan()
    # false: a stage's checkpoint directory (parameters and optimizer state, about 3x the
    # exported model in fp32) is deleted once the stage has finished and exported final/, which
    # is all that later stages and the evaluation read. true keeps every saved step for
    # `python -m cloud_jax export-hf --step N`.
    keep_checkpoints: bool = True


@dataclasses.dataclass(frozen=True)
class SelfCritiqueConfig:
    """How the SFT model rewrites the train critiques (stage 2)."""

    temperature: float = 0.0
    max_critique_tokens: int = 96
    batch_size: int = 256
    seed: int = 0
    # The first N train rows are rewritten, and both arms (cloud and classic) train on just
    # those rows: equal data, with N x 2 critiques to sample instead of every row's. The
    # earlier stages (lm_pretrain, critique_sft) still see every train row. 0: all rows.
    num_rows: int = 0
    # Loops the decode grows the critiques' cache in, each compiled on its own
    # (ScoreConfig.decode_phases): 1 compiles fastest, more read fewer empty slots a step.
    decode_phases: int = DECODE_PHASES


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
    # As self_critique.decode_phases, for the evaluation's decodes.
    decode_phases: int = DECODE_PHASES


@dataclasses.dataclass(frozen=True)
class PipelineConfig(Config):
    """A training config (its sections are shared by every stage) plus the pipeline's own
    sections. Each stage starts from the shared sections, with ``train.stage``,
    ``train.total_steps``, ``output_dir``, ``init_from`` and the data paths set by the pipeline
    (a config giving ``train.stage``, ``train.total_steps``, ``train.stop_at_step`` or
    ``data.tfds_dir`` is refused), then its ``stages.<name>`` plan on top.
    ``init_from`` names the base model of both arms: "" trains one from scratch (stage
    lm_pretrain); a local HF or CLoud directory (or hub id) is used as is, and lm_pretrain is
    skipped."""

    output_dir: str = "runs/pipeline"
    # Written to <output_dir>/data when data.train_path is empty: the train and eval splits only
    # (no test split; num_test other than its default or 0 is refused).
    benchmark: ReasoningBenchmarkConfig = dataclasses.field(
        default_factory=ReasoningBenchmarkConfig)
    stages: StagesConfig = dataclasses.field(default_factory=StagesConfig)
    self_critique: SelfCritiqueConfig = dataclasses.field(default_factory=SelfCritiqueConfig)
    evaluation: PipelineEvalConfig = dataclasses.field(default_factory=PipelineEvalConfig)

    def validate(self) -> "PipelineConfig":
        if "://" in self.output_dir:
            raise ConfigError(f"output_dir={self.output_dir!r}: the pipeline experiment writes its "
                              "report and plots with local file calls; give a local directory "
                              "(each stage on its own, python -m cloud_jax.train / critique / "
                              "evaluate, takes gs:// paths)")
        # Keys every stage sets for itself: a value given here would be silently replaced.
        given = {"train.stage": (self.train.stage, TrainConfig.stage,
                                 "each stage has its own"),
                 "train.total_steps": (self.train.total_steps, TrainConfig.total_steps,
                                       "set stages.<name>.total_steps"),
                 "train.stop_at_step": (self.train.stop_at_step, TrainConfig.stop_at_step,
                                        "every stage runs to its end"),
                 "data.tfds_dir": (self.data.tfds_dir, DataConfig.tfds_dir,
                                   "the stages share <output_dir>/tfds")}
        for key, (value, default, instead) in given.items():
            if value != default:
                raise ConfigError(f"{key}={value!r}: the pipeline sets this key for every stage "
                                  f"and would ignore it ({instead})")
        ckpt = self.train.checkpoint_dir
        if ckpt and ("://" in ckpt or os.path.isabs(ckpt)):
            raise ConfigError(f"train.checkpoint_dir={ckpt!r}: every stage would share this "
                              "directory, and the second would find the first one's checkpoints; "
                              "leave it empty (<output_dir>/<stage>/checkpoints) or give a "
                              "relative path (under each stage's directory)")
        if self.data.columns.mapping() or self.data.split or self.data.eval_split:
            raise ConfigError("data.columns / data.split / data.eval_split: the pipeline reads "
                              "its rows, and writes the self-critiqued ones, in the standard "
                              "fields (prompt, chosen, rejected, chosen_feedback, "
                              "rejected_feedback); convert the rows to them first (train, "
                              "critique and evaluate on their own take these keys)")
        if bool(self.data.train_path) != bool(self.data.eval_path):
            raise ConfigError("data.train_path and data.eval_path go together: give both (rows "
                              "with oracle feedback) or neither (the built-in benchmark)")
        if not self.data.train_path:
            self.benchmark.validate()
            if self.benchmark.num_eval < 1:
                raise ConfigError("benchmark.num_eval must be >= 1: the evaluation needs a "
                                  "held-out split")
            if self.benchmark.num_train < 1:
                raise ConfigError("benchmark.num_train must be >= 1: the stages train on it")
            if self.benchmark.num_test not in (0, ReasoningBenchmarkConfig.num_test):
                raise ConfigError(f"benchmark.num_test={self.benchmark.num_test}: the pipeline "
                                  "writes no test split (it evaluates on the eval split, "
                                  "benchmark.num_eval); leave num_test out, or write one with "
                                  "python -m cloud_jax make-benchmark")
        for name in STAGES:
            if name == "lm_pretrain" and self.init_from:
                continue
            plan: StagePlan = getattr(self.stages, name)
            _check_stage_overrides(name, plan.overrides)
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
        if self.self_critique.num_rows < 0:
            raise ConfigError(f"self_critique.num_rows={self.self_critique.num_rows}: must be "
                              ">= 0 (0: every train row)")
        if ev.num_rows < 0 or ev.num_examples < 0:
            raise ConfigError("evaluation.num_rows and evaluation.num_examples must be >= 0")
        for section in ("self_critique", "evaluation"):
            # The sampling settings are checked here, not first when the stage that samples
            # runs (self-critique after two training stages, the evaluation after all four).
            sc = getattr(self, section)
            try:
                check_decode_phases(sc.decode_phases)
                method_from(sc.temperature, top_p=getattr(sc, "top_p", None))
                check_seed(sc.seed)
                if sc.batch_size < 1:
                    raise ValueError(f"batch_size={sc.batch_size}: must be >= 1")
            except ValueError as err:
                raise ConfigError(f"{section}.{err}") from None
        return self


def load_pipeline_config(path: Optional[str], overrides: Sequence[str] = ()) -> PipelineConfig:
    # config_from_dict validates the shared sections (PipelineConfig is a Config).
    return load_config(path, overrides, schema=PipelineConfig).validate()
