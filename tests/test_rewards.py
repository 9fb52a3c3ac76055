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
    # A tool call made in the message itself (TRL parses one out of the text into tool_calls,
    # leaving the content empty or a preamble) is no more scored than a separate tool message.
    tool_call = {"type": "function", "function": {"name": "calc", "arguments": {"x": "2+2"}}}
    for content in ("", "Let me compute."):
        with pytest.raises(ValueError, match=r"completions\[0\]: .*tool call"):
            fn(PROMPTS[:1], [[{"role": "assistant", "content": content,
                               "tool_calls": [tool_call]}]])
    # One assistant message, with further keys (TRL's parsed responses, an empty tool_calls
    # list), is its content.
    np.testing.assert_allclose(fn(PROMPTS[:1], [[dict(call, tool_calls=[])]]),
                               fn(PROMPTS[:1], [call["content"]]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(fn(PROMPTS[:1], [[dict(call, thinking="hmm")]]),
                               fn(PROMPTS[:1], [call["content"]]), atol=1e-6, rtol=0)


def test_a_message_key_that_would_not_be_scored_is_refused_not_dropped(rm, caplog):
    import cloud_jax.rewards

    fn = CLoudReward(rm, **SETTINGS)
    user = {"role": "user", "content": PROMPTS[0]}
    reply = {"role": "assistant", "content": COMPLETIONS[0]}
    plain = fn(PROMPTS[:1], COMPLETIONS[:1])
    # A key the model's layout has no place for (a speaker's name, a tool call id, a typo of
    # content) is refused with its place and the keys accepted, as /v1/score refuses it (422).
    for prompt, where in (([dict(user, name="alice")], r"prompts\[0\]\[0\]\.name"),
                          ([{"role": "system", "content": "Be brief.", "name": "x"}, user],
                           r"prompts\[0\]\[0\]\.name"),
                          ([dict(user, contents="typo")], r"prompts\[0\]\[0\]\.contents")):
        with pytest.raises(ValueError, match=where + r": unknown key .*role and content"):
            fn([prompt], COMPLETIONS[:1])
    for message, where in ((dict(reply, name="bot"), r"completions\[0\]\[0\]\.name"),
                           (dict(reply, tool_call_id="7"),
                            r"completions\[0\]\[0\]\.tool_call_id")):
        with pytest.raises(ValueError, match=where + r": unknown key .*role, content"):
            fn(PROMPTS[:1], [[message]])
    # A key that holds None carries nothing (datasets fills a message's missing fields with
    # None when another row has them): read as absent.
    np.testing.assert_allclose(fn([[dict(user, name=None, tool_calls=None)]],
                                  [[dict(reply, name=None, tool_calls=None)]]),
                               plain, atol=1e-6, rtol=0)
    # The reasoning a response schema parses out of the response (TRL with transformers' parsed
    # responses: reasoning_content, or thinking) is left out of the score, and the log says so.
    cloud_jax.rewards._warned.clear()
    for key in ("reasoning_content", "thinking"):
        np.testing.assert_allclose(fn(PROMPTS[:1], [[dict(reply, **{key: "2+2 is 4"})]]),
                                   plain, atol=1e-6, rtol=0)
    assert caplog.text.count("a completion's reasoning") == 1, caplog.text


def test_content_given_as_text_parts_is_read_as_its_joined_text(rm):
    """Newer TRL and OpenAI-style datasets give a message's content as a list of parts
    ([{"type": "text", "text": ...}]); it was refused as not being chat messages. Text parts are
    read joined in order with nothing between (as templates that take parts write them), so the
    tokens, critiques and rewards are those of the string; another part is refused by name."""
    fn = CLoudReward(rm, **SETTINGS)
    plain = fn(PROMPTS, COMPLETIONS)
    plain_critiques = fn.last_critiques

    def parts(text, cut):
        return [{"type": "text", "text": text[:cut]}, {"type": "text", "text": text[cut:]}]

    prompts = [[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": parts(p, 3)}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": parts(c, 1)}] for c in COMPLETIONS]
    assert fn(prompts, completions) == plain and fn.last_critiques == plain_critiques
    # One part, and a key holding None (datasets fills "image" into a text part when another
    # part of the column has one): the same.
    assert fn([[{"role": "user", "content": [{"type": "text", "text": p, "image": None}]}]
               for p in PROMPTS], COMPLETIONS) == plain
    image = {"type": "image", "image": None}
    with pytest.raises(ValueError,
                       match=r"prompts\[1\]\[0\]\.content\[1\]: a part of type 'image'"):
        fn(PROMPTS[:1] + [[{"role": "user", "content": [{"type": "text", "text": "a"}, image]}]],
           COMPLETIONS[:2])
    audio = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    with pytest.raises(ValueError, match=r"completions\[0\]\[0\]\.content\[0\]: a part of type "
                                         r"'input_audio'; only text parts"):
        fn(PROMPTS[:1], [[{"role": "assistant", "content": [audio]}]])
    for bad, why in (("text", ": expected a part"), ({"type": "text"}, r"\.text: expected a string"),
                     ({"type": "text", "text": "a", "cache": 1}, r"\.cache: unknown key")):
        with pytest.raises(ValueError, match=r"prompts\[0\]\[0\]\.content\[0\]" + why):
            fn([[{"role": "user", "content": [bad]}]], COMPLETIONS[:1])


def test_non_finite_rewards_are_an_error_not_a_reward(rm):
    # A NaN reward reaches the trainer as no reward (TRL leaves the completion out) or as 0
    # (tunix sums rewards with nansum): the training run would go on without a word.
    import dataclasses

    import jax
    import jax.numpy as jnp

    nan_rm = dataclasses.replace(rm, params=jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, jnp.nan) if "reward" in jax.tree_util.keystr(path)
        else x, rm.params))
    fn = CLoudReward(nan_rm, **SETTINGS)
    with pytest.raises(ValueError, match=r"non-finite rewards \(NaN or inf\) for "
                                         r"completions\[0, 1, 2\]"):
        fn(PROMPTS, COMPLETIONS)


