"""Backbone parity with transformers' PyTorch Llama / Qwen2 / Mistral on random tiny configs (fp32)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from cloud_jax.checkpoints.hf import load_model_dir  # noqa: E402
from cloud_jax.model import CLoudModel, last_attended_index  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, attn_implementation="eager")

CASES = {
    "llama_gqa_rope_scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama_linear_rope_head_dim": ("LlamaConfig", "LlamaForCausalLM", dict(
        head_dim=16, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                      "factor": 2.0})),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral_sliding_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
}


# Shapes the cases above leave out, checked by one test each way (load, export).
MORE_CASES = {
    "qwen2_untied_head_dim_mqa": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        head_dim=16, num_key_value_heads=1, tie_word_embeddings=False)),
    "mistral_head_dim_window": ("MistralConfig", "MistralForCausalLM", dict(
        head_dim=16, sliding_window=5)),
    "llama_mha_eps_untied_theta": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=6, rms_norm_eps=0.25,
        rope_parameters={"rope_type": "default", "rope_theta": 30.0})),
}


def _random_hf_model(case, seed=0):
    config_cls, model_cls, extra = {**CASES, **MORE_CASES}[case]
    cfg = getattr(transformers, config_cls)(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # far from the init so that every weight matters, norms included
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if p.ndim == 1 and p.shape[0] ==
                                                    BASE["hidden_size"] else 0.0))
    return model


def _batch(padding_side, seed=1):
    rng = np.random.default_rng(seed)
    lengths = [12, 7, 10]
    t = max(lengths)
    ids = np.zeros((3, t), np.int64)
    mask = np.zeros((3, t), np.int64)
    for row, n in enumerate(lengths):
        sl = slice(0, n) if padding_side == "right" else slice(t - n, t)
        ids[row, sl] = rng.integers(1, BASE["vocab_size"], n)
        mask[row, sl] = 1
    return ids, mask


def _both_logits(hf, cfg, params, padding_side):
    """(ours, transformers', mask, our model output) over :func:`_batch`'s rows."""
    ids, mask = _batch(padding_side)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()
    out = CLoudModel(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                reward_index_b=last_attended_index(jnp.asarray(mask)))
    return np.asarray(out.logits), ref, mask, out


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, padding_side, tmp_path):
    hf = _random_hf_model(case)
    hf.save_pretrained(tmp_path)
    cfg, params, _, _ = load_model_dir(tmp_path)
    ours, ref, mask, out = _both_logits(hf, cfg, params, padding_side)
    attended = mask.astype(bool)
    assert np.abs(ref).max() > 1.0, "logits too small for the comparison to mean much"
    np.testing.assert_array_less(np.abs(ours - ref)[attended].max(), 1e-4)
    assert np.isfinite(np.asarray(out.rewards)).all()


def test_what_this_backbone_does_not_compute_is_refused_not_loaded(tmp_path):
    """A config whose model this backbone would compute differently (another MLP activation, a
    llama with biases on o_proj / the MLP) is refused, naming the key."""
    from cloud_jax.errors import CheckpointError

    for extra, key in ((dict(hidden_act="gelu"), "hidden_act='gelu'"),
                       (dict(attention_bias=True), "attention_bias=true"),
                       (dict(mlp_bias=True), "mlp_bias=true")):
        cfg = transformers.LlamaConfig(**{**BASE, **extra})
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / key)
        with pytest.raises(CheckpointError, match=key):
            load_model_dir(tmp_path / key)


def test_several_eos_ids_survive_an_export_and_a_stored_tied_head_is_ignored(tmp_path):
    """Llama-3.1-Instruct lists three EOS ids (<|eot_id|> ends a turn): a backbone export keeps
    the list. A tied checkpoint that also stores lm_head.weight loads, as in transformers."""
    import json

    from safetensors.torch import load_file, save_file

    from cloud_jax.checkpoints.hf import save_hf_backbone

    cfg = transformers.LlamaConfig(**{**BASE, "eos_token_id": [5, 6, 7],
                                      "tie_word_embeddings": True})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    weights = load_file(str(tmp_path / "src" / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    model_cfg, params, _, _ = load_model_dir(tmp_path / "src")
    assert (model_cfg.eos_token_id, model_cfg.eos_token_ids) == (5, (5, 6, 7))
    save_hf_backbone(params, model_cfg, tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["eos_token_id"] == [5, 6, 7]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.generation_config.eos_token_id == [5, 6, 7]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_keys_a_config_json_leaves_out_take_transformers_defaults_for_its_family(family):
    """A config.json without max_position_embeddings or (Mistral) sliding_window loads as
    transformers reads it: each family's own default (it was 2048 and no window for every
    family). A window given as null stays none."""
    from cloud_jax.checkpoints.hf import model_config_from_hf

    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config}[family]
    # 32 query heads: Qwen2's default of key/value heads is 32 (Mistral's 8).
    hf = {"model_type": family, "vocab_size": 64, "hidden_size": 64, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 32}
    theirs = config_class(**{k: v for k, v in hf.items() if k != "model_type"})
    ours = model_config_from_hf(hf)
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.num_kv_heads == theirs.num_key_value_heads
    assert ours.sliding_window == (theirs.sliding_window if family == "mistral" else None)
    if family == "mistral":
        assert model_config_from_hf({**hf, "sliding_window": None}).sliding_window is None


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_a_config_json_without_num_key_value_heads_loads_as_transformers_reads_it(family,
                                                                                   tmp_path):
    """MistralConfig's num_key_value_heads defaults to 8 and Qwen2Config's to 32, not to the
    number of query heads (LlamaConfig's): a config.json that leaves the key out is read with
    its family's default, and the model computes what transformers computes from it."""
    import json

    config_class, model_class = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    heads = {"mistral": 32, "qwen2": 64}[family]  # more query heads than either default
    shape = dict(vocab_size=97, hidden_size=2 * heads, intermediate_size=80, num_hidden_layers=1,
                 num_attention_heads=heads, max_position_embeddings=64, rms_norm_eps=1e-5,
                 attn_implementation="eager")
    if family == "mistral":
        shape["sliding_window"] = None
    config = config_class(**shape)
    assert config.num_key_value_heads == {"mistral": 8, "qwen2": 32}[family]
    torch.manual_seed(0)
    hf = model_class(config).eval()
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    del written["num_key_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(written))
    assert config_class.from_pretrained(tmp_path).num_key_value_heads == config.num_key_value_heads

    cfg, params, _, _ = load_model_dir(tmp_path)
    assert cfg.num_kv_heads == config.num_key_value_heads
    ours, ref, mask, _ = _both_logits(hf, cfg, params, "left")
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4


def _transformers_logits(model, ids, mask):
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_decode_step_by_step_matches_transformers(case, tmp_path):
    """Left-padded rows: a 5-token prefill into the KV cache, then one token a step (past the
    sliding window, llama3-scaled RoPE at each row's own positions) gives transformers' logits."""
    from cloud_jax.model import init_cache

    hf = _random_hf_model(case)
    hf.save_pretrained(tmp_path)
    cfg, params, _, _ = load_model_dir(tmp_path)
    ids, mask = _batch("left")
    ref = _transformers_logits(hf, ids, mask)
    model = CLoudModel(cfg)
    prefill = 5
    out = model.apply({"params": params}, jnp.asarray(ids[:, :prefill]),
                      jnp.asarray(mask[:, :prefill]), cache=init_cache(cfg, ids.shape[0], 16))
    got, cache = [np.asarray(out.logits)], out.cache
    for t in range(prefill, ids.shape[1]):
        out = model.apply({"params": params}, jnp.asarray(ids[:, t:t + 1]),
                          jnp.asarray(mask[:, t:t + 1]), cache=cache)
        got.append(np.asarray(out.logits))
        cache = out.cache
    attended = mask.astype(bool)
    assert np.abs(np.concatenate(got, axis=1) - ref)[attended].max() < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_bfloat16_logits_stay_near_transformers(case, tmp_path):
    """bfloat16 weights and compute: within a few times transformers' own bfloat16 error of its
    float32 logits."""
    import copy

    hf = _random_hf_model(case)
    hf.save_pretrained(tmp_path)
    cfg, params, _, _ = load_model_dir(tmp_path, param_dtype="bfloat16", dtype="bfloat16")
    ids, mask = _batch("left")
    attended = mask.astype(bool)
    ref = _transformers_logits(hf, ids, mask)
    theirs = np.abs(_transformers_logits(copy.deepcopy(hf).to(torch.bfloat16), ids, mask)
                    - ref)[attended].max()
    out = CLoudModel(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                reward_index_b=last_attended_index(jnp.asarray(mask)))
    assert out.logits.dtype == jnp.float32
    ours = np.abs(np.asarray(out.logits) - ref)[attended].max()
    assert 0 < ours < max(3 * theirs, 0.05), (ours, theirs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_hf_round_trip_loads_in_transformers_with_the_same_logits_and_head(case, tmp_path,
                                                                                 capsys):
    """export-hf of a cloud_jax reward model: --format backbone loads in transformers with no
    missing or unexpected keys and computes the logits the model computes; --format cloud
    reloads with every parameter, the reward head's included, bit for bit."""
    import jax

    import cloud_jax
    from cloud_jax.__main__ import main

    _random_hf_model(case).save_pretrained(tmp_path / "hf")
    rm = cloud_jax.load(tmp_path / "hf")
    rm.params = {**rm.params, "reward_head": jax.tree.map(lambda x: x + 0.3,
                                                          rm.params["reward_head"])}
    rm.save_pretrained(tmp_path / "cloud")
    for fmt in ("cloud", "backbone"):
        assert main(["export-hf", "--checkpoint", str(tmp_path / "cloud"), "--out",
                     str(tmp_path / fmt / "out"), "--format", fmt]) == 0
    capsys.readouterr()
    back = cloud_jax.load(tmp_path / "cloud" / "out")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(rm.params),
                            jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(path))
    model_class = getattr(transformers, CASES[case][1])
    hf, info = model_class.from_pretrained(tmp_path / "backbone" / "out",
                                           output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(hf.config).__name__ == CASES[case][0]
    ids, mask = _batch("left")
    ours = np.asarray(rm.forward(ids, mask)[0])
    assert np.abs(_transformers_logits(hf.eval(), ids, mask) - ours)[mask.astype(bool)].max() < 1e-4


@pytest.mark.parametrize("layout", ["standard", "feature_major"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_critiques_are_the_tokens_transformers_generates(case, layout, tmp_path):
    """Left-padded prompts of three lengths, greedy: the sampling loop (either decode layout)
    writes the tokens transformers' generate writes, up to a stop token (not counted), 24 steps
    at most (far past Mistral's window of 4)."""
    from cloud_jax.sampling import sample
    from cloud_jax.sampling.loop import pad_prefixes

    hf = _random_hf_model(case)
    hf.save_pretrained(tmp_path)
    cfg, params, _, _ = load_model_dir(tmp_path)
    rng = np.random.default_rng(3)
    prefixes = [[int(t) for t in rng.integers(3, BASE["vocab_size"], n)] for n in (9, 4, 6)]
    steps, stop = 24, 1
    ids, mask = pad_prefixes(prefixes, 9, 0)
    with torch.no_grad():
        want = hf.generate(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                           attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
                           max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, 9:].numpy()
    out = sample(cfg, params, prefixes, max_new_tokens=steps, stop_ids=(stop,),
                 decode_layout=layout, buckets=[9])
    lengths = np.asarray(out.lengths).reshape(-1)
    for row, n in enumerate(lengths):
        ends = np.flatnonzero(want[row] == stop)
        assert n == (ends[0] if len(ends) else steps), (row, n, want[row])
        np.testing.assert_array_equal(np.asarray(out.tokens)[row, 0, :n], want[row, :n])


@pytest.mark.parametrize("block", [4, 5])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_blockwise_attention_with_a_sliding_window_matches_transformers(block, padding_side,
                                                                        tmp_path):
    """Causal attention in query blocks (model.causal_block_size) under Mistral's window of 4
    over rows of up to 12 tokens: transformers' logits."""
    hf = _random_hf_model("mistral_sliding_window")
    hf.save_pretrained(tmp_path)
    cfg, params, _, _ = load_model_dir(tmp_path, causal_block_size=block)
    ids, mask = _batch(padding_side)
    out = CLoudModel(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                reward_index_b=last_attended_index(jnp.asarray(mask)))
    diff = np.abs(np.asarray(out.logits) - _transformers_logits(hf, ids, mask))
    assert diff[mask.astype(bool)].max() < 1e-4


def _llama_dict(**extra):
    return {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 4096,
            **extra}


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "longrope"])
def test_an_unsupported_rope_type_is_refused_naming_the_key_it_was_read_from(key, rope_type):
    """transformers 5 writes RoPE settings as rope_parameters.rope_type, 4.x as
    rope_scaling.type: the error names the key the file holds, and the types this backbone
    computes."""
    from cloud_jax.checkpoints.hf import model_config_from_hf
    from cloud_jax.errors import CheckpointError

    type_key = "rope_type" if key == "rope_parameters" else "type"
    hf = _llama_dict(**{key: {type_key: rope_type, "factor": 2.0}})
    with pytest.raises(CheckpointError,
                       match=rf"{key}\.{type_key}='{rope_type}'.*default, linear, llama3"):
        model_config_from_hf(hf)


def test_rope_scaling_keys_a_file_leaves_out_are_read_as_transformers_reads_them():
    """llama3 scaling without original_max_position_embeddings takes the model's
    max_position_embeddings, as transformers 5 fills it in (it was 8192 here, whatever the
    model); a key transformers requires (llama3's factors, linear's factor) is refused by name
    rather than made up."""
    import copy

    from cloud_jax.checkpoints.hf import model_config_from_hf
    from cloud_jax.errors import CheckpointError

    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    hf = _llama_dict(rope_parameters=llama3)
    # Copies: transformers fills the missing key into the dict it is given.
    theirs = transformers.LlamaConfig(**copy.deepcopy(
        {k: v for k, v in hf.items() if k != "model_type"}))
    ours = model_config_from_hf(copy.deepcopy(hf)).rope_scaling
    assert (ours.original_max_position_embeddings
            == theirs.rope_parameters["original_max_position_embeddings"] == 4096)
    for rope, missing in ((dict(llama3, original_max_position_embeddings=512), "low_freq_factor"),
                          (dict(llama3, original_max_position_embeddings=512), "high_freq_factor"),
                          (dict(llama3, original_max_position_embeddings=512), "factor"),
                          ({"type": "linear"}, "factor")):
        rope = {k: v for k, v in rope.items() if k != missing}
        with pytest.raises(KeyError):  # transformers refuses it too
            transformers.LlamaConfig(rope_parameters=dict(rope))
        with pytest.raises(CheckpointError, match=rf"rope_scaling has no {missing}\b"):
            model_config_from_hf(_llama_dict(rope_scaling=rope))


@pytest.mark.parametrize("case", sorted(MORE_CASES))
def test_more_shapes_load_and_export_with_transformers_logits(case, tmp_path):
    """A head size other than hidden / heads on Qwen2 and Mistral, one key/value head, as many
    key/value heads as query heads, an untied Qwen2, a large rms_norm_eps and a small RoPE base:
    loaded, the logits are transformers'; exported as a backbone, transformers loads it with no
    missing or unexpected keys and computes the same logits."""
    from cloud_jax.checkpoints.hf import save_hf_backbone

    hf = _random_hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    cfg, params, _, _ = load_model_dir(tmp_path / "hf")
    ours, ref, mask, _ = _both_logits(hf, cfg, params, "left")
    assert np.abs(ref).max() > 1.0
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4
    save_hf_backbone(params, cfg, tmp_path / "out")
    model_class = getattr(transformers, MORE_CASES[case][1])
    back, info = model_class.from_pretrained(tmp_path / "out", output_loading_info=True,
                                             attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, _ = _batch("left")
    assert np.abs(_transformers_logits(back.eval(), ids, mask) - ref)[mask.astype(bool)].max() < 1e-4
