"""``python -m cloud_jax demo`` (make demo-smollm2), with a tiny random model in SmolLM2's place."""

import pytest

import cloud_jax
from cloud_jax.checkpoints import gguf
from cloud_jax.cli import demo
from cloud_jax.data.tokenizer import byte_tokenizer
from cloud_jax.training.config import ModelConfig


def test_demo_marks_every_critique_cut_at_the_token_budget(tmp_path, monkeypatch, capsys):
    cfg = ModelConfig(family="llama", vocab_size=272, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, max_position_embeddings=256,
                      param_dtype="float32", dtype="float32")
    model_dir = cloud_jax.from_config(cfg, seed=0, tokenizer=byte_tokenizer()).save_pretrained(
        tmp_path / "model")
    monkeypatch.setattr(gguf, "find_smollm2_gguf", lambda: tmp_path / "unused.gguf")
    monkeypatch.setattr(gguf, "convert_gguf_to_hf", lambda src, out: model_dir)
    # Two new tokens: a random model's critiques all stop at the budget, greedy and sampled.
    assert demo.main(["--output-dir", str(tmp_path / "out"), "--max-critique-tokens", "2",
                      "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("[demo] greedy critique (hit the token budget):") == len(demo.EXAMPLES)
    assert out.count("[demo] a sampled critique (hit the token budget):") == len(demo.EXAMPLES)


@pytest.mark.parametrize("flags", [["--num-samples", "0"], ["--max-critique-tokens", "-1"]])
def test_demo_refuses_bad_flags_before_loading_the_model(flags, monkeypatch, capsys):
    def no_model():
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(gguf, "find_smollm2_gguf", no_model)
    with pytest.raises(SystemExit) as exit_:
        demo.main(flags)
    assert exit_.value.code == 2
    assert flags[0] in capsys.readouterr().err
