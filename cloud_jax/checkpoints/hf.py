"""Hugging Face safetensors in and out: plain Llama / Mistral / Qwen2 directories, and CLoud reward
models in the reference implementation's layout.

Reference CLoud layout (``CLoudRewardModel`` in the original PyTorch code)::

    config.json          {"architectures": ["CLoudRewardModel"], "feedback_method": "teacher",
                          "base_model_name_or_path": ..., "base_model_config": {...}}
    model.safetensors    reward_base_model.model.layers.0.self_attn.q_proj.weight, ...
                         reward_base_model.lm_head.weight, reward_head.dense.{weight,bias},
                         reward_head.out_proj.{weight,bias}

The reference reads the backbone config from ``base_model_name_or_path``; we also write it inline as
``base_model_config`` (and as ``base_config/config.json``) so an exported directory is self-contained,
and add ``critique_prefix`` (the text the model writes its critiques after) when it is known; the
reference ignores both. ``base_model_name_or_path`` is always portable: the hub id the model
descends from when one is known, else ``"base_config"`` (the copy beside the weights, which
cloud_jax resolves against the directory; never an absolute local path).

Only safetensors and JSON are ever read: no pickle, no remote code. Tensors are read one at a time
and placed straight into their target sharding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from cloud_jax import storage
from cloud_jax.errors import CheckpointError
from cloud_jax.model.config import ModelConfig, RopeScalingConfig
from cloud_jax.model.params import (Params, init_reward_head, param_shapes, param_shardings,
                                    stack_layers, unstack_layers)
from cloud_jax.sharding import TRAIN_RULES, Rules

log = logging.getLogger(__name__)

REWARD_PREFIX = "reward_base_model."
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Non-parameter tensors some exporters include.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# Configs


# What transformers takes for keys a family's config.json leaves out (its config classes'
# defaults): the context length, the number of key/value heads (None: one per query head, as
# Llama's), and Mistral's sliding window (null in the file: none).
_FAMILY_DEFAULTS = {"llama": {"max_position_embeddings": 2048, "num_key_value_heads": None},
                    "mistral": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8,
                                "sliding_window": 4096},
                    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32}}

# The keys of a transformers config.json that fix the backbone's shape and have no default here.
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from a transformers ``config.json`` dict (Llama, Mistral or Qwen2)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"model_type={model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    missing = [key for key in _REQUIRED_KEYS if hf.get(key) is None]
    if missing:
        raise CheckpointError(f"the {model_type} config has no {', '.join(missing)}: the "
                              "backbone's shape is unknown")
    # transformers 5 keeps RoPE settings in `rope_parameters`; older files use `rope_scaling`.
    rope_key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = dict(hf.get(rope_key) or {})
    type_key = "rope_type" if "rope_type" in rope else "type"
    rope_type = rope.get(type_key, "default")
    if rope_type in ("default", None):
        scaling = RopeScalingConfig()
    elif rope_type in ("llama3", "linear"):
        # What transformers requires of each type is refused by name where missing, not made up;
        # llama3's pre-training context defaults to the model's, as transformers 5 fills it in.
        required = (("factor", "low_freq_factor", "high_freq_factor") if rope_type == "llama3"
                    else ("factor",))
        missing = [key for key in required if rope.get(key) is None]
        if missing:
            raise CheckpointError(
                f"{rope_key} has no {', '.join(missing)}: {rope_type} RoPE scaling needs "
                f"{', '.join(required)} (transformers refuses the config too)")
        original = rope.get("original_max_position_embeddings")
        if original is None:
            original = hf.get("max_position_embeddings",
                              _FAMILY_DEFAULTS[model_type]["max_position_embeddings"])
        scaling = RopeScalingConfig(
            type=rope_type, factor=float(rope["factor"]),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(original))
    else:
        raise CheckpointError(f"{rope_key}.{type_key}={rope_type!r} is not supported: this "
                              "backbone computes the RoPE types default, linear, llama3")
    # The MLP is SwiGLU (SiLU gate): another activation would load and compute something else.
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"hidden_act={act!r} is not supported: this backbone's MLP gate is "
                              "SiLU (silu / swish)")
    if model_type == "llama":
        # Llama's attention_bias puts a bias on o_proj too, and mlp_bias on the MLP: neither is
        # in this backbone (its q/k/v bias is Qwen2's).
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise CheckpointError(f"a llama config with {key}=true is not supported (no "
                                      "biases on o_proj or the MLP in this backbone)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    defaults = _FAMILY_DEFAULTS[model_type]
    sliding = None
    if model_type == "mistral":
        sliding = hf.get("sliding_window", defaults["sliding_window"])
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        raise CheckpointError("Qwen2 with use_sliding_window=true is not supported")

    def first(x):
        return x[0] if isinstance(x, list) else x

    fields = dict(
        family=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=(hf.get("num_key_value_heads", defaults["num_key_value_heads"])
                      or hf["num_attention_heads"]),
        head_dim=hf.get("head_dim"),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings",
                                       defaults["max_position_embeddings"]),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        sliding_window=sliding,
        reward_dropout=float(hf.get("attention_dropout", 0.0)),
        bos_token_id=first(hf.get("bos_token_id")),
        eos_token_id=first(hf.get("eos_token_id")),
        # Every one where the checkpoint lists several (Llama-3.1-Instruct ends turns with
        # <|eot_id|>, the second): written back as the list.
        eos_token_ids=(tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list)
                       and len(hf["eos_token_id"]) > 1 else ()),
        pad_token_id=first(hf.get("pad_token_id")),
    )
    if fields["head_dim"] == fields["hidden_size"] // fields["num_heads"]:
        fields["head_dim"] = None
    fields.update(overrides)
    return ModelConfig(**fields).validate()


def hf_config_from_model_config(cfg: ModelConfig) -> dict:
    """transformers ``config.json`` dict for the backbone."""
    problem = cfg.hf_family_problem()
    if problem:
        raise CheckpointError(f"cannot export: {problem}")
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}[cfg.family]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.type != "none":
        rs = cfg.rope_scaling
        rope = {"rope_type": rs.type, "rope_theta": cfg.rope_theta, "factor": rs.factor}
        if rs.type == "llama3":
            rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                        original_max_position_embeddings=rs.original_max_position_embeddings)
    out = {
        "architectures": [arch],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_dropout": cfg.reward_dropout,
        "torch_dtype": cfg.param_dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if cfg.eos_token_ids else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.rope_scaling.type != "none":
        # transformers 4.x (the reference code's) reads the scaling from rope_scaling only; 5.x
        # reads rope_parameters and accepts both. Written as Llama-3.1's own config.json has it.
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if cfg.family == "llama":
        out["attention_bias"] = cfg.attention_bias
        out["mlp_bias"] = False
    if cfg.family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.family == "qwen2":
        out["use_sliding_window"] = False
    return out


# ---------------------------------------------------------------------------------------------
# The weight mapping, as data. Each entry: HF name (with {i} for the layer), our path, and how the
# array is reshaped. Our kernels are [in, out] (q/k/v: [D, heads, head_dim], o: [heads, head_dim, D]);
# HF linear weights are [out, in].


@dataclasses.dataclass(frozen=True)
class _Rule:
    hf: str
    ours: tuple[str, ...]
    kind: str  # copy | linear | qkv | qkv_bias | o_proj


_BACKBONE_RULES = (
    _Rule("model.embed_tokens.weight", ("embed", "embedding"), "copy"),
    _Rule("model.norm.weight", ("final_norm", "scale"), "copy"),
    _Rule("lm_head.weight", ("lm_head",), "linear"),
)
_LAYER_RULES = (
    _Rule("model.layers.{i}.input_layernorm.weight", ("input_norm", "scale"), "copy"),
    _Rule("model.layers.{i}.post_attention_layernorm.weight", ("post_attn_norm", "scale"), "copy"),
    _Rule("model.layers.{i}.self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), "qkv"),
    _Rule("model.layers.{i}.self_attn.k_proj.weight", ("attn", "k_proj", "kernel"), "qkv"),
    _Rule("model.layers.{i}.self_attn.v_proj.weight", ("attn", "v_proj", "kernel"), "qkv"),
    _Rule("model.layers.{i}.self_attn.q_proj.bias", ("attn", "q_proj", "bias"), "qkv_bias"),
    _Rule("model.layers.{i}.self_attn.k_proj.bias", ("attn", "k_proj", "bias"), "qkv_bias"),
    _Rule("model.layers.{i}.self_attn.v_proj.bias", ("attn", "v_proj", "bias"), "qkv_bias"),
    _Rule("model.layers.{i}.self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), "o_proj"),
    _Rule("model.layers.{i}.mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), "linear"),
    _Rule("model.layers.{i}.mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), "linear"),
    _Rule("model.layers.{i}.mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), "linear"),
)
_HEAD_RULES = (
    _Rule("reward_head.dense.weight", ("reward_head", "dense", "kernel"), "linear"),
    _Rule("reward_head.dense.bias", ("reward_head", "dense", "bias"), "copy"),
    _Rule("reward_head.out_proj.weight", ("reward_head", "out_proj", "kernel"), "linear"),
    _Rule("reward_head.out_proj.bias", ("reward_head", "out_proj", "bias"), "copy"),
)


def weight_table(cfg: ModelConfig, with_head: bool, hf_prefix: str = "") -> dict[str, tuple]:
    """{HF tensor name: (our param path, kind)} for every parameter of ``cfg``."""
    table: dict[str, tuple] = {}
    for rule in _BACKBONE_RULES:
        if rule.ours == ("lm_head",) and cfg.tie_word_embeddings:
            continue
        table[hf_prefix + rule.hf] = (rule.ours, rule.kind)
    for i in range(cfg.num_layers):
        for rule in _LAYER_RULES:
            if rule.kind == "qkv_bias" and not cfg.attention_bias:
                continue
            table[hf_prefix + rule.hf.format(i=i)] = ((f"layers_{i}",) + rule.ours, rule.kind)
    if with_head:
        for rule in _HEAD_RULES:
            table[rule.hf] = (rule.ours, rule.kind)
    return table


def _to_ours(arr: np.ndarray, kind: str, target_shape: tuple[int, ...]) -> np.ndarray:
    if kind in ("qkv", "qkv_bias", "o_proj") and arr.size != int(np.prod(target_shape)):
        raise CheckpointError(f"shape {arr.shape} does not map onto {tuple(target_shape)}")
    if kind == "copy":
        out = arr
    elif kind == "linear":
        out = arr.T
    elif kind == "qkv":  # [H*Dh, D] -> [D, H, Dh]
        out = arr.T.reshape(target_shape)
    elif kind == "qkv_bias":  # [H*Dh] -> [H, Dh]
        out = arr.reshape(target_shape)
    elif kind == "o_proj":  # [D, H*Dh] -> [H, Dh, D]
        out = arr.T.reshape(target_shape)
    else:
        raise AssertionError(kind)
    if out.shape != tuple(target_shape):
        raise CheckpointError(f"shape {arr.shape} does not map onto {target_shape}")
    return out


def _to_hf(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "copy":
        return arr
    if kind == "linear":
        return arr.T
    if kind == "qkv":  # [D, H, Dh] -> [H*Dh, D]
        return arr.reshape(arr.shape[0], -1).T
    if kind == "qkv_bias":
        return arr.reshape(-1)
    if kind == "o_proj":  # [H, Dh, D] -> [D, H*Dh]
        return arr.reshape(-1, arr.shape[-1]).T
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------
# Reading


# base_model_name_or_path of an export whose hub id is not known: the backbone config written
# beside the weights. cloud_jax reads it relative to the export (or the inline copy); the reference
# class resolves it against the working directory (docs/COMPATIBILITY.md).
LOCAL_BASE = "base_config"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?")


def is_hub_id(name: Optional[str]) -> bool:
    """``name`` has the form of a hub id ("owner/name" or "name") and is not a local path."""
    if not name or not isinstance(name, str) or name == LOCAL_BASE:
        return False
    return bool(_HUB_ID.fullmatch(name)) and not name.startswith(".") and not Path(name).exists()


def base_model_name_of(path_or_id: str | os.PathLike) -> Optional[str]:
    """The hub id a model descends from, for an export's ``base_model_name_or_path``: a hub id as
    given; a CLoud directory's own ``base_model_name_or_path``; a plain HF directory's
    ``_name_or_path``, where those are hub ids; else None."""
    name = str(path_or_id)
    if is_hub_id(name):
        return name
    if storage.is_url(name):
        name = storage.local_copy(name)
    path = Path(name) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for key in ("base_model_name_or_path", "_name_or_path"):
        if is_hub_id(config.get(key)):
            return config[key]
    return None


def resolve_path(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; a ``gs://`` / ``s3://`` directory downloaded into the local cache
    (``cloud_jax.storage.local_copy``); otherwise a hub id fetched with huggingface_hub
    (safetensors only)."""
    if storage.is_url(path_or_id):
        url = storage.resolve(str(path_or_id))
        storage.check_path(url, "checkpoint")
        # Checked in the store: a directory without config.json (a training run's output_dir,
        # all its checkpoints) is refused before anything is downloaded, and named by its URL.
        if storage.isdir(url) and not storage.isfile(storage.join(url, "config.json")):
            raise _no_config_json(url, storage.exists(storage.join(url, "config.yaml"))
                                  or storage.isdir(storage.join(url, "checkpoints")))
        try:
            return Path(storage.local_copy(str(path_or_id)))
        except FileNotFoundError as err:
            raise CheckpointError(f"{path_or_id}: no checkpoint there ({err})") from None
    p = Path(path_or_id)
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; expected a checkpoint directory")
        return p
    if not is_hub_id(str(path_or_id)):
        raise CheckpointError(f"{path_or_id}: no such directory (nor a hub id, which reads "
                              "'owner/name' or 'name')")
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(str(path_or_id), allow_patterns=[
            "*.json", "model*.safetensors", "tokenizer*", "*.jinja"])
    except Exception as err:
        raise CheckpointError(
            f"{path_or_id}: not a local directory, and fetching it as a hub id failed: {err}"
        ) from None
    return Path(local)


