"""The reference CLoud checkpoint layout, both ways, and reward-head parity with PyTorch; the
reference classes are the stand-in of tests/reference_cloud.py, which behaves as the real ones."""

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from reference_cloud import ReferenceCLoud, ReferenceCLoudPatched, ReferenceConfig  # noqa: E402

import cloud_jax  # noqa: E402
from cloud_jax.data.config import LAYOUT_VERSION  # noqa: E402
from cloud_jax.errors import CheckpointError  # noqa: E402
from cloud_jax.model.config import ModelConfig  # noqa: E402

HIDDEN = 32


def _base_config():
    return transformers.LlamaConfig(
        vocab_size=61, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager")


def _write_reference_checkpoint(directory, base_config, seed=0):
    """What the reference writes: its CLoud config points at the base model's directory."""
    base_dir = directory / "base"
    base_config.save_pretrained(base_dir)
    torch.manual_seed(seed)
    ref = ReferenceCLoudPatched(ReferenceConfig(feedback_method="teacher",
                                                base_model_name_or_path=str(base_dir))).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ref.save_pretrained(directory)
    return ref


def _ragged_batch(seed=0, padding_side="right"):
    rng = np.random.default_rng(seed)
    lengths = [9, 5, 7]
    ids = np.zeros((3, 9), np.int64)
    mask = np.zeros((3, 9), np.int64)
    for row, n in enumerate(lengths):
        sl = slice(0, n) if padding_side == "right" else slice(9 - n, 9)
        ids[row, sl] = rng.integers(1, 61, n)
        mask[row, sl] = 1
    return ids, mask


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_reward_matches_reference_head(tmp_path, padding_side):
    ref = _write_reference_checkpoint(tmp_path / "ckpt", _base_config())
    rm = cloud_jax.load(tmp_path / "ckpt")
    ids, mask = _ragged_batch(padding_side=padding_side)
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    with torch.no_grad():
        out = ref.reward_base_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                    position_ids=torch.tensor(positions),
                                    output_hidden_states=True)
        last = out.hidden_states[-1]
        # The reward position each padding style needs; the reference code itself gets one of
        # these two wrong, which is why we carry the index explicitly.
        idx = torch.tensor(np.where(mask, np.arange(9), -1).max(1))
        want = ref.reward_head(last[torch.arange(3), idx]).squeeze(-1).numpy()
        want_logits = out.logits.numpy()
    logits, rewards = rm.forward(ids, mask)
    np.testing.assert_allclose(np.asarray(rewards), want, atol=1e-5, rtol=0)
    assert np.abs(np.asarray(logits) - want_logits)[mask.astype(bool)].max() <= 1e-4


def test_export_import_round_trip_is_exact_and_loads_in_torch(tmp_path):
    cfg = ModelConfig(vocab_size=61, hidden_size=HIDDEN, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    rm = cloud_jax.from_config(cfg, seed=3)
    rm.params = jax.tree.map(lambda x: x + 0.1, rm.params)  # biases non-zero too
    rm.save_pretrained(tmp_path / "out", base_model_name_or_path="tiny-llama")
    back = cloud_jax.load(tmp_path / "out")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(rm.params),
                            jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(path))
    assert back.base_model_name_or_path == "tiny-llama"

    # The reference PyTorch module takes our file with strict key matching.
    from safetensors.torch import load_file
    ref = ReferenceCLoudPatched(ReferenceConfig(
        base_model_name_or_path=str(tmp_path / "out" / "base_config"))).eval()
    ref.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")), strict=True)
    ids, mask = _ragged_batch(1)
    with torch.no_grad():
        h = ref.reward_base_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                  output_hidden_states=True).hidden_states[-1]
        want = ref.reward_head(h[torch.arange(3), torch.tensor(mask.sum(1) - 1)]).squeeze(-1)
    _, rewards = back.forward(ids, mask)
    np.testing.assert_allclose(np.asarray(rewards), want.numpy(), atol=1e-5, rtol=0)