def test_settings_are_checked_when_built_and_array_columns_are_read(rm):
    # A misspelt or bad setting fails at construction (before any loading), not at the
    # trainer's first reward call.
    with pytest.raises(TypeError, match=r"CLoudReward: unknown setting 'num_sample' \(did you "
                                        r"mean 'num_samples'\?\)"):
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


def _train_grpo(reward, tmp_path, **config):
    """Two steps of TRL's GRPOTrainer over a tiny random policy with ``reward``; the trainer.
    ``config``: further GRPOConfig settings."""
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
    config = trl.GRPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, num_generations=2,
        max_completion_length=6, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, bf16=False, learning_rate=1e-3, temperature=1.0, seed=0, **config)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=reward, args=config,
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}),
                              processing_class=tok)
    trainer.train()
    return trainer


def _recording(calls):
    class Recording(CLoudReward):
        def __call__(self, prompts, completions, **kwargs):
            rewards = super().__call__(prompts, completions, **kwargs)
            calls.append((list(prompts), list(completions), rewards))
            return rewards

    return Recording


@pytest.mark.slow
def test_inside_a_trl_grpo_training_loop(rm, tmp_path):
    calls = []
    trainer = _train_grpo(_recording(calls)(rm, max_critique_tokens=4), tmp_path)
    assert calls, "the trainer never called the reward function"
    for prompts, completions, rewards in calls:
        assert len(rewards) == len(completions) == len(prompts)
        want = rm.score([p if isinstance(p, str) else p[-1]["content"] for p in prompts],
                        completions, max_critique_tokens=4)
        np.testing.assert_allclose(rewards, want.rewards, atol=1e-5, rtol=0)
    logged = [k for row in trainer.state.log_history for k in row]
    assert any("cloud_reward" in k for k in logged), logged


def _completions_tables(trainer):
    """The completions tables TRL wrote (log_completions=True), one per logged step."""
    import glob
    import os

    import pandas as pd

    paths = sorted(glob.glob(os.path.join(trainer.args.output_dir, "completions", "*.parquet")))
    assert paths, "the trainer wrote no completions table"
    return [pd.read_parquet(p) for p in paths]


