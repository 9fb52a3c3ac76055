"""Typed, frozen configuration loaded from YAML with dotted ``key=value`` overrides.

OmegaConf does the YAML parsing, merging and type checking against the dataclass schema; an
unknown key or a value of the wrong type is a :class:`ConfigError` that names the key. The result is
a tree of frozen dataclasses, so a loaded config cannot change under a running job.

    cfg = load_config("configs/tiny_cpu.yaml", ["model.num_layers=4", "seed=1"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cloud_jax.data.config import DataConfig
from cloud_jax.errors import ConfigError
from cloud_jax.losses import LossConfig
from cloud_jax.optim import OptimConfig
from cloud_jax.train_config import TrainConfig

__all__ = ["Config", "ConfigError", "MeshConfig", "ModelConfig", "RopeScalingConfig",
           "config_from_dict", "load_config", "save_config", "to_yaml"]


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling. ``type='llama3'`` is Llama-3.1's piecewise scaling."""

    type: str = "none"  # none | llama3 | linear
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder backbone (Llama family: Llama, Mistral, Qwen2) plus the reward head."""

    family: str = "llama"  # llama | mistral | qwen2
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    # None means hidden_size // num_heads.
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = dataclasses.field(default_factory=RopeScalingConfig)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # Bias on the q/k/v projections (Qwen2).
    attention_bias: bool = False
    # Mistral's sliding-window attention; None attends to the whole prefix.
    sliding_window: Optional[int] = None
    # Causal attention without a cache runs in query blocks of this many tokens, each reading only
    # the keys up to its own end: about half the score and value FLOPs of one masked square at
    # long lengths. 0 computes the whole masked square at once.
    causal_block_size: int = 128
    # Reward-head dropout, applied before each dense layer (the reference uses attention_dropout).
    reward_dropout: float = 0.0
    # dtype of stored parameters and dtype of activations/matmuls. Logits, the reward and every
    # loss term are fp32 regardless.
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Stack the layers and run them with lax.scan (fast compiles for deep models). Parameters then
    # carry a leading layer axis; the unrolled form keeps one subtree per layer.
    scan_layers: bool = False
    # Rematerialisation policy for each decoder layer: none | full | dots | dots_no_batch
    remat: str = "none"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self) -> "ModelConfig":
        if self.family not in ("llama", "mistral", "qwen2"):
            raise ConfigError(f"model.family={self.family!r}: expected one of llama, mistral, qwen2")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} is not a multiple of "
                f"model.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}; set model.head_dim explicitly"
            )
        if self.rope_scaling.type not in ("none", "llama3", "linear"):
            raise ConfigError(
                f"model.rope_scaling.type={self.rope_scaling.type!r}: expected none, llama3 or linear"
            )
        if self.causal_block_size < 0:
            raise ConfigError(f"model.causal_block_size={self.causal_block_size}: must be >= 0")
        if self.remat not in ("none", "full", "dots", "dots_no_batch"):
            raise ConfigError(
                f"model.remat={self.remat!r}: expected none, full, dots or dots_no_batch"
            )
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(
                    f"model.{key}={getattr(self, key)!r}: expected float32, bfloat16 or float16"
                )
        return self


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh. -1 on one axis takes the devices the others leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    """Top-level config. Sections for later stages are added here as they land."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    seed: int = 0
    output_dir: str = "runs/default"
    # Where the model comes from: "" (random init from `model`), a local HF or CLoud directory, or a
    # hub id.
    init_from: str = ""


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None)
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    where = f" key '{key}'" if key else ""
    return ConfigError(f"{source}:{where}: {msg}")


def _make_writable(node) -> None:
    # Frozen dataclasses give read-only nodes at every level; merging needs them writable until
    # `to_object` turns the tree back into frozen dataclasses.
    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _make_writable(child)


def config_from_dict(data: dict, overrides: Sequence[str] = (), schema: type = Config,
                     source: str = "<dict>"):
    """Builds a frozen ``schema`` instance from a plain dict plus ``key=value`` overrides."""
    base = OmegaConf.structured(schema)
    _make_writable(base)
    try:
        merged = OmegaConf.merge(base, OmegaConf.create(data or {}))
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.num_layers=4")
        try:
            merged.merge_with(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override {item!r}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None
    if isinstance(cfg, Config):
        cfg.model.validate()
        cfg.optim.validate()
        cfg.data.validate()
        cfg.loss.validate()
        cfg.train.validate()
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (),
                schema: type = Config):
    """Loads ``path`` (YAML) onto the ``schema`` defaults, then applies dotted overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = os.fspath(path)
        if not os.path.exists(source):
            raise ConfigError(f"config file {source} does not exist")
        try:
            loaded = OmegaConf.load(source)
        except Exception as err:  # yaml errors carry line numbers in their text
            raise ConfigError(f"{source}: not valid YAML: {err}") from None
        data = OmegaConf.to_container(loaded) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys")
    return config_from_dict(data, overrides, schema=schema, source=source)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Writes the resolved config, so a run or checkpoint records exactly what produced it."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(to_yaml(cfg))
