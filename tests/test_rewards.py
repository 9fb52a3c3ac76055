"""The in-process reward function: one float per completion, in order, equal to ``rm.score``;
chat-format inputs; and the function inside a real TRL ``GRPOTrainer`` loop."""

import inspect

import numpy as np
import pytest
from model_helpers import tiny_reward_model

from cloud_jax.data.tokenizer import byte_tokenizer
from cloud_jax.rewards import CLoudReward, cloud_reward

PROMPTS = ["What is 2+2?", "Name a colour.", "Hi"]
COMPLETIONS = ["4", "Blue, like the sky.", "Hello there!"]
SETTINGS = dict(num_samples=2, temperature=0.9, max_critique_tokens=5, seed=3)


@pytest.fixture(scope="module")
def rm():
    return tiny_reward_model(7)


def test_one_float_per_completion_in_order_equal_to_score(rm):
    fn = cloud_reward(rm, **SETTINGS)
    # Repeated prompts (GRPO's groups) and extra trainer kwargs.
    prompts, completions = PROMPTS + PROMPTS[:1], COMPLETIONS + ["five"]
    rewards = fn(prompts=prompts, completions=completions, answer=["4"] * 4, trainer_state=None)
    assert isinstance(rewards, list) and all(type(r) is float for r in rewards)
    want = rm.score(prompts, completions, **SETTINGS)
    np.testing.assert_allclose(rewards, want.rewards, atol=1e-6, rtol=0)
    assert fn.last_critiques == want.critiques
    # Reversed order in, reversed rewards out.
    back = fn(prompts[::-1], completions[::-1])
    np.testing.assert_allclose(back, rewards[::-1], atol=1e-6, rtol=0)


def test_chat_messages_are_read_as_their_texts(rm, caplog):
    import cloud_jax.rewards

    cloud_jax.rewards._warned.clear()  # warned once per process: this test may not be first
    fn = CLoudReward(rm, **SETTINGS)
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]
               for p in PROMPTS]
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    np.testing.assert_allclose(fn(prompts, completions), fn(PROMPTS, COMPLETIONS), atol=1e-6,
                               rtol=0)
    # The system message is left out, and the log says so.
    assert "system message is not scored" in caplog.text
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        fn([["not a message"]], COMPLETIONS[:1])
    with pytest.raises(ValueError, match="1 prompts for 2 completions"):
        fn(PROMPTS[:1], COMPLETIONS[:2])
    with pytest.raises(ValueError, match=r"completions\[0\]"):
        fn(PROMPTS[:1], [[{"role": "user", "content": "x"}]])
    assert fn.last_critiques  # from the last call that scored
    assert fn([], []) == [] and fn.last_critiques == [] and fn.last_result is None


def test_a_completion_with_more_than_its_assistant_message_is_refused(rm):
    # TRL's tool loop appends the tool's result (and the next assistant turn) to a completion:
    # scoring only the first assistant message would drop the rest without a word.
    fn = CLoudReward(rm, **SETTINGS)
    call = {"role": "assistant", "content": "Let me compute."}
    for completion in ([call, {"role": "tool", "name": "calc", "content": "4"}],
                       [{"role": "user", "content": "and?"}, call], [call, "4"]):
        with pytest.raises(ValueError, match=r"completions\[0\]: .*one assistant message"):
            fn(PROMPTS[:1], [completion])
    # One assistant message, with further keys (TRL's parsed responses), is its content.
    np.testing.assert_allclose(fn(PROMPTS[:1], [[dict(call, thinking="hmm")]]),
                               fn(PROMPTS[:1], [call["content"]]), atol=1e-6, rtol=0)