@pytest.mark.slow
def test_the_critiques_and_their_measures_in_a_trl_grpo_run(rm, tmp_path):
    # Through TRL's own log_extra / log_metric hooks: the completions table has each
    # completion's critiques beside its reward, and the logs have the critiques' measures.
    calls = []
    settings = dict(num_samples=2, temperature=0.9, max_critique_tokens=4, seed=3)
    trainer = _train_grpo(_recording(calls)(rm, **settings), tmp_path, log_completions=True)
    tables = _completions_tables(trainer)
    assert len(tables) == len(calls) == 2  # one call a step here
    for table, (prompts, completions, rewards) in zip(tables, calls):
        assert "cloud_reward/critiques" in table.columns
        np.testing.assert_allclose(table["cloud_reward"], rewards, atol=1e-6, rtol=0)
        # Each row's own critiques, in the trainer's order: the column a plain call gives.
        extra, _, hooks = _hooks()
        CLoudReward(rm, **settings)(prompts, completions, **hooks)
        assert list(table["cloud_reward/critiques"]) == extra["cloud_reward/critiques"]
        assert all(t.count("] reward ") == 2 for t in table["cloud_reward/critiques"])
    steps = [row for row in trainer.state.log_history if "loss" in row]
    assert len(steps) == 2
    for row in steps:
        assert row["cloud_reward/too_long_frac"] == 0.0
        assert 0 <= row["cloud_reward/truncated_frac"] <= 1
        assert 0 < row["cloud_reward/critique_tokens"] <= 4
        assert row["cloud_reward/sample_reward_std"] >= 0
    # What was logged is what the calls scored: the last step's measures are its call's.
    result = trainer.reward_funcs[0].last_result
    assert steps[-1]["cloud_reward/critique_tokens"] == pytest.approx(
        result.critique_tokens.mean())
    assert steps[-1]["cloud_reward/sample_reward_std"] == pytest.approx(result.reward_std.mean())


@pytest.mark.slow
def test_a_too_long_completion_inside_a_trl_grpo_training_loop(rm, tmp_path):
    # TRL takes None as "no reward from this function": the run goes on past completions the
    # reward model cannot read.
    from cloud_jax.data.layout import encode_critique_prefix
    from cloud_jax.scoring.rewards import ScoreConfig, resolve_critique_prefix

    calls = []
    # Room for the layout and 3 bytes of completion: the random policy's 6-token answers (of
    # multi-byte characters) do not fit, so here no completion of the run gets a reward, TRL's
    # hardest case (an answer it ended early would).
    least = len(encode_critique_prefix(rm.tokenizer, "", "",
                                       resolve_critique_prefix(rm, ScoreConfig())))
    settings = dict(max_critique_tokens=4, max_length=least + 3)
    trainer = _train_grpo(_recording(calls)(rm, **settings), tmp_path, log_completions=True)
    from cloud_jax.scoring.rewards import too_long

    assert calls and any(r is None for _, _, rewards in calls for r in rewards)
    for prompts, completions, rewards in calls:
        texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        over = {o.index for o in too_long(rm, texts, completions, ScoreConfig(**settings))}
        assert {i for i, r in enumerate(rewards) if r is None} == over
        keep = [i for i in range(len(texts)) if i not in over]
        if keep:
            want = rm.score([texts[i] for i in keep], [completions[i] for i in keep], **settings)
            np.testing.assert_allclose([rewards[i] for i in keep], want.rewards, atol=1e-5,
                                       rtol=0)
    assert trainer.state.global_step == 2
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert losses and all(np.isfinite(losses)), trainer.state.log_history
    # The logs say so (one call a step here): the fraction too long, and no critique measures
    # (no NaN) for a step with nothing scored.
    steps = [row for row in trainer.state.log_history if "loss" in row]
    assert len(steps) == len(calls) == 2
    for row, (_, _, rewards) in zip(steps, calls):
        assert row["cloud_reward/too_long_frac"] == np.mean([r is None for r in rewards])
        assert ("cloud_reward/critique_tokens" in row) == any(r is not None for r in rewards)
    for table, (_, _, rewards) in zip(_completions_tables(trainer), calls):
        assert [t.startswith("(not scored: ") for t in table["cloud_reward/critiques"]] == \
            [r is None for r in rewards]


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


# A completion the model cannot read even with its whole prompt cut away (max_length=160 here).
LONG = "x" * 200
SHORT_MAX = dict(SETTINGS, max_length=160)