def test_saving_over_an_earlier_sharded_export_loads_the_new_weights(tmp_path):
    from cloud_jax.checkpoints import hf as hf_io

    cfg = ModelConfig(vocab_size=61, hidden_size=HIDDEN, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    old, new = (cloud_jax.from_config(cfg, seed=s) for s in (1, 2))
    out = tmp_path / "out"
    # The old model as a large one is written: shards and an index.
    hf_io.write_safetensors(hf_io.hf_state_dict(old.params, cfg, with_head=True,
                                                hf_prefix=hf_io.REWARD_PREFIX), out,
                            max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    new.save_pretrained(out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    back = cloud_jax.load(out)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_qwen2_model_without_qkv_bias_exports_zero_biases_and_reloads_the_same(tmp_path):
    """A qwen2-family model trained without attention_bias (a model section that leaves it
    out) exports as a Qwen2 checkpoint, which always has q/k/v biases: zeros, computing the same."""
    from cloud_jax.checkpoints.hf import save_hf_backbone

    cfg = ModelConfig(family="qwen2", vocab_size=61, hidden_size=HIDDEN, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2)
    rm = cloud_jax.from_config(cfg, seed=3)
    rm.params = jax.tree.map(lambda x: x + 0.1, rm.params)
    rm.save_pretrained(tmp_path / "out")
    back = cloud_jax.load(tmp_path / "out")
    ids, mask = _ragged_batch(1)
    for a, b in zip(rm.forward(ids, mask), back.forward(ids, mask)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    save_hf_backbone(rm.params, cfg, tmp_path / "hf")
    hf, info = transformers.Qwen2ForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids[:1])).logits.numpy()
    np.testing.assert_allclose(np.asarray(rm.forward(ids[:1])[0]), want, atol=1e-4, rtol=0)


def test_plain_hf_directory_loads_with_fresh_head(tmp_path, caplog):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_base_config()).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cloud_jax"):
        rm = cloud_jax.load(tmp_path)
    # A random head's rewards mean nothing: a warning, not an INFO line most users never see.
    assert any(r.levelno == logging.WARNING and "starts from random init"
               in r.getMessage() for r in caplog.records)
    _, rewards = rm.forward(np.array([[1, 2, 3]]))
    assert rewards.shape == (1,) and np.isfinite(np.asarray(rewards)).all()


def test_pickle_checkpoint_is_refused_with_a_reason(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_base_config().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        cloud_jax.load(tmp_path)


def test_a_local_path_that_does_not_exist_is_named_as_such_not_fetched(tmp_path, monkeypatch):
    # A path that cannot be a hub id (absolute, ./, three parts) is a missing directory: the
    # hub is not asked, and the error says so. A name of a hub id's form is fetched.
    import huggingface_hub

    asked = []

    def fetch(repo_id, **kwargs):
        asked.append(repo_id)
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    for missing in (tmp_path / "nope", "./no-such-model", "runs/a/final"):
        with pytest.raises(CheckpointError, match=r"no such directory \(nor a hub id"):
            cloud_jax.load(missing)
    assert asked == []
    with pytest.raises(CheckpointError, match="fetching it as a hub id failed: offline"):
        cloud_jax.load("owner/some-model")
    assert asked == ["owner/some-model"]


def test_mismatched_checkpoint_names_the_tensors(tmp_path):
    _write_reference_checkpoint(tmp_path, _base_config())
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensors.*layers.2"):
        cloud_jax.load(tmp_path)


def test_a_tensor_whose_size_the_config_does_not_give_is_named(tmp_path):
    """A config.json whose head counts disagree with the stored q/k/v/o tensors is a
    CheckpointError naming the tensor and both shapes, not numpy's reshape ValueError."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_base_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # the tensors hold 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.k_proj\.weight.*\(16, 32\)"):
        cloud_jax.load(tmp_path)


def test_a_config_json_without_a_shape_key_or_not_an_object_is_a_checkpoint_error(tmp_path):
    """Not a KeyError, AttributeError or JSONDecodeError traceback: the file and key are named."""
    base = _base_config().to_dict()
    del base["vocab_size"]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps(base))
    with pytest.raises(CheckpointError, match="has no vocab_size"):
        cloud_jax.load(tmp_path / "plain")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object, got list"):
        cloud_jax.load(tmp_path / "list")
    (tmp_path / "cloud" / "base_config").mkdir(parents=True)
    (tmp_path / "cloud" / "config.json").write_text(json.dumps(
        {"architectures": ["CLoudRewardModel"], "base_model_name_or_path": "base_config"}))
    (tmp_path / "cloud" / "base_config" / "config.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="base_config/config.json: invalid JSON"):
        cloud_jax.load(tmp_path / "cloud")


def test_a_broken_safetensors_index_is_a_checkpoint_error(tmp_path):
    """An index that is not JSON, has no weight_map, or names a shard that is not there (an
    interrupted download) is named in a CheckpointError, not a traceback."""
    from cloud_jax.checkpoints import hf as hf_io

    cfg = ModelConfig(vocab_size=61, hidden_size=HIDDEN, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    out = tmp_path / "out"
    cloud_jax.from_config(cfg, seed=1).save_pretrained(out)
    (out / "model.safetensors").unlink()
    hf_io.write_safetensors(hf_io.hf_state_dict(cloud_jax.from_config(cfg, seed=1).params, cfg,
                                                with_head=True, hf_prefix=hf_io.REWARD_PREFIX),
                            out, max_shard_bytes=20_000)
    index = out / "model.safetensors.index.json"
    good = index.read_text()
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "aside")
    with pytest.raises(CheckpointError, match=f"names 1 shard.*{shard.name}"):
        cloud_jax.load(out)
    (tmp_path / "aside").rename(shard)
    for text, message in ((good[:40], "invalid JSON"), ('{"metadata": {}}', "no weight_map")):
        index.write_text(text)
        with pytest.raises(CheckpointError, match=message):
            cloud_jax.load(out)


def test_a_tensor_stored_in_two_weight_files_is_named_as_a_duplicate(tmp_path):
    """A stale weight file beside model.safetensors holds the same tensors: the error says so,
    not that the model's own tensors do not belong to it."""
    import shutil

    cfg = ModelConfig(vocab_size=61, hidden_size=HIDDEN, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2)
    cloud_jax.from_config(cfg, seed=1).save_pretrained(tmp_path)
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="stored twice.*model-00001-of-00002.safetensors"):
        cloud_jax.load(tmp_path)


def test_forward_rejects_bad_input():
    rm = cloud_jax.from_config(ModelConfig(vocab_size=61, hidden_size=HIDDEN, intermediate_size=64,
                                           num_heads=4, num_kv_heads=2))
    with pytest.raises(ValueError, match="vocab"):
        rm.forward(np.array([[1, 99]]))
    with pytest.raises(ValueError, match="at least one attended"):
        rm.forward(np.array([[1, 2]]), np.array([[0, 0]]))
    # Ids that an int32 cast would change are refused, not truncated or wrapped.
    with pytest.raises(TypeError, match="integer token ids, got dtype float"):
        rm.forward(np.array([[1.7, 2.2]]))
    with pytest.raises(TypeError, match="integer token ids"):
        rm.forward(jax.numpy.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="vocab"):
        rm.forward(np.array([[2**32 + 5]]))
    with pytest.raises(ValueError, match="empty"):
        rm.forward(np.zeros((0, 4), np.int32))
    # Rows of different lengths (plain lists) are named as input_ids, with what to pass.
    with pytest.raises(ValueError, match=r"input_ids.*rows of different lengths.*pad.*"
                                         r"attention_mask"):
        rm.forward([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match=r"attention_mask.*rows of different lengths"):
        rm.forward([[1, 2, 3], [4, 5, 6]], [[1, 1, 1], [1, 1]])
    # A mask value other than 0 and 1 would shift positions (2) or be read as attended by the
    # reward index but not by the model (-1), or be cut to 0 by the int cast (0.5).
    for bad in ([[1, 2]], [[1, -1]], [[1.0, 0.5]]):
        with pytest.raises(ValueError, match="attention_mask.*0 or 1"):
            rm.forward(np.array([[1, 2]]), np.array(bad))
    np.testing.assert_array_equal(
        np.asarray(rm.forward(np.array([[1, 5]]), np.array([[True, True]]))[1]),
        np.asarray(rm.forward(np.array([[1, 5]]), np.array([[1.0, 1.0]]))[1]))
    # Integer ids of any width and a jax array are taken.
    want = np.asarray(rm.forward(np.array([[1, 5]], np.int32))[1])
    for ids in (np.array([[1, 5]], np.int64), np.array([[1, 5]], np.uint8),
                jax.numpy.array([[1, 5]])):
        np.testing.assert_array_equal(np.asarray(rm.forward(ids)[1]), want)


def _tiny_checkpoint(directory):
    cfg = ModelConfig(vocab_size=61, hidden_size=HIDDEN, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2)
    cloud_jax.from_config(cfg).save_pretrained(directory)
    return directory / "model.safetensors"


@pytest.mark.parametrize("corruption,needle", [
    ("truncate", "truncated|outside"),
    ("huge_header", "header claims"),
    ("bad_offsets", "bytes but its data_offsets span"),
    ("not_json", "not valid JSON"),
])
def test_hostile_safetensors_are_rejected(tmp_path, corruption, needle):
    path = _tiny_checkpoint(tmp_path)
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    if corruption == "truncate":
        raw = raw[: len(raw) - 100]
    elif corruption == "huge_header":
        raw[:8] = (1 << 40).to_bytes(8, "little")
    elif corruption == "bad_offsets":
        header = json.loads(raw[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start, end - 4]
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n
        text += b" " * (n - len(text))
        raw[8:8 + n] = text
    elif corruption == "not_json":
        raw[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=needle):
        cloud_jax.load(tmp_path)


def _tiny_model_config():
    return ModelConfig(vocab_size=61, hidden_size=HIDDEN, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2)


def _reference_rewards(ref, ids, mask):
    """The stand-in's own forward: right-padded rows, reward at sum(mask) - 1."""
    with torch.no_grad():
        rewards, _ = ref(torch.tensor(ids), torch.tensor(mask))
    return rewards.squeeze(-1).numpy()


def test_the_reference_class_needs_post_init_under_transformers_5(tmp_path):
    rm = cloud_jax.from_config(_tiny_model_config(), seed=1)
    rm.save_pretrained(tmp_path / "out")
    base = str(tmp_path / "out" / "base_config")
    # As published, the class never calls post_init(), and transformers 5 cannot load it.
    with pytest.raises(AttributeError, match="all_tied_weights_keys"):
        ReferenceCLoud.from_pretrained(tmp_path / "out", base_model_name_or_path=base)
    ReferenceCLoudPatched.from_pretrained(tmp_path / "out", base_model_name_or_path=base)


def test_a_moved_export_loads_in_cloud_jax_and_in_the_reference(tmp_path, monkeypatch):
    rm = cloud_jax.from_config(_tiny_model_config(), seed=2)
    rm.params = jax.tree.map(lambda x: x + 0.05, rm.params)
    rm.save_pretrained(tmp_path / "a" / "export")
    written = json.loads((tmp_path / "a" / "export" / "config.json").read_text())
    # No hub id is known: the backbone config beside the weights, named relative to them.
    assert written["base_model_name_or_path"] == "base_config"
    assert str(tmp_path) not in (tmp_path / "a" / "export" / "config.json").read_text()
    moved = tmp_path / "b" / "moved"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "a" / "export"), str(moved))
    shutil.rmtree(tmp_path / "a")

    back = cloud_jax.load(moved)
    ids, mask = _ragged_batch(2)
    _, want = rm.forward(ids, mask)
    _, got = back.forward(ids, mask)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert back.base_model_name_or_path is None and back.feedback_method == "teacher"

    # The reference resolves base_model_name_or_path against the working directory: point it at
    # the copy, or run from inside the directory.
    ref = ReferenceCLoudPatched.from_pretrained(
        moved, base_model_name_or_path=str(moved / "base_config")).eval()
    np.testing.assert_allclose(_reference_rewards(ref, ids, mask), np.asarray(want), atol=1e-5,
                               rtol=0)
    monkeypatch.chdir(moved)
    ref = ReferenceCLoudPatched.from_pretrained(moved).eval()
    np.testing.assert_allclose(_reference_rewards(ref, ids, mask), np.asarray(want), atol=1e-5,
                               rtol=0)
    assert ref.feedback_method == "teacher"


def test_a_checkpoint_the_reference_wrote_loads_with_its_kind_and_layout(tmp_path):
    base_dir = tmp_path / "base"
    _base_config().save_pretrained(base_dir)
    torch.manual_seed(4)
    # The reference's default kind is "vanilla" (a classic reward model).
    ref = ReferenceCLoudPatched(ReferenceConfig(base_model_name_or_path=str(base_dir))).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ref.save_pretrained(tmp_path / "ref")
    rm = cloud_jax.load(tmp_path / "ref")
    assert rm.feedback_method == "vanilla" and rm.is_classic and rm.layout_version == 2
    ids, mask = _ragged_batch(3)
    _, rewards = rm.forward(ids, mask)
    np.testing.assert_allclose(np.asarray(rewards), _reference_rewards(ref, ids, mask),
                               atol=1e-5, rtol=0)
    # Re-exported, it stays vanilla and names no local path.
    rm.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["feedback_method"] == "vanilla" and again["base_model_name_or_path"] == "base_config"


def test_an_export_from_before_layout_versions_is_scored_with_layout_1(tmp_path):
    rm = cloud_jax.from_config(_tiny_model_config())
    rm.save_pretrained(tmp_path / "new")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["layout_version"] == LAYOUT_VERSION == 3
    assert cloud_jax.load(tmp_path / "new").layout_version == 3
    del config["layout_version"]
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))
    assert cloud_jax.load(tmp_path / "new").layout_version == 1
    config["layout_version"] = 7
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layout_version=7"):
        cloud_jax.load(tmp_path / "new")
    config["layout_version"] = True  # not read as version 1
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layout_version=True"):
        cloud_jax.load(tmp_path / "new")