def test_settings_are_checked_when_built_and_array_columns_are_read(rm):
    # A misspelt or bad setting fails at construction (before any loading), not at the
    # trainer's first reward call.
    with pytest.raises(TypeError, match="num_sample"):
        CLoudReward("/no/such/model", num_sample=4)
    with pytest.raises(ValueError, match="temperature"):
        cloud_reward(rm, temperature=-1.0)
    # A setting of the wrong kind too: a float count failed as a TypeError inside the sampler at
    # the first call, and classic="no" (truthy) scored without critiques.
    for bad, match in ((dict(num_samples=2.0), "num_samples=2.0: must be a whole number"),
                       (dict(batch_size=2.5), "batch_size"),
                       (dict(max_critique_tokens=1.5), "max_critique_tokens"),
                       (dict(max_length=0), "max_length=0: must be >= 1"),
                       (dict(classic="no"), "classic='no'")):
        with pytest.raises(ValueError, match=match):
            CLoudReward(rm, **bad)
    CLoudReward(rm, num_samples=np.int64(2), classic=np.bool_(False))  # numpy scalars are fine
    # Prompts and completions given as numpy arrays (a dataset column) score as lists do.
    fn = CLoudReward(rm, **SETTINGS)
    np.testing.assert_allclose(fn(np.array(PROMPTS), np.array(COMPLETIONS)),
                               fn(PROMPTS, COMPLETIONS), atol=1e-6, rtol=0)
    assert fn(np.array([], str), np.array([], str)) == []


def test_the_signature_trainers_call():
    # TRL's GRPOTrainer calls reward_func(prompts=..., completions=..., completion_ids=...,
    # trainer_state=..., **dataset columns); tunix's GRPO learner calls
    # reward_fn(prompts=..., completions=..., **dataset columns). Both by keyword.
    params = inspect.signature(CLoudReward.__call__).parameters
    assert list(params)[1:3] == ["prompts", "completions"]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@pytest.mark.slow
def test_inside_a_trl_grpo_training_loop(rm, tmp_path):
    torch = pytest.importorskip("torch")
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id))
    calls = []

    class Recording(CLoudReward):
        def __call__(self, prompts, completions, **kwargs):
            rewards = super().__call__(prompts, completions, **kwargs)
            calls.append((list(prompts), list(completions), rewards))
            return rewards

    reward = Recording(rm, max_critique_tokens=4)
    config = trl.GRPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, num_generations=2,
        max_completion_length=6, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, bf16=False, learning_rate=1e-3, temperature=1.0, seed=0)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=reward, args=config,
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}),
                              processing_class=tok)
    trainer.train()
    assert calls, "the trainer never called the reward function"
    for prompts, completions, rewards in calls:
        assert len(rewards) == len(completions) == len(prompts)
        want = rm.score([p if isinstance(p, str) else p[-1]["content"] for p in prompts],
                        completions, max_critique_tokens=4)
        np.testing.assert_allclose(rewards, want.rewards, atol=1e-5, rtol=0)
    logged = [k for row in trainer.state.log_history for k in row]
    assert any("cloud_reward" in k for k in logged), logged


def test_samples_that_cannot_differ_are_warned_about_once_per_setting(rm, caplog):
    # K > 1 on a classic model was reduced to K = 1, and K greedy critiques were K copies of one,
    # without a word (python -m cloud_jax evaluate refuses the one and warns about the other).
    import dataclasses
    import logging

    from cloud_jax.scoring import rewards

    rewards._warn_once.cache_clear()  # warned once per process: this test may not be first
    greedy = CLoudReward(rm, num_samples=2, temperature=0.0, max_critique_tokens=5)
    classic = CLoudReward(rm, num_samples=3, classic=True)
    sampled = CLoudReward(rm, **SETTINGS)
    with caplog.at_level(logging.WARNING, logger="cloud_jax.scoring.rewards"):
        for fn in (greedy, classic):
            fn(PROMPTS, COMPLETIONS)
            fn(PROMPTS, COMPLETIONS)  # a trainer calls it every step: one warning, not one a call
        sampled(PROMPTS, COMPLETIONS)
        dataclasses.replace(rm, feedback_method="vanilla").score(PROMPTS, COMPLETIONS,
                                                                 num_samples=2)
    assert caplog.text.count("num_samples=2 at temperature 0: greedy decoding writes the same "
                             "critique K times") == 1
    assert caplog.text.count("num_samples=3 with classic=True: a classic reward model writes no "
                             "critiques, so K is 1") == 1
    assert caplog.text.count("num_samples=2 on a classic (feedback_method 'vanilla') model") == 1
    assert len(caplog.records) == 3  # nothing about the sampled setting
    assert len(classic.last_critiques[0]) == 0 and len(greedy.last_critiques[0]) == 2