def test_a_too_long_completion_is_skipped_with_a_warning_not_raised(rm, caplog):
    # It raised InputTooLongError from rm.score, which stopped the trainer's run at the first
    # step whose policy wrote one; the call's other completions were not scored either.
    import logging

    from cloud_jax.errors import InputTooLongError

    fn = CLoudReward(rm, **SHORT_MAX)
    prompts = PROMPTS + ["Tell me more."]
    completions = [COMPLETIONS[0], LONG, COMPLETIONS[2], LONG + "y" * 20]
    with caplog.at_level(logging.WARNING, logger="cloud_jax.rewards"):
        rewards = fn(prompts, completions)
    assert rewards[1] is None and rewards[3] is None
    want = rm.score([prompts[0], prompts[2]], [completions[0], completions[2]], **SHORT_MAX)
    np.testing.assert_allclose([rewards[0], rewards[2]], want.rewards, atol=1e-6, rtol=0)
    assert all(type(rewards[i]) is float for i in (0, 2))
    # Which ones, by how much: the warning and last_too_long.
    assert [(o.index, o.tokens, o.limit) for o in fn.last_too_long] == [
        (1, fn.last_too_long[0].tokens, 160), (3, fn.last_too_long[0].tokens + 20, 160)]
    assert fn.last_too_long[0].tokens > 200 and "max_length=160" in fn.last_too_long[0].what
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "2 of 4 completions too long to score" in message, message
    assert f"[1] {fn.last_too_long[0].tokens}, [3] {fn.last_too_long[1].tokens}" in message
    assert "over the limit of 160 (max_length=160)" in message and "None" in message
    # The result says so too: no critiques and NaN rewards for those two, the others as scored.
    assert fn.last_critiques[1] == fn.last_critiques[3] == []
    assert fn.last_critiques[0] == want.critiques[0] and fn.last_critiques[2] == want.critiques[1]
    result = fn.last_result
    assert np.isnan(result.rewards[[1, 3]]).all() and np.isnan(result.sample_rewards[[1, 3]]).all()
    np.testing.assert_allclose(result.sample_rewards[[0, 2]], want.sample_rewards, atol=1e-6)
    assert result.sample_rewards.shape == (4, 2) and result.critique_tokens[1].sum() == 0
    # A call that fits clears it.
    fn(PROMPTS, COMPLETIONS)
    assert fn.last_too_long == [] and not np.isnan(fn.last_result.rewards).any()
    # Every completion too long: nothing is scored, and the call still answers.
    assert fn(PROMPTS[:2], [LONG, LONG]) == [None, None]
    assert fn.last_critiques == [[], []] and np.isnan(fn.last_result.rewards).all()
    # rm.score itself is unchanged.
    with pytest.raises(InputTooLongError, match="input 1: the critique prefill is"):
        rm.score(prompts, completions, **SHORT_MAX)


def test_a_too_long_completion_can_be_penalised_or_raise(rm):
    from cloud_jax.errors import InputTooLongError

    prompts, completions = PROMPTS[:2], [COMPLETIONS[0], LONG]
    penalty = CLoudReward(rm, on_too_long="penalty", too_long_reward=-3, **SHORT_MAX)
    rewards = penalty(prompts, completions)
    assert rewards[1] == -3.0 and type(rewards[1]) is float
    np.testing.assert_allclose(rewards[0], rm.score(prompts[:1], completions[:1],
                                                    **SHORT_MAX).rewards[0], atol=1e-6, rtol=0)
    assert [o.index for o in penalty.last_too_long] == [1]
    # Today's behaviour, asked for: the error, naming the input and the way out.
    strict = CLoudReward(rm, on_too_long="error", **SHORT_MAX)
    with pytest.raises(InputTooLongError, match=r"input 1: the critique prefill is \d+ tokens "
                                                r"over max_length=160 .*on_too_long='skip' or "
                                                r"'penalty'"):
        strict(prompts, completions)
    # A classic model's whole sequence is what must fit.
    classic = CLoudReward(rm, classic=True, max_length=160)
    assert classic(prompts, completions)[1] is None
    assert classic.last_result.sample_rewards.shape == (2, 1)
    assert classic.last_too_long[0].tokens > 200


# A question long enough that, under max_length=160, an answer of some length makes its prompt be
# cut from the left.
QUESTION = "Please explain, step by step, why 2+2 is 4."
WORDY = "Four, because two and two make four."


