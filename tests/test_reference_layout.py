"""The reference CLoud checkpoint layout, both ways, and reward-head parity with PyTorch."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file as torch_save_file  # noqa: E402

import cloud_jax  # noqa: E402
from cloud_jax.errors import CheckpointError  # noqa: E402
from cloud_jax.model.config import ModelConfig  # noqa: E402

HIDDEN = 32


class RefRewardHead(torch.nn.Module):
    """The reference head: dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, hidden, dropout=0.0):
        super().__init__()
        self.dense = torch.nn.Linear(hidden, hidden)
        self.dropout = torch.nn.Dropout(dropout)
        self.out_proj = torch.nn.Linear(hidden, 1)

    def forward(self, h):
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(h)))))


class RefCLoud(torch.nn.Module):
    """Same module names as the reference ``CLoudRewardModel`` (so the same state-dict keys)."""

    def __init__(self, base_config):
        super().__init__()
        self.reward_base_model = transformers.LlamaForCausalLM(base_config)
        self.reward_head = RefRewardHead(base_config.hidden_size)


def _base_config():
    return transformers.LlamaConfig(
        vocab_size=61, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager")


def _write_reference_checkpoint(directory, base_config, seed=0):
    torch.manual_seed(seed)
    ref = RefCLoud(base_config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    torch_save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    base_dir = directory / "base"
    base_config.save_pretrained(base_dir)
    # What the reference writes: the CLoud config points at the base model instead of holding it.
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["CLoudRewardModel"], "feedback_method": "teacher",
        "base_model_name_or_path": str(base_dir)}))
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
    ref = RefCLoud(_base_config())
    ref.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")), strict=True)
    ids, mask = _ragged_batch(1)
    with torch.no_grad():
        h = ref.reward_base_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                  output_hidden_states=True).hidden_states[-1]
        want = ref.reward_head(h[torch.arange(3), torch.tensor(mask.sum(1) - 1)]).squeeze(-1)
    _, rewards = back.forward(ids, mask)
    np.testing.assert_allclose(np.asarray(rewards), want.numpy(), atol=1e-5, rtol=0)


def test_plain_hf_directory_loads_with_fresh_head(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_base_config()).save_pretrained(tmp_path)
    rm = cloud_jax.load(tmp_path)
    _, rewards = rm.forward(np.array([[1, 2, 3]]))
    assert rewards.shape == (1,) and np.isfinite(np.asarray(rewards)).all()


def test_pickle_checkpoint_is_refused_with_a_reason(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_base_config().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        cloud_jax.load(tmp_path)


def test_mismatched_checkpoint_names_the_tensors(tmp_path):
    _write_reference_checkpoint(tmp_path, _base_config())
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensors.*layers.2"):
        cloud_jax.load(tmp_path)


def test_forward_rejects_bad_input():
    rm = cloud_jax.from_config(ModelConfig(vocab_size=61, hidden_size=HIDDEN, intermediate_size=64,
                                           num_heads=4, num_kv_heads=2))
    with pytest.raises(ValueError, match="vocab"):
        rm.forward(np.array([[1, 99]]))
    with pytest.raises(ValueError, match="at least one attended"):
        rm.forward(np.array([[1, 2]]), np.array([[0, 0]]))


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