def _hub_config_dir(repo_id: str) -> Path:
    """A local directory holding the ``config.json`` of the hub model ``repo_id`` (that file only,
    no weights)."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=["config.json"]))
    except Exception as err:
        raise CheckpointError(f"{repo_id}: fetching its config.json from the hub failed: "
                              f"{err}") from None


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a directory: an index's shards, or every *.safetensors file."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{index}: invalid JSON: {err}") from None
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: no weight_map of tensor names to file names (a "
                                  "truncated or foreign index?)") from None
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} names {len(missing)} shard(s) that are not in "
                                  f"{directory}: {missing[:3]} (an incomplete download?)")
        return [directory / f for f in files]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in directory.iterdir()
                   if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        hint = (f" It holds pickle-based weights ({', '.join(pickles)}), which are never loaded "
                "because unpickling can run arbitrary code; convert them to safetensors first."
                if pickles else "")
        raise CheckpointError(f"{directory}: no *.safetensors weights found.{hint}")
    return files


# A header this large is no real checkpoint's (a 70B model's is well under 1 MB) but could make a
# reader allocate without bound.
MAX_HEADER_BYTES = 100 << 20
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors_header(path: Path) -> dict:
    """Validates a safetensors file's header against the file before any tensor is read.

    Rejects an oversized or truncated header, offsets outside the data section, a tensor whose
    byte length disagrees with its dtype and shape, and overlapping tensors. Returns the header.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header claims {n} bytes (limit "
                                  f"{MAX_HEADER_BYTES}); the file is corrupt or hostile")
        if 8 + n > size:
            raise CheckpointError(f"{path}: safetensors header claims {n} bytes but the file has "
                                  f"{size - 8} after the length field; the file is truncated")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            nbytes = count * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry "
                                  f"({err!r})") from None
        if not 0 <= start <= end <= data_size:
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets [{start}, {end}] "
                                  f"outside the {data_size}-byte data section (truncated file?)")
        if end - start != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} is {dtype}{list(shape)} = {nbytes} "
                                  f"bytes but its data_offsets span {end - start}")
        spans.append((start, end, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap")
    return header


def iter_tensors(directory: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, numpy array) one tensor at a time (bf16 comes back as ml_dtypes.bfloat16)."""
    from safetensors import safe_open

    for f in safetensors_files(directory):
        check_safetensors_header(f)
        try:
            handle = safe_open(str(f), framework="numpy")
        except Exception as err:
            raise CheckpointError(f"{f}: not a readable safetensors file: {err}") from None
        with handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def load_params(directory: Path, cfg: ModelConfig, *, hf_prefix: str = "", with_head: bool,
                mesh: Optional[Mesh] = None, rules: Rules = TRAIN_RULES,
                rng: Optional[jax.Array] = None) -> Params:
    """Reads HF tensors into our parameter tree, each straight into its sharding.

    Without the reward head in the file (``with_head=False``) the head is initialised randomly from
    ``rng``. Any unmapped or missing tensor, or a shape mismatch, is an error naming it.
    """
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    table = weight_table(unrolled, with_head=with_head, hf_prefix=hf_prefix)
    shardings = param_shardings(unrolled, mesh, rules) if mesh is not None else None
    shapes = param_shapes(unrolled)
    pdtype = jnp.dtype(cfg.param_dtype)
    params: dict = {}
    unexpected = []
    # Some tied checkpoints store the LM head too, a copy of the embedding that transformers
    # ignores when tying: so does this loader.
    tied_copy = f"{hf_prefix}lm_head.weight" if cfg.tie_word_embeddings else None
    loaded: set[str] = set()
    for name, arr in iter_tensors(directory):
        if name in loaded:
            files = [f.name for f in safetensors_files(directory)]
            raise CheckpointError(
                f"{directory}: tensor {name} is stored twice, in more than one of its weight files "
                f"({', '.join(files)}); a stale file from an earlier save? Keep one set: "
                "model.safetensors, or the shards model.safetensors.index.json names")
        loaded.add(name)
        if name not in table:
            if name.endswith(_IGNORED_SUFFIXES) or name == tied_copy:
                continue
            unexpected.append(name)
            continue
        path, kind = table.pop(name)
        target = _get_path(shapes, path)
        try:
            value = _to_ours(arr, kind, target.shape).astype(pdtype)
        except CheckpointError as err:
            raise CheckpointError(f"{directory}: tensor {name}: {err}") from None
        if shardings is not None:
            sharding: NamedSharding = _get_path(shardings, path)
            placed = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
        else:
            placed = jnp.asarray(value)
        _set_path(params, path, placed)
    if unexpected:
        raise CheckpointError(
            f"{directory}: {len(unexpected)} tensors do not belong to a {cfg.family} model with "
            f"this config (e.g. {unexpected[:5]}); check the config or the checkpoint layout")
    if table:
        raise CheckpointError(f"{directory}: missing tensors: {sorted(table)[:10]}"
                              + (" ..." if len(table) > 10 else ""))
    if not with_head:
        params["reward_head"] = init_reward_head(
            unrolled, rng if rng is not None else jax.random.key(0), mesh, rules)
    if cfg.scan_layers:
        params = stack_layers(params, cfg.num_layers)
    return params


# ---------------------------------------------------------------------------------------------
# Writing


def hf_state_dict(params: Params, cfg: ModelConfig, *, with_head: bool,
                  hf_prefix: str = "") -> dict[str, np.ndarray]:
    """Our parameters as {HF name: numpy array in HF layout}, gathered to the host."""
    if "layers" in params and "layers_0" not in params:
        params = unstack_layers(params, cfg.num_layers)
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    out = {}
    for name, (path, kind) in weight_table(unrolled, with_head, hf_prefix).items():
        arr = np.asarray(jax.device_get(_get_path(params, path)))
        out[name] = np.ascontiguousarray(_to_hf(arr, kind))
    if cfg.family == "qwen2" and not cfg.attention_bias:
        # Every Qwen2 checkpoint has q/k/v biases (transformers and this loader expect them): a
        # model trained without them is written with zero biases, which compute the same.
        for i in range(cfg.num_layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                kernel = out[f"{hf_prefix}model.layers.{i}.self_attn.{proj}.weight"]
                out[f"{hf_prefix}model.layers.{i}.self_attn.{proj}.bias"] = np.zeros(
                    kernel.shape[0], kernel.dtype)
    return out


_WEIGHT_FILE = re.compile(r"model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors")


def write_safetensors(tensors: dict[str, np.ndarray], directory: Path,
                      max_shard_bytes: int = 4 << 30) -> None:
    """Writes ``model.safetensors``, or shards plus ``model.safetensors.index.json`` when large.
    The weight files of an earlier save into ``directory`` go first: a stale index (or shard)
    would otherwise be what a load reads."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.iterdir():
        if _WEIGHT_FILE.fullmatch(stale.name):
            stale.unlink(missing_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


@contextlib.contextmanager
def staged_export(directory: str | os.PathLike) -> Iterator[Path]:
    """A local directory to write an export of ``directory`` (a local path or a ``gs://`` /
    ``s3://`` URL) into: ``directory`` itself on disk, a temporary directory uploaded when the
    block ends without an error for a URL. An earlier export's ``config.json`` there is deleted
    first and the new one is written (uploaded) last, so a reader never finds a config beside
    weights it does not describe: an export stopped part-way leaves a directory without
    ``config.json``, which no load takes for a model, until a retry completes it. The weight
    files an earlier save left there that this one does not write are deleted, as
    :func:`write_safetensors` deletes them on disk (a stale index would be what a load reads);
    so is an earlier tokenizer's chat template (``chat_template.jinja``, transformers'
    ``additional_chat_templates/``): a tokenizer without one writes none, and transformers reads
    those files before the tokenizer's config."""
    directory = os.fspath(directory)
    storage.check_path(directory, "output directory")
    config = storage.join(directory, "config.json")
    if not storage.is_url(directory):
        storage.remove(config)
        _remove_chat_templates(directory)
        with storage.staged_output(directory) as local:
            yield Path(local)
        return
    local = tempfile.mkdtemp(prefix="cloud_jax-upload-")
    try:
        yield Path(local)
        written = set(os.listdir(local))
        storage.remove(config)
        _remove_chat_templates(directory)
        for name in storage.listdir(directory):
            if _WEIGHT_FILE.fullmatch(name) and name not in written:
                storage.remove(storage.join(directory, name))
        log.info("uploading to %s", directory)
        storage.upload_dir(local, directory, last=("config.json",))
    finally:
        shutil.rmtree(local, ignore_errors=True)


# What a tokenizer's save_pretrained writes its chat templates to (transformers 5), read on load
# before the template in tokenizer_config.json.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


def _remove_chat_templates(directory: str) -> None:
    storage.remove(storage.join(directory, CHAT_TEMPLATE_FILE))
    storage.remove_tree(storage.join(directory, CHAT_TEMPLATE_DIR))


def save_hf_backbone(params: Params, cfg: ModelConfig, directory: str | os.PathLike) -> Path:
    """A plain transformers ``*ForCausalLM`` directory (the reward head is not written)."""
    directory = Path(directory)
    config = hf_config_from_model_config(cfg)  # first: a model it refuses writes nothing
    write_safetensors(hf_state_dict(params, cfg, with_head=False), directory)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def save_cloud_reference(params: Params, cfg: ModelConfig, directory: str | os.PathLike, *,
                         base_model_name_or_path: Optional[str] = None,
                         feedback_method: str = "teacher",
                         critique_prefix: Optional[str] = None,
                         layout_version: Optional[int] = None) -> Path:
    """A CLoud reward model in the reference implementation's layout (see module docstring).

    ``critique_prefix``, when given, is the text the model was trained to start its critiques
    after; it is stored in config.json, where scoring finds it.
    """
    if feedback_method not in FEEDBACK_METHODS:
        raise ValueError(f"feedback_method={feedback_method!r}: expected 'vanilla' or 'teacher'")
    directory = Path(directory)
    base = hf_config_from_model_config(cfg)  # first: a model it refuses writes nothing
    write_safetensors(hf_state_dict(params, cfg, with_head=True, hf_prefix=REWARD_PREFIX),
                      directory)
    base_dir = directory / "base_config"
    base_dir.mkdir(parents=True, exist_ok=True)
    (base_dir / "config.json").write_text(json.dumps(base, indent=2))
    config = {
        "architectures": ["CLoudRewardModel"],
        "feedback_method": feedback_method,
        # The reference resolves this with AutoConfig. A hub id where one is known; otherwise the
        # copy beside the weights, named relative to the directory so the export can move.
        "base_model_name_or_path": ((base_model_name_or_path and
                                     base_model_name_of(base_model_name_or_path)) or LOCAL_BASE),
        "base_model_config": base,
        "torch_dtype": cfg.param_dtype,
    }
    if critique_prefix is not None:
        config["critique_prefix"] = critique_prefix
    if layout_version is not None:
        config["layout_version"] = layout_version
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def _no_config_json(directory: str, run_dir: bool) -> CheckpointError:
    hint = ""
    if run_dir:
        hint = (" (this is a training run's output_dir: load its final/ directory, or "
                "export a saved step with `python -m cloud_jax export-hf --checkpoint "
                f"{directory} --step N --out DIR`)")
    return CheckpointError(f"{directory}: no config.json; expected a Hugging Face or CLoud "
                           f"reward-model directory{hint}")


def read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise _no_config_json(str(directory), (directory / "config.yaml").exists()
                              or (directory / "checkpoints").is_dir())
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


# The reference's two kinds of CLoud checkpoint: "teacher" writes a critique before its reward,
# "vanilla" is a classic reward model.
FEEDBACK_METHODS = ("teacher", "vanilla")


def feedback_method_of(directory: Path, config: dict) -> str:
    """The ``feedback_method`` of a config.json: the reference's default ("vanilla") when a CLoud
    config leaves it out, "teacher" for a plain causal LM (a backbone to train critiques on)."""
    if not is_cloud_reference(config):
        return "teacher"
    method = config.get("feedback_method", "vanilla")
    if method not in FEEDBACK_METHODS:
        raise CheckpointError(f"{directory}/config.json: feedback_method={method!r}; expected "
                              f"one of {', '.join(FEEDBACK_METHODS)}")
    return method


def layout_version_of(directory: Path, config: dict) -> int:
    """How the model's rows were tokenized (data.config.LAYOUT_VERSIONS): as recorded;
    1 for a cloud_jax export from before the version was recorded (it has the inline backbone
    config but no version); the reference's own (2) for any other checkpoint."""
    from cloud_jax.data.config import LAYOUT_VERSIONS, REFERENCE_LAYOUT_VERSION

    if "layout_version" in config:
        version = config["layout_version"]
        # true == 1 in Python: a boolean is no version.
        if isinstance(version, bool) or version not in LAYOUT_VERSIONS:
            raise CheckpointError(f"{directory}/config.json: layout_version={version!r}; "
                                  f"expected one of {', '.join(map(str, LAYOUT_VERSIONS))}")
        return version
    if is_cloud_reference(config) and "base_model_config" in config:
        return 1
    return REFERENCE_LAYOUT_VERSION


def critique_settings_of(path_or_id: str | os.PathLike) -> Optional[tuple[str, int]]:
    """``(critique_prefix, layout_version)`` a CLoud export records when its model was trained to
    write critiques (its config.json has ``critique_prefix``: critique_sft and cloud exports);
    None for any other checkpoint (a plain HF model, a classic or reference export), or where no
    config.json can be read (loading the weights then says why). Reads config.json only."""
    name = str(path_or_id)
    try:
        if storage.is_url(name):
            text = storage.read_text(storage.join(storage.resolve(name), "config.json"))
            directory = Path(name)
        elif os.path.isdir(name):
            directory = Path(name)
            text = (directory / "config.json").read_text()
        elif is_hub_id(name):
            text = (_hub_config_dir(name) / "config.json").read_text()
            directory = Path(name)
        else:
            return None
        config = json.loads(text)
    except Exception:  # noqa: BLE001 - the weights' load reports an unreadable checkpoint
        return None
    if not isinstance(config, dict) or not is_cloud_reference(config):
        return None
    prefix = config.get("critique_prefix")
    if prefix is None:
        return None
    if not isinstance(prefix, str):
        raise CheckpointError(f"{directory}/config.json: critique_prefix must be a string, "
                              f"got {prefix!r}")
    return prefix, layout_version_of(directory, config)


def is_cloud_reference(config: dict) -> bool:
    return "feedback_method" in config or "base_model_name_or_path" in config


def cloud_base_config(directory: Path, config: dict) -> dict:
    """The backbone config of a reference-layout CLoud directory."""
    if isinstance(config.get("base_model_config"), dict):
        return config["base_model_config"]
    local = directory / "base_config" / "config.json"
    if local.exists():
        return read_config_json(local.parent)
    base = config.get("base_model_name_or_path")
    if base == LOCAL_BASE:
        raise CheckpointError(f"{directory}/config.json: base_model_name_or_path is "
                              f"{LOCAL_BASE!r} but {local} is missing; copy the whole directory")
    if not base:
        raise CheckpointError(f"{directory}/config.json: no base_model_config and no "
                              "base_model_name_or_path, so the backbone shape is unknown")
    try:
        if isinstance(base, str) and is_hub_id(base):
            # The config only: resolve_path would fetch the base model's weights too.
            return read_config_json(_hub_config_dir(base))
        return read_config_json(resolve_path(base))
    except CheckpointError as err:
        raise CheckpointError(
            f"{directory}: the backbone config comes from base_model_name_or_path={base!r}, "
            f"which could not be read ({err}). Put that model's config.json at "
            f"{directory}/base_config/config.json to load offline.") from None


def load_model_dir(path: str | os.PathLike, *, mesh: Optional[Mesh] = None,
                   rules: Rules = TRAIN_RULES, rng: Optional[jax.Array] = None,
                   fresh_head_log_level: int = logging.INFO,
                   **config_overrides) -> tuple[ModelConfig, Params, Path, dict]:
    """Reads a plain HF causal-LM directory or a reference-layout CLoud directory.

    Returns (model config, params, resolved directory, the raw config.json). A plain causal LM gets
    a freshly initialised reward head, logged at ``fresh_head_log_level`` (INFO for a training
    start, whose head is about to be trained; ``cloud_jax.load`` warns).
    """
    directory = resolve_path(path)
    raw = read_config_json(directory)
    if is_cloud_reference(raw):
        cfg = model_config_from_hf(cloud_base_config(directory, raw), **config_overrides)
        params = load_params(directory, cfg, hf_prefix=REWARD_PREFIX, with_head=True, mesh=mesh,
                             rules=rules)
    else:
        cfg = model_config_from_hf(raw, **config_overrides)
        log.log(fresh_head_log_level, "%s is a plain %s checkpoint with no reward head: the "
                "head starts from random init, so its rewards are random until it is trained",
                directory, cfg.family)
        params = load_params(directory, cfg, with_head=False, mesh=mesh, rules=rules, rng=rng)
    return cfg, params, directory, raw