def test_the_completions_of_one_prompt_read_the_same_prompt_tokens(rm):
    # A GRPO trainer compares the rewards of one prompt's completions with one another. Where the
    # prompt had to be cut to fit, each completion lost as many prompt tokens as its own length
    # needed: a short answer was judged against the whole question and a longer one against its
    # end, so the group's rewards differed for a reason that is not the answers. They now read the
    # largest cut among the scored completions of that prompt text in the call (evaluation's and
    # Best-of-N's rule); a completion too long to score does not count.
    for settings in (SHORT_MAX, dict(classic=True, max_length=60)):
        fn = CLoudReward(rm, **settings)
        prompts = [QUESTION, "Hi", QUESTION, QUESTION, "Hi"]
        completions = ["4", "y" * 40, WORDY, LONG, "ok"]
        cuts = rm.prompt_tokens_cut(prompts, completions, **settings)
        assert cuts[0] == 0 < cuts[2] < len(QUESTION) < cuts[3]  # cuts that differ in a group
        rewards = fn(prompts, completions)
        assert rewards[3] is None and [o.index for o in fn.last_too_long] == [3]
        keep = [0, 1, 2, 4]
        shared = [int(cuts[2]), int(cuts[1]), int(cuts[2]), int(cuts[1])]
        want = rm.score([prompts[i] for i in keep], [completions[i] for i in keep],
                        min_prompt_cuts=shared, **settings)
        np.testing.assert_allclose([rewards[i] for i in keep], want.rewards, atol=1e-6, rtol=0)
        assert [fn.last_critiques[i] for i in keep] == want.critiques
        # The short answer's reward is read after the group's cut, not after the whole question.
        alone = rm.score(prompts[:1], completions[:1], **settings).rewards[0]
        assert abs(rewards[0] - alone) > 1e-4
    # Every completion fits: the rewards are rm.score's with the shared cuts too.
    fn = CLoudReward(rm, on_too_long="error", **SHORT_MAX)
    rewards = fn([QUESTION] * 2, ["4", WORDY])
    cut = int(rm.prompt_tokens_cut([QUESTION], [WORDY], **SHORT_MAX)[0])
    np.testing.assert_allclose(rewards, rm.score([QUESTION] * 2, ["4", WORDY], min_prompt_cuts=[
        cut, cut], **SHORT_MAX).rewards, atol=1e-6, rtol=0)
    # tunix's call: by keyword, each dataset column a numpy array holding every row once per
    # generation (np.repeat), with its mode and the other columns; the question column scored.
    completions = ["4", WORDY, "y" * 40, "ok"]
    question = np.repeat(np.array([QUESTION, "Hi"]), 2)
    rewards = fn(prompts=question, completions=completions, mode="train",
                 answer=np.repeat(np.array(["4", "-"]), 2), trajectory_ids=["a", "b", "c", "d"])
    cuts = rm.prompt_tokens_cut(list(question), completions, **SHORT_MAX).tolist()
    assert cuts[0] != cuts[1]
    np.testing.assert_allclose(rewards, rm.score(list(question), completions, min_prompt_cuts=[
        cuts[1], cuts[1], max(cuts[2:]), max(cuts[2:])], **SHORT_MAX).rewards, atol=1e-6, rtol=0)


def test_too_long_options_are_checked_when_built(rm):
    # Settings under which no completion fits at all (the critique budget takes every position
    # of the model) fail when built, not as every reward of the run skipped.
    with pytest.raises(ValueError, match=r"no completion can be scored with these settings: an "
                                         r"empty one takes \d+ tokens, over the limit of 0"):
        CLoudReward(rm, max_critique_tokens=rm.config.max_position_embeddings)
    for bad, match in ((dict(on_too_long="drop"), "on_too_long='drop': expected one of 'skip', "
                                                  "'penalty', 'error'"),
                       (dict(on_too_long="penalty"), "on_too_long='penalty' needs "
                                                     "too_long_reward=<a finite number>"),
                       (dict(on_too_long="penalty", too_long_reward=float("nan")),
                        "too_long_reward"),
                       (dict(on_too_long="penalty", too_long_reward="-1"), "too_long_reward"),
                       (dict(too_long_reward=-1.0), "too_long_reward=-1.0 is used only with "
                                                    "on_too_long='penalty'")):
        with pytest.raises(ValueError, match=match):
            CLoudReward(rm, **bad)
    assert cloud_reward(rm, on_too_long="penalty", too_long_reward=np.float32(-1)).too_long_reward \
        == -1.0


