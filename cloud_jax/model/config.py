"""The backbone and reward-head configuration (the ``model`` section of a run config)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

from cloud_jax.errors import ConfigError

__all__ = ["DECODE_ATTENTION_IMPLS", "ModelConfig", "RopeScalingConfig"]

DECODE_ATTENTION_IMPLS = ("xla", "pallas", "auto")  # ModelConfig.decode_attention_impl


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
    # The byte tokenizer's 262 tokens (data.tokenizer's default), rounded up to a multiple of 16.
    vocab_size: int = 272
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
    # How a forward without a KV cache (training, evaluation) computes attention: "xla" (the
    # masked score arrays above, fp32 softmax) or "cudnn" (jax.nn.dot_product_attention's cuDNN
    # flash attention over the same mask: no [T, S] score arrays in device memory; NVIDIA GPUs,
    # bfloat16 or float16 compute). Forwards with a cache (sampling, scoring) use "xla".
    attention_impl: str = "xla"
    # How a decode step (one new token per row over the shared prompt and the rows' own caches:
    # sampling critiques) computes attention: "xla" (gqa_attention's operations, about 14 a
    # layer) or "pallas" (cloud_jax.model.gpu_kernels: one Triton kernel a layer on NVIDIA GPUs,
    # Pallas's interpreter off a GPU, for tests; XLA's attention on TPU; on a mesh, one call per
    # device over its shard). Steps whose shapes the kernel does not take
    # (gpu_kernels.supported) or that do not split over the mesh keep "xla", with a warning.
    # "auto": the kernel where a program is compiled for an NVIDIA GPU and the step's shapes
    # suit it, XLA's attention elsewhere (no interpreter, no warning).
    decode_attention_impl: str = "xla"
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
    # All of a checkpoint's EOS ids where its config lists several (eos_token_id is the first);
    # exports write the list back. Empty: eos_token_id alone.
    eos_token_ids: Tuple[int, ...] = ()
    pad_token_id: Optional[int] = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one decoder layer's matrices (q, k, v, o, gate, up, down)."""
        return (self.hidden_size * self.resolved_head_dim * (2 * self.num_heads
                                                              + 2 * self.num_kv_heads)
                + 3 * self.hidden_size * self.intermediate_size)

    def hf_family_problem(self) -> Optional[str]:
        """Why this model is no checkpoint of its Hugging Face family (None when it is one): the
        q/k/v bias is Qwen2's (a Llama's attention_bias also biases o_proj; Mistral has none),
        the sliding window Mistral's. Such a model computes here, but an export would load as
        another model, so training and export refuse it."""
        if self.attention_bias and self.family != "qwen2":
            return (f"model.attention_bias=true with model.family={self.family}: the q/k/v bias "
                    "is Qwen2's (set model.family=qwen2, or attention_bias=false)")
        if self.sliding_window is not None and self.family != "mistral":
            return (f"model.sliding_window={self.sliding_window} with model.family={self.family}:"
                    " sliding-window attention is Mistral's (set model.family=mistral, or leave "
                    "sliding_window unset)")
        return None

    def validate(self) -> "ModelConfig":
        if self.family not in ("llama", "mistral", "qwen2"):
            raise ConfigError(f"model.family={self.family!r}: expected one of llama, mistral, qwen2")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)}: must be >= 1")
        for key in ("head_dim", "sliding_window"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)}: must be >= 1 (or null)")
        if not self.rms_norm_eps >= 0:  # NaN too
            raise ConfigError(f"model.rms_norm_eps={self.rms_norm_eps}: must be >= 0")
        if not 0 < self.rope_theta < math.inf:
            raise ConfigError(f"model.rope_theta={self.rope_theta}: must be a positive number")
        if not 0 < self.rope_scaling.factor < math.inf:
            raise ConfigError(f"model.rope_scaling.factor={self.rope_scaling.factor}: must be a "
                              "positive number")
        rs = self.rope_scaling
        if rs.type == "llama3":
            # Llama-3.1's scaling interpolates between the two factors' wavelengths: equal
            # factors divide by zero, and a context of 0 tokens puts every frequency in the
            # scaled band (Hugging Face's check asks high_freq_factor > low_freq_factor too).
            if not 0 < rs.low_freq_factor < rs.high_freq_factor < math.inf:
                raise ConfigError(
                    f"model.rope_scaling.low_freq_factor={rs.low_freq_factor}, high_freq_factor="
                    f"{rs.high_freq_factor}: llama3 scaling needs 0 < low_freq_factor < "
                    "high_freq_factor")
            if rs.original_max_position_embeddings < 1:
                raise ConfigError(
                    "model.rope_scaling.original_max_position_embeddings="
                    f"{rs.original_max_position_embeddings}: must be >= 1")
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
        if self.resolved_head_dim % 2:
            given = ("" if self.head_dim is not None
                     else f" (hidden_size {self.hidden_size} / num_heads {self.num_heads})")
            raise ConfigError(
                f"model.head_dim={self.resolved_head_dim}{given} is odd: the rotary embedding "
                "turns pairs of features, so a head's size must be even")
        if self.rope_scaling.type not in ("none", "llama3", "linear"):
            raise ConfigError(
                f"model.rope_scaling.type={self.rope_scaling.type!r}: expected none, llama3 or linear"
            )
        if not 0 <= self.reward_dropout < 1:
            # Flax's dropout takes any rate: 1 or more zeroes the reward head's input in
            # training (the reward is then its bias alone), a negative rate rescales it; both
            # only in training, so train and eval would read different heads.
            raise ConfigError(f"model.reward_dropout={self.reward_dropout}: must be in [0, 1)")
        if self.causal_block_size < 0:
            raise ConfigError(f"model.causal_block_size={self.causal_block_size}: must be >= 0")
        if self.attention_impl not in ("xla", "cudnn"):
            raise ConfigError(
                f"model.attention_impl={self.attention_impl!r}: expected xla or cudnn")
        if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise ConfigError(
                f"model.attention_impl=cudnn needs model.dtype bfloat16 or float16 (cuDNN's "
                f"flash attention has no {self.dtype} kernel); got model.dtype={self.dtype}")
        if self.decode_attention_impl not in DECODE_ATTENTION_IMPLS:
            raise ConfigError(f"model.decode_attention_impl={self.decode_attention_impl!r}: "
                              "expected xla, pallas or auto")
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