def test_the_hub_id_is_carried_and_local_paths_are_not_written(tmp_path, monkeypatch):
    from cloud_jax.checkpoints.hf import base_model_name_of, is_hub_id

    assert is_hub_id("meta-llama/Meta-Llama-3-8B") and is_hub_id("gpt2")
    assert not is_hub_id("/models/llama") and not is_hub_id("base_config")
    assert not is_hub_id("./llama") and not is_hub_id("a/b/c")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    assert not is_hub_id("runs/x")  # an existing local directory

    rm = cloud_jax.from_config(_tiny_model_config())
    rm.save_pretrained(tmp_path / "one", base_model_name_or_path="org/base-model")
    assert base_model_name_of(tmp_path / "one") == "org/base-model"
    back = cloud_jax.load(tmp_path / "one")
    assert back.base_model_name_or_path == "org/base-model"
    back.save_pretrained(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "config.json").read_text())[
        "base_model_name_or_path"] == "org/base-model"
    # A local directory given as the base: the hub id it records, else the local copy.
    rm.save_pretrained(tmp_path / "three", base_model_name_or_path=str(tmp_path / "one"))
    assert json.loads((tmp_path / "three" / "config.json").read_text())[
        "base_model_name_or_path"] == "org/base-model"
    rm.save_pretrained(tmp_path / "four", base_model_name_or_path=str(tmp_path / "runs" / "x"))
    assert json.loads((tmp_path / "four" / "config.json").read_text())[
        "base_model_name_or_path"] == "base_config"