def _hooks():
    """Stand-ins for TRL's log_extra(column, values) and log_metric(name, value), recording."""
    extra, metrics = {}, {}

    def log_extra(column, values):
        extra.setdefault(column, []).extend(values)

    def log_metric(name, value):
        metrics.setdefault(name, []).append(value)

    return extra, metrics, dict(log_extra=log_extra, log_metric=log_metric)


def test_the_critiques_and_their_measures_go_to_the_trainers_logging_hooks(rm):
    # TRL's GRPOTrainer passes log_extra (a column of its completions table) and log_metric (a
    # metric in its logs) to reward functions: the critiques behind each reward were not shown.
    prompts = PROMPTS + ["Tell me more."]
    completions = [COMPLETIONS[0], LONG, COMPLETIONS[2], "Yes."]
    fn = CLoudReward(rm, **SHORT_MAX)
    extra, metrics, hooks = _hooks()
    rewards = fn(prompts, completions, trainer_state=None, **hooks)
    plain = CLoudReward(rm, **SHORT_MAX)
    assert rewards == plain(prompts, completions)  # the return value is unchanged
    result, critiques = fn.last_result, fn.last_critiques
    # One text per completion, in order, under the function's name: each of its K critiques
    # with its reward (and whether it hit the budget); the too-long one says why it has none.
    assert list(extra) == ["cloud_reward/critiques"]
    column = extra["cloud_reward/critiques"]
    assert len(column) == 4 and all(isinstance(t, str) for t in column)
    for i in (0, 2, 3):
        for j in range(2):
            cut = ", cut at 5 tokens" if result.truncated[i, j] else ""
            assert f"[{j + 1}] reward {result.sample_rewards[i, j]:.3f}{cut}: {critiques[i][j]}" \
                in column[i]
    assert result.truncated[[0, 2, 3]].any()  # the budget of 5 cuts some: shown
    assert column[1] == (f"(not scored: {fn.last_too_long[0].tokens} tokens with the prompt cut "
                         "away, over the limit of 160)")
    # One value per call for each metric, over the scored completions.
    scored = [0, 2, 3]
    assert metrics == {
        "cloud_reward/too_long_frac": [0.25],
        "cloud_reward/sample_reward_std": [pytest.approx(result.reward_std[scored].mean())],
        "cloud_reward/truncated_frac": [pytest.approx(result.truncated[scored].mean())],
        "cloud_reward/critique_tokens": [pytest.approx(result.critique_tokens[scored].mean())],
    }
    assert 0 < metrics["cloud_reward/truncated_frac"][0] <= 1
    assert metrics["cloud_reward/sample_reward_std"][0] > 0  # K=2 sampled critiques differ
    # Nothing scored: only the fraction (a mean of nothing would be NaN in the trainer's logs).
    extra, metrics, hooks = _hooks()
    assert fn(PROMPTS[:2], [LONG, LONG], **hooks) == [None, None]
    assert metrics == {"cloud_reward/too_long_frac": [1.0]}
    assert [t.startswith("(not scored: ") for t in extra["cloud_reward/critiques"]] == [True] * 2
    # The names follow __name__ (two reward models in one trainer need two names), and one hook
    # alone is used alone; a classic model has no critiques to show or measure.
    fn.__name__ = "cloud_helpful"
    extra, metrics, hooks = _hooks()
    fn(PROMPTS, COMPLETIONS, log_metric=hooks["log_metric"])
    assert not extra and sorted(metrics) == ["cloud_helpful/critique_tokens",
                                             "cloud_helpful/sample_reward_std",
                                             "cloud_helpful/too_long_frac",
                                             "cloud_helpful/truncated_frac"]
    assert metrics["cloud_helpful/too_long_frac"] == [0.0]
    extra, metrics, hooks = _hooks()
    classic = CLoudReward(rm, classic=True)
    assert classic(PROMPTS, COMPLETIONS, **hooks) == classic(PROMPTS, COMPLETIONS)
    assert not extra and metrics == {"cloud_reward/too_long_frac": [0.0]}
    # An error leaves nothing logged; an empty call logs nothing.
    extra, metrics, hooks = _hooks()
    with pytest.raises(ValueError):
        fn(PROMPTS[:1], COMPLETIONS[:2], **hooks)
    assert fn([], [], **hooks) == [] and not extra and not metrics