def test_a_model_that_is_no_checkpoint_of_its_family_is_not_exported(tmp_path):
    """A q/k/v bias outside Qwen2, or a sliding window outside Mistral, computes here but would
    load as another model from a Hugging Face export: the export refuses it, naming the key."""
    from cloud_jax.errors import CheckpointError
    from cloud_jax.model.config import ModelConfig

    for extra, key in ((dict(attention_bias=True), "attention_bias=true with model.family=llama"),
                       (dict(family="qwen2", sliding_window=4), "sliding_window=4"),
                       (dict(family="mistral", attention_bias=True), "family=mistral")):
        cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                          num_heads=2, num_kv_heads=1, **extra)
        with pytest.raises(CheckpointError, match=key):
            cloud_jax.from_config(cfg, seed=0).save_pretrained(tmp_path / key.split("=")[0])
        assert not (tmp_path / key.split("=")[0] / "model.safetensors").exists()


def test_an_export_with_rope_scaling_names_it_for_transformers_4_and_5(tmp_path):
    """transformers 4.x (the reference code's) reads RoPE scaling from rope_scaling, 5.x from
    rope_parameters: an export writes both, and loads back with the same scaling."""
    import transformers

    from cloud_jax.model.config import RopeScalingConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, rope_theta=500000.0,
                      max_position_embeddings=16384,
                      rope_scaling=RopeScalingConfig(type="llama3", factor=8.0))
    out = cloud_jax.from_config(cfg, seed=0).save_pretrained(tmp_path / "m")
    base = json.loads((out / "base_config" / "config.json").read_text())
    assert base["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}
    assert base["rope_theta"] == 500000.0
    assert transformers.LlamaConfig(**base).rope_parameters["rope_type"] == "llama3"
    assert cloud_jax.load(out).config.rope_scaling == cfg.rope_scaling


def test_the_hub_id_a_plain_hf_directory_records_reaches_a_stage_s_export(tmp_path):
    """docs/COMPATIBILITY.md: an export names the hub id the model descends from, read from the
    ``_name_or_path`` a plain Hugging Face directory recorded (transformers 4 wrote it) when
    that directory is the run's init_from; a local path there is never written."""
    from cloud_jax.checkpoints.hf import base_model_name_of
    from cloud_jax.training.config import load_config
    from cloud_jax.training.loop import export_params

    root = Path(__file__).resolve().parents[1]
    rm = cloud_jax.from_config(_tiny_model_config())
    backbone = _base_config().to_dict()
    for name, recorded, hub_id in (("hub", "org/base-model", "org/base-model"),
                                   ("local", str(tmp_path / "elsewhere"), None)):
        init = tmp_path / name
        init.mkdir()
        (init / "config.json").write_text(json.dumps({**backbone, "_name_or_path": recorded}))
        assert base_model_name_of(init) == hub_id
        cfg = load_config(root / "configs/tiny_cpu_critique_sft.yaml",
                          [f"output_dir={tmp_path / 'run'}", f"init_from={init}"])
        export_params(cfg, rm.config, rm.params, None, str(tmp_path / f"export_{name}"))
        written = json.loads((tmp_path / f"export_{name}" / "config.json").read_text())
        assert written["base_model_name_or_path"] == (hub_id or "base_config")


def test_a_hub_base_model_is_asked_for_its_config_json_only(tmp_path, monkeypatch):
    """A reference checkpoint names its backbone by hub id and carries no copy of its config (the
    authors' own): loading it fetches that model's config.json, not its weights too (16 GB for an
    8B base, read for nothing)."""
    import fnmatch

    import huggingface_hub

    _write_reference_checkpoint(tmp_path / "ckpt", _base_config())
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["base_model_name_or_path"] = "owner/base-model"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hub").mkdir()
    shutil.copy(tmp_path / "ckpt" / "base" / "config.json", tmp_path / "hub" / "config.json")
    asked = []

    def snapshot(repo_id, allow_patterns=None, **kwargs):
        asked.append((repo_id, allow_patterns))
        return str(tmp_path / "hub")

    def one_file(repo_id, filename, **kwargs):
        asked.append((repo_id, [filename]))
        return str(tmp_path / "hub" / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", one_file)
    rm = cloud_jax.load(tmp_path / "ckpt")
    assert rm.config.num_layers == 2 and asked and all(repo == "owner/base-model"
                                                       for repo, _ in asked)
    for _, patterns in asked:
        assert patterns is not None and not any(
            fnmatch.fnmatch(name, pattern) for pattern in patterns
            for name in ("model.safetensors", "model-00001-of-00004.safetensors")), asked


def test_a_hub_model_is_fetched_without_its_mistral_format_weights(tmp_path, monkeypatch):
    """Mistral's repositories hold their weights twice: the transformers shards and
    consolidated.safetensors (mistral-inference's names, never read here). Only the first are
    fetched: the second doubles the download (14.5 GB more for Mistral-7B-Instruct-v0.3)."""
    import fnmatch

    import huggingface_hub

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_base_config()).save_pretrained(tmp_path / "hub")
    asked = []

    def snapshot(repo_id, allow_patterns=None, **kwargs):
        asked.append(allow_patterns)
        return str(tmp_path / "hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert cloud_jax.load("owner/model").config.num_layers == 2
    patterns = asked[0]
    for name in ("model.safetensors", "model-00001-of-00003.safetensors",
                 "model.safetensors.index.json", "config.json", "tokenizer.json"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), (name, patterns)
    assert not any(fnmatch.fnmatch("consolidated.safetensors", p) for p in patterns), patterns
