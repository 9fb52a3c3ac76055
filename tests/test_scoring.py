"""Scoring API and CLI on a tiny random model with the byte tokenizer."""

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cloud_jax
from cloud_jax.errors import CheckpointError, ConfigError, InputTooLongError
from cloud_jax.model.config import ModelConfig
from cloud_jax.data.config import CRITIQUE_PREFIX
from cloud_jax.data.layout import encode_critique_prefix, encode_example
from cloud_jax.data.tokenizer import byte_tokenizer, end_of_turn_ids
from cloud_jax.model import param_shapes
from cloud_jax.sampling import Greedy, pad_prefixes, sample
from cloud_jax.cli.score import main
from cloud_jax.scoring.rewards import ScoreConfig, score, teacher_forced_rewards

# One layer keeps compiles short; the sampler's own tests cover deeper models.
CFG = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                  num_kv_heads=2)
PROMPTS = ["What is 2+2?", "Name a colour.", "Hi"]
RESPONSES = ["4", "Blue, like the sky.", "Hello there!"]
BUDGET = 6


def random_params(cfg, seed):
    """Random weights without compiling the initialiser (which costs seconds per test file)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype),
                        param_shapes(cfg))


# Settings shared by several tests, so they reuse one compiled sampler.
RANDOM = ScoreConfig(num_samples=3, temperature=1.0, max_critique_tokens=BUDGET, seed=5,
                     batch_size=3)


@pytest.fixture(scope="module")
def rm():
    return cloud_jax.RewardModel(CFG, random_params(CFG, 1), byte_tokenizer())


def full_rewards(rm, seqs):
    """Rewards of one right-padded forward over whole sequences (read at each last token)."""
    ids, mask = pad_prefixes(seqs, 256, side="right")
    return np.asarray(rm.forward(ids, mask)[1])


def test_k1_temperature0_is_greedy_and_reward_matches_a_full_forward(rm):
    result = rm.score(PROMPTS, RESPONSES, max_critique_tokens=BUDGET)
    tok = rm.tokenizer
    eot = end_of_turn_ids(tok)
    prefixes = [encode_critique_prefix(tok, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    greedy = sample(CFG, rm.params, prefixes, max_new_tokens=BUDGET, stop_ids=eot,
                    method=Greedy(), pad_id=tok.pad_token_id)
    for b in range(len(PROMPTS)):
        ids = greedy.critique_ids(b, 0)
        assert result.critiques[b] == [tok.decode(ids, skip_special_tokens=True)]
        assert result.critique_tokens[b, 0] == len(ids)
    # The in-loop reward is the reward at the end-of-turn token after the critique.
    full = full_rewards(rm, [prefixes[b] + greedy.critique_ids(b, 0) + [eot[0]]
                             for b in range(len(PROMPTS))])
    np.testing.assert_allclose(result.sample_rewards[:, 0], full, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(result.truncated, greedy.truncated)
    np.testing.assert_array_equal(result.rewards, result.sample_rewards[:, 0])
    assert (result.reward_std == 0).all()


def test_self_consistency_statistics_and_batch_invariance(rm):
    cfg = RANDOM
    result = score(rm, PROMPTS, RESPONSES, cfg)
    assert result.sample_rewards.shape == (3, 3) and result.truncated.shape == (3, 3)
    assert [len(c) for c in result.critiques] == [3, 3, 3]
    assert (result.reward_std > 0).all()  # the samples differ
    np.testing.assert_allclose(result.rewards, result.sample_rewards.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(result.reward_std, result.sample_rewards.std(axis=1), rtol=1e-6)
    # One input per batch, in reverse order: the same critiques and rewards.
    single = score(rm, PROMPTS[::-1], RESPONSES[::-1], dataclasses.replace(cfg, batch_size=1))
    assert single.critiques[::-1] == result.critiques
    np.testing.assert_allclose(single.sample_rewards[::-1], result.sample_rewards, atol=1e-5)


def test_classic_model_scores_with_one_forward(rm):
    result = rm.score(PROMPTS, RESPONSES, classic=True)
    assert result.sample_rewards.shape == (3, 1) and result.critiques == [[], [], []]
    seqs = [encode_example(rm.tokenizer, p, r, None, "classic").input_ids.tolist()
            for p, r in zip(PROMPTS, RESPONSES)]
    np.testing.assert_allclose(result.rewards, full_rewards(rm, seqs), atol=1e-5, rtol=0)


def test_a_forward_over_tokens_the_model_has_no_row_for_is_an_error_not_nan():
    # A tokenizer larger than the model's vocabulary (the wrong tokenizer): the sampled path
    # says so; classic and teacher-forced scoring returned NaN rewards without a word.
    from model_helpers import TINY, tiny_reward_model

    small = tiny_reward_model(0, dataclasses.replace(TINY, vocab_size=200))
    match = r"input 0: token id 2\d\d at position \d+ is not in the model's vocabulary \[0, 200\)"
    with pytest.raises(ValueError, match=match):
        small.score(PROMPTS, RESPONSES, classic=True)
    with pytest.raises(ValueError, match=match):
        teacher_forced_rewards(small, PROMPTS, RESPONSES, ["Fine."] * len(PROMPTS))


def test_classic_scoring_compiles_one_batch_shape_whatever_the_input_count(rm):
    # A short last batch is filled up, as critique sampling's is: 4, 6 and 5 inputs in batches of
    # 4 share one compiled forward (the remainders 2 and 1 compiled shapes of their own), and the
    # rewards are those of scoring each input alone.
    from cloud_jax.scoring.rewards import sequence_rewards

    prompts, responses = ["Q%d" % i for i in range(6)], ["A%d" % i for i in range(6)]
    cfg = ScoreConfig(classic=True, batch_size=4)
    score(rm, prompts[:4], responses[:4], cfg)
    compiled = sequence_rewards._cache_size()
    six = score(rm, prompts, responses, cfg).rewards
    five = score(rm, prompts[:5], responses[:5], cfg).rewards
    assert sequence_rewards._cache_size() == compiled
    alone = [score(rm, [p], [r], cfg).rewards[0] for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(six, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(five, alone[:5], atol=1e-5, rtol=0)


def test_teacher_forced_rewards_read_the_given_critiques_with_one_forward(rm):
    critiques = ["Correct.", "A colour indeed.", "It greets back."]
    got = teacher_forced_rewards(rm, PROMPTS, RESPONSES, critiques, ScoreConfig(batch_size=2))
    seqs = [encode_example(rm.tokenizer, p, r, c, "critique").input_ids.tolist()
            for p, r, c in zip(PROMPTS, RESPONSES, critiques)]
    np.testing.assert_allclose(got, full_rewards(rm, seqs), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 critiques"):
        teacher_forced_rewards(rm, PROMPTS, RESPONSES, critiques[:2])


def test_score_command_writes_every_row_back(rm, tmp_path, capsys):
    ckpt = rm.save_pretrained(tmp_path / "ckpt")
    rows = [{"id": "a", "prompt": PROMPTS[0], "response": RESPONSES[0], "note": 1},
            {"id": "b", "prompt": PROMPTS[1], "chosen": RESPONSES[1], "rejected": RESPONSES[2]}]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    assert main(["--checkpoint", str(ckpt), "--input", str(src), "--output", str(out),
                 "--num-samples", "3", "--temperature", "1.0", "--seed", "5", "--batch-size",
                 "3", "--max-critique-tokens", str(BUDGET), "--steps-per-check", "4",
                 "--decode-phases", "1"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert scored[0]["note"] == 1 and scored[0]["response"] == RESPONSES[0]
    assert len(scored[0]["sample_rewards"]) == 3 and len(scored[0]["critiques"]) == 3
    assert scored[0]["reward"] == pytest.approx(np.mean(scored[0]["sample_rewards"]), abs=1e-6)
    for side in ("chosen", "rejected"):
        assert len(scored[1][f"{side}_critiques"]) == 3
        assert len(scored[1][f"{side}_truncated"]) == 3
        assert np.isfinite(scored[1][f"{side}_reward"])
    # The API gives the same numbers for the same settings (its end checked every step, its
    # cache grown in 4 phases).
    api = score(rm, PROMPTS, RESPONSES, RANDOM)
    assert RANDOM.steps_per_check == 1 and RANDOM.decode_phases == 4
    assert [scored[0]["critiques"], scored[1]["chosen_critiques"]] == api.critiques[:2]
    np.testing.assert_allclose(scored[0]["sample_rewards"], api.sample_rewards[0], atol=1e-5)
    np.testing.assert_allclose(scored[1]["chosen_sample_rewards"], api.sample_rewards[1],
                               atol=1e-5)
    # --no-progress, as evaluate's: the same rows, no bar on stderr.
    capsys.readouterr()
    assert main(["--checkpoint", str(ckpt), "--input", str(src), "--output", str(out),
                 "--classic", "--no-progress"]) == 0
    assert "%|" not in capsys.readouterr().err  # a tqdm bar draws "NN%|"
    assert len(out.read_text().splitlines()) == 2


def test_the_critique_prefix_a_model_was_trained_with_is_saved_and_scored_with(rm, tmp_path,
                                                                                caplog):
    prefix = "Check: "
    ckpt = dataclasses.replace(rm, critique_prefix=prefix).save_pretrained(tmp_path / "ckpt")
    assert json.loads((ckpt / "config.json").read_text())["critique_prefix"] == prefix
    loaded = cloud_jax.load(ckpt)
    assert loaded.critique_prefix == prefix
    stored = loaded.score(PROMPTS, RESPONSES, max_critique_tokens=BUDGET)
    given = rm.score(PROMPTS, RESPONSES, max_critique_tokens=BUDGET, critique_prefix=prefix)
    default = rm.score(PROMPTS, RESPONSES, max_critique_tokens=BUDGET)
    assert stored.critiques == given.critiques
    np.testing.assert_allclose(stored.sample_rewards, given.sample_rewards, atol=1e-6, rtol=0)
    assert np.abs(stored.rewards - default.rewards).max() > 1e-5  # the prefix is in the prefill
    # A prefix given explicitly wins, with a warning naming both.
    with caplog.at_level(logging.WARNING, logger="cloud_jax.scoring.rewards"):
        other = loaded.score(PROMPTS, RESPONSES, max_critique_tokens=BUDGET,
                             critique_prefix=CRITIQUE_PREFIX)
    np.testing.assert_allclose(other.sample_rewards, default.sample_rewards, atol=1e-6, rtol=0)
    assert f"but the model was trained with {prefix!r}" in caplog.text
    # Re-exporting keeps it; a model without one writes no key and scores with the default.
    assert cloud_jax.load(loaded.save_pretrained(tmp_path / "again")).critique_prefix == prefix
    plain = rm.save_pretrained(tmp_path / "plain")
    assert "critique_prefix" not in json.loads((plain / "config.json").read_text())
    assert cloud_jax.load(plain).critique_prefix is None
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "critique_prefix": 3}))
    with pytest.raises(CheckpointError, match="critique_prefix must be a string, got 3"):
        cloud_jax.load(ckpt)


def test_bad_rows_and_settings_are_clear_errors(rm, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'rejected'"):
        main(["--checkpoint", str(tmp_path), "--input", str(src), "--output",
              str(tmp_path / "o.jsonl")])
    # Settings are checked before anything loads; an input too long for --max-length is
    # named by its file, line and field.
    with pytest.raises(ConfigError, match="give --top-k or --top-p, not both"):
        main(["--checkpoint", str(tmp_path), "--input", str(src), "--output",
              str(tmp_path / "o.jsonl"), "--temperature", "1", "--top-k", "5", "--top-p", "0.9"])
    rm.save_pretrained(tmp_path / "model")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "c", "rejected": "r" * 300}) + "\n")
    # Told in the command's flags (rm.score names its settings: below).
    with pytest.raises(ConfigError, match=r"long.jsonl:2: field 'rejected': .* over "
                                          r"--max-length 200 .*; raise --max-length or shorten"):
        main(["--checkpoint", str(tmp_path / "model"), "--input", str(long), "--output",
              str(tmp_path / "o.jsonl"), "--max-length", "200"])
    # A classic model too: no critique prefill, the whole sequence is over the limit.
    with pytest.raises(ConfigError, match=r"long.jsonl:2: field 'rejected': longer than "
                                          r"--max-length 200 tokens .*; raise --max-length or "
                                          r"shorten"):
        main(["--checkpoint", str(tmp_path / "model"), "--input", str(long), "--output",
              str(tmp_path / "o.jsonl"), "--max-length", "200", "--classic"])
    with pytest.raises(ConfigError, match=r"--seed 9223372036854775808: .*\[0, 2\*\*32\)"):
        main(["--checkpoint", str(tmp_path), "--input", str(src), "--output",
              str(tmp_path / "o.jsonl"), "--seed", str(2**63)])
    with pytest.raises(ValueError, match="num_samples"):
        rm.score(PROMPTS, RESPONSES, num_samples=0)
    with pytest.raises(ValueError, match="steps_per_check"):
        rm.score(PROMPTS, RESPONSES, steps_per_check=0)
    with pytest.raises(ValueError, match="decode_phases"):
        rm.score(PROMPTS, RESPONSES, decode_phases=0)
    with pytest.raises(ValueError, match="3 prompts but 2 responses"):
        rm.score(PROMPTS, RESPONSES[:2])
    # A misspelt setting is named with the nearest one, not as ScoreConfig.__init__'s keyword.
    with pytest.raises(TypeError, match=r"rm.score: unknown setting 'max_tokens' \(did you mean "
                                        r"'max_critique_tokens'\?\); the settings are num_samples, "):
        rm.score(PROMPTS, RESPONSES, max_tokens=3)
    # One pair given as two strings is not read as pairs of characters.
    with pytest.raises(TypeError, match=r"prompts must be a list of texts.*rm.score\(\[prompt\]"):
        rm.score("ab", "cd")
    with pytest.raises(ValueError, match="top_k or top_p"):
        rm.score(PROMPTS, RESPONSES, temperature=1.0, top_k=2, top_p=0.5)
    with pytest.raises(ValueError, match="input 1: .*max_length=200"):
        rm.score(["a", "b"], ["short", "x" * 300], max_length=200)
    with pytest.raises(InputTooLongError, match="input 1: .*max_length=200"):
        rm.score(["a", "b"], ["short", "x" * 300], max_length=200, classic=True)
    no_tok = cloud_jax.RewardModel(CFG, rm.params)
    with pytest.raises(ValueError, match="no tokenizer"):
        no_tok.score(PROMPTS, RESPONSES)


def test_a_text_that_is_not_a_string_is_named_not_called_too_long(rm):
    # None, a number or chat messages in place of a text: a TypeError naming the element, never
    # an InputTooLongError telling the user to raise max_length.
    for prompts, responses, where in (([None], ["r"], r"prompts\[0\]: expected a string, got None"),
                                      (["p", "q"], ["r", 5], r"responses\[1\]: .* got int"),
                                      ([[{"role": "user", "content": "p"}]], ["r"],
                                       r"prompts\[0\]: .* got list")):
        for classic in (False, True):
            with pytest.raises(TypeError, match=where):
                rm.score(prompts, responses, classic=classic)
    with pytest.raises(TypeError, match=r"critiques\[0\]: .* got NoneType"):
        teacher_forced_rewards(rm, ["p"], ["r"], [None])
    # A lone surrogate (a JSON \udc80 escape): named, not the tokenizer's TypeError.
    for classic in (False, True):
        with pytest.raises(ValueError, match=r"responses\[1\]: contains a lone surrogate "
                                             r"\(\\udc80\) at offset 1"):
            rm.score(["p", "q"], ["r", "a\udc80b"], classic=classic)


def test_an_empty_given_critique_is_named_by_its_input(rm):
    # Teacher forcing reads the reward after a critique: an empty one (what a sampled critique
    # that ended at once decodes to) failed as "the critique layout needs a critique for every
    # response", naming no input.
    critiques = ["Correct.", "", "Fine."]
    with pytest.raises(ValueError, match=r"critiques\[1\]: empty; .*a critique to read the "
                                         r"reward after"):
        teacher_forced_rewards(rm, PROMPTS, RESPONSES, critiques)
    from cloud_jax.scoring.rewards import prompt_tokens_cut
    with pytest.raises(ValueError, match=r"critiques\[1\]: empty"):
        prompt_tokens_cut(rm, PROMPTS, RESPONSES, critiques=critiques)


def test_prompt_tokens_cut_refuses_one_pair_given_as_two_strings(rm):
    # As rm.score: two strings are one pair, not pairs of characters (it returned one count per
    # character, each 0, which an evaluation would have passed on as the pair's cuts).
    with pytest.raises(TypeError, match=r"prompts must be a list of texts.*"
                                        r"rm.prompt_tokens_cut\(\[prompt\]"):
        rm.prompt_tokens_cut("ab", ["cd", "ef"])
    with pytest.raises(TypeError, match=r"responses must be a list of texts"):
        rm.prompt_tokens_cut(["ab"], b"cd")
    assert rm.prompt_tokens_cut(["ab"], ["cd"]).tolist() == [0]


def test_a_critique_prefix_that_is_no_string_is_refused_with_the_settings(rm):
    # It passed the settings' check and failed in the tokenization as "'int' object has no
    # attribute 'rstrip'", naming no setting.
    for prefix in (5, b"Critique: ", ["Critique: "]):
        with pytest.raises(ValueError, match=r"critique_prefix=.*: must be a string"):
            ScoreConfig(critique_prefix=prefix).validate()
        with pytest.raises(ValueError, match=r"critique_prefix=.*: must be a string"):
            rm.score(PROMPTS, RESPONSES, critique_prefix=prefix)
    ScoreConfig(critique_prefix="").validate()


def test_a_sampling_number_given_as_no_number_is_named_with_the_setting(rm):
    # A string (a value read from a text file or a form) failed in a comparison inside the
    # sampler's checks as "'<=' not supported between instances of 'int' and 'str'", naming no
    # setting.
    for name, value in (("temperature", "0.7"), ("temperature", None), ("top_p", "0.9"),
                        ("repetition_penalty", "1.01"), ("temperature", True)):
        settings = {"temperature": 1.0, name: value}
        with pytest.raises(ValueError, match=rf"{name}={value!r}: must be a number"):
            ScoreConfig(**settings).validate()
        with pytest.raises(ValueError, match=rf"{name}={value!r}: must be a number"):
            rm.score(PROMPTS, RESPONSES, **settings)
    ScoreConfig(temperature=np.float32(0.5), top_p=1, repetition_penalty=np.float64(1.1)).validate()


def test_a_text_holding_a_lone_surrogate_is_named_not_a_tokenizer_error(rm, tmp_path):
    # A JSON "\ud800" escape decodes to a lone surrogate, which no tokenizer takes.
    for classic in (False, True):
        with pytest.raises(ValueError, match=r"responses\[1\]: contains a lone surrogate "
                                             r"\(\\ud800\) at offset 1"):
            rm.score(["p", "q"], ["r", "x\ud800"], classic=classic)
    with pytest.raises(ValueError, match=r"critiques\[0\]: contains a lone surrogate"):
        teacher_forced_rewards(rm, ["p"], ["r"], ["\udc00"])
    src = tmp_path / "rows.jsonl"
    src.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "a\\ud800", "response": "r"}\n')
    with pytest.raises(ConfigError, match=r"rows.jsonl:2: field 'prompt': contains a lone surrogate"):
        main(["--checkpoint", str(tmp_path), "--input", str(src), "--output",
              str(tmp_path / "o.jsonl")])


def test_mesh_option_parses_axis_sizes_and_names_mistakes():
    import argparse

    from cloud_jax.sharding import MeshConfig
    from cloud_jax.cli.common import parse_mesh

    assert parse_mesh("tensor=4") == MeshConfig(data=-1, fsdp=1, tensor=4)
    assert parse_mesh("data=2, fsdp=2,tensor=2") == MeshConfig(data=2, fsdp=2, tensor=2)
    for text, message in (("tensors=4", "AXIS one of data, fsdp, tensor"),
                          ("tensor", "expected AXIS=N"), ("tensor=four", "not an integer"),
                          ("tensor=0", ">= 1, or -1"), ("data=2,data=4", "given twice")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse_mesh(text)
    # Through the command line: a usage error (exit status 2), before any model loads.
    with pytest.raises(SystemExit) as err:
        main(["--checkpoint", "c", "--input", "x.jsonl", "--output", "o", "--mesh", "gpu=2"])
    assert err.value.code == 2


def test_per_input_budgets_equal_scoring_each_with_its_own(rm):
    budgets = [2, 6, 4]
    cfg = dataclasses.replace(RANDOM, max_critique_tokens=1)
    mixed = score(rm, PROMPTS, RESPONSES, cfg, budgets=budgets)
    for i, b in enumerate(budgets):
        alone = score(rm, PROMPTS[i:i + 1], RESPONSES[i:i + 1],
                      dataclasses.replace(RANDOM, max_critique_tokens=b))
        assert mixed.critiques[i] == alone.critiques[0]
        np.testing.assert_allclose(mixed.sample_rewards[i], alone.sample_rewards[0], atol=1e-5)
        np.testing.assert_array_equal(mixed.truncated[i], alone.truncated[0])
        assert mixed.critique_tokens[i].max() <= b


def test_a_max_length_given_above_the_positions_is_warned_about_even_at_the_default(
        rm, tmp_path, caplog):
    # max_length=2048 (the value the default stands for) given on a model built for 256
    # positions is held to them as 4096 is, and warned about as 4096 is; left out, it is held
    # to them without a word. It was taken for the default and not warned about.
    from cloud_jax.scoring import rewards

    short = cloud_jax.RewardModel(dataclasses.replace(CFG, max_position_embeddings=256),
                                  rm.params, rm.tokenizer)
    warning = "max_length=2048 is more than the model's positions allow"
    for given in ({"max_length": 2048}, {}):
        rewards._warn_once.cache_clear()  # warned once per process
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cloud_jax.scoring.rewards"):
            short.score(["p"], ["r"], classic=True, **given)
        assert (warning in caplog.text) == bool(given), given
    # The score command's --max-length 2048 likewise, and no warning without the flag.
    short.save_pretrained(tmp_path / "model")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    for flag in (["--max-length", "2048"], []):
        rewards._warn_once.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cloud_jax.scoring.rewards"):
            assert main(["--checkpoint", str(tmp_path / "model"), "--input", str(rows),
                         "--output", str(tmp_path / "o.jsonl"), "--classic", *flag]) == 0
        assert (warning in caplog.text) == bool(flag), flag
    # A max_length equal to what the positions allow (as the pipeline and the server hold theirs
    # to) names the positions, as a larger one does: raising it would fit no more.
    with pytest.raises(InputTooLongError, match=r"longer than the model's "
                                                r"max_position_embeddings=256 tokens .*; shorten"):
        short.score(["p"], ["r" * 300], classic=True, max_length=256)


def test_a_model_with_an_unknown_kind_or_layout_version_is_refused_when_built(rm, tmp_path):
    # Not later, as an input "too long for max_length" when scoring, or as a checkpoint that
    # save_pretrained writes and load refuses.
    with pytest.raises(ValueError, match="layout_version=4: expected one of 1, 2, 3"):
        cloud_jax.RewardModel(CFG, rm.params, rm.tokenizer, layout_version=4)
    with pytest.raises(ValueError, match="feedback_method='critic'"):
        cloud_jax.RewardModel(CFG, rm.params, rm.tokenizer, feedback_method="critic")



def test_scoring_follows_the_models_layout_version_unless_the_config_names_one(rm):
    """docs/COMPATIBILITY.md: scoring follows the model's layout version; ScoreConfig's
    layout_version overrides it. On the byte tokenizer version 1's prefill holds the prefix's
    trailing space and version 3's does not; with no critique token to write, the reward is read
    at the end-of-turn token right after the prefill."""
    eot = end_of_turn_ids(rm.tokenizer)[0]
    prefills = {v: [encode_critique_prefix(rm.tokenizer, p, r, version=v)
                    for p, r in zip(PROMPTS, RESPONSES)] for v in (1, 3)}
    assert prefills[1] != prefills[3]
    want = {v: full_rewards(rm, [s + [eot] for s in prefills[v]]) for v in (1, 3)}
    # The two versions read different rewards (on this random model by about 2e-5, one token of
    # the prefill apart), each far further from the other version's than the scoring path's own
    # rounding (at most 1.5e-8 here) takes it from its own.
    apart = np.abs(want[1] - want[3])
    assert apart.min() > 2e-6, apart
    old = dataclasses.replace(rm, layout_version=1)
    for model, settings, version in ((old, {}, 1), (rm, {}, 3), (old, {"layout_version": 3}, 3),
                                     (rm, {"layout_version": 1}, 1)):
        got = model.score(PROMPTS, RESPONSES, max_critique_tokens=0, **settings).rewards
        assert np.all(np.abs(got - want[version]) < apart / 4), (version, got, want)

def test_score_reports_progress_after_each_batch(rm):
    calls = []
    for classic in (False, True):
        calls.clear()
        rm.score(PROMPTS, RESPONSES, batch_size=2, max_critique_tokens=BUDGET, classic=classic,
                 on_batch=lambda inputs, tokens: calls.append((inputs, tokens)))
        assert [inputs for inputs, _ in calls] == [2, 1]
        assert all(tokens == 0 for _, tokens in calls) == classic


def test_inputs_past_the_models_positions_lose_prompt_tokens_or_are_refused(rm, tmp_path,
                                                                            caplog):
    # A model built for 256 positions: whatever max_length says, an input (with, on the CLoud
    # path, its critique and end-of-turn token) gets no position past them. The prompt is cut
    # from the left exactly as for a max_length of what the positions allow.
    short = cloud_jax.RewardModel(dataclasses.replace(CFG, max_position_embeddings=256),
                                  rm.params, rm.tokenizer)
    prompt, response = "p" * 600, "r" * 20
    with caplog.at_level(logging.WARNING, logger="cloud_jax.scoring.rewards"):
        classic = short.score([prompt], [response], classic=True, max_length=4096)
    assert "max_length=4096 is more than the model's positions allow" in caplog.text
    fitted = short.score([prompt], [response], classic=True, max_length=256)
    np.testing.assert_allclose(classic.rewards, fitted.rewards, atol=1e-6, rtol=0)
    given = teacher_forced_rewards(short, [prompt], [response], ["c" * 10],
                                   ScoreConfig(max_length=4096))
    np.testing.assert_allclose(given, teacher_forced_rewards(
        short, [prompt], [response], ["c" * 10], ScoreConfig(max_length=256)), atol=1e-6)
    # The default max_length (2048) is held to the positions too, without a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cloud_jax.scoring.rewards"):
        default = short.score([prompt], [response], max_critique_tokens=4)
    assert "positions" not in caplog.text
    # The critique's 4 tokens and its end-of-turn token leave the prefill 251 positions.
    fitted = short.score([prompt], [response], max_critique_tokens=4, max_length=251)
    np.testing.assert_allclose(default.sample_rewards, fitted.sample_rewards, atol=1e-6, rtol=0)
    assert default.critiques == fitted.critiques
    # One that does not fit even with its whole prompt cut names the positions.
    with pytest.raises(InputTooLongError, match=r"input 0: longer than the model's "
                                                r"max_position_embeddings=256 tokens"):
        short.score(["p"], ["r" * 300], classic=True, max_length=4096)
    with pytest.raises(InputTooLongError, match=r"input 0: the critique prefill is \d+ tokens "
                                                r"over the 0 tokens the model's "
                                                r"max_position_embeddings=256 leaves after a "
                                                r"critique of 300 tokens"):
        short.score(["p"], ["r"], max_critique_tokens=300)
    # The score command too: the row and field are named.
    short.save_pretrained(tmp_path / "model")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r" * 300}) + "\n")
    with pytest.raises(ConfigError, match=r"long.jsonl:1: field 'rejected': longer than the "
                                          r"model's max_position_embeddings=256 tokens"):
        main(["--checkpoint", str(tmp_path / "model"), "--input", str(long), "--output",
              str(tmp_path / "o.jsonl"), "--max-length", "4096", "--classic"])
    # The critique budget is named by its flag, as what to lower.
    with pytest.raises(ConfigError, match=r"long.jsonl:1: field 'chosen': .*critique of 300 "
                                          r"tokens .*; lower --max-critique-tokens or shorten"):
        main(["--checkpoint", str(tmp_path / "model"), "--input", str(long), "--output",
              str(tmp_path / "o.jsonl"), "--max-critique-tokens", "300"])


@pytest.mark.parametrize("max_length,positions,reserved", [
    (80, 128, 65),     # the positions leave 63: held to them
    (40, 128, 65),     # the asked length fits: unchanged
    (63, 128, 65),     # equal to the room
    (64, 128, 65),     # one over the room
    (300, 256, 0),     # classic / given critique: held to the positions
    (2048, 256, 255),  # room 1, the least that fits a token
    (100, 256, 256),   # room 0: nothing fits
    (100, 64, 257),    # room < 0
])
def test_fit_max_length_is_the_limit_score_applies(monkeypatch, max_length, positions, reserved):
    # The pipeline and the server pass fit_max_length(...) as ScoreConfig.max_length so that
    # score neither warns nor cuts to a different length: the two must agree wherever the
    # positions leave a token, and fit_max_length leaves max_length as it is where they leave
    # none (score then refuses every input, naming the positions).
    from types import SimpleNamespace

    from cloud_jax.scoring import rewards

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=positions))
    fitted = rewards.fit_max_length(model, max_length, reserved)
    limit, _, _ = rewards._token_limit(model, ScoreConfig(max_length=max_length), reserved)
    room = positions - reserved
    if room >= 1:
        assert fitted == limit == min(max_length, room)
        # Given back to score, the fitted length is its own limit: nothing further to warn of.
        again, _, _ = rewards._token_limit(model, ScoreConfig(max_length=fitted), reserved)
        assert again == fitted
    else:
        assert fitted == max_length and limit == 0
    # fit_max_length reads the limit from _token_limit, so a change to one is a change to both.
    monkeypatch.setattr(rewards, "_token_limit", lambda rm, cfg, reserved=0: (7, "", ""))
    assert rewards.fit_max_length(model, max_length, reserved) == 7


def _parser_of(command, monkeypatch):
    """The argument parser ``command``'s main builds (stopped before it parses anything)."""
    import argparse

    built = []

    def stop(self, args=None, namespace=None):
        built.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(SystemExit):
        command([])
    monkeypatch.undo()
    return built[0]


def test_the_generation_defaults_docs_compatibility_lists(monkeypatch):
    """docs/COMPATIBILITY.md's Generation table: a critique budget of 256 tokens (512 for
    critique), no repetition penalty and one critique per response by default, and the reference's
    settings (1024 tokens, penalty 1.01, one critique) taken by every command."""
    from cloud_jax.cli import critique, evaluate, serve
    from cloud_jax.evaluation import EvalConfig
    from cloud_jax.serving.types import Settings

    parsers = {"score": _parser_of(main, monkeypatch),
               "critique": _parser_of(critique.main, monkeypatch),
               "serve": serve.build_parser(), "evaluate": evaluate.build_parser()}
    budgets = {name: p.get_default("max_critique_tokens") for name, p in parsers.items()}
    assert budgets == {"score": 256, "critique": 512, "serve": 256, "evaluate": 256}
    penalties = {name: p.get_default("repetition_penalty") for name, p in parsers.items()}
    # evaluate leaves it unset: the sampler's own default.
    assert penalties == {"score": 1.0, "critique": 1.0, "serve": 1.0, "evaluate": None}
    assert ScoreConfig().repetition_penalty == Settings().repetition_penalty == 1.0
    assert (ScoreConfig().max_critique_tokens == EvalConfig().max_critique_tokens
            == Settings().max_critique_tokens == 256)
    samples = {name: parsers[name].get_default("num_samples")
               for name in ("score", "serve", "evaluate")}
    assert samples == {"score": 1, "serve": 1, "evaluate": (1,)}
    assert ScoreConfig().num_samples == Settings().num_samples == 1
    assert EvalConfig().num_samples == (1,)
    reference = ["--max-critique-tokens", "1024", "--repetition-penalty", "1.01"]
    for name, parser in parsers.items():
        for action in parser._actions:  # --checkpoint, --output, ...: not what is checked here
            action.required = False
        known, _ = parser.parse_known_args(reference + (["--num-samples", "1"]
                                                        if name != "critique" else []))
        assert (known.max_critique_tokens, known.repetition_penalty) == (1024, 1.01), name


def _ends_or_runs(rm, ends: bool):
    """``rm`` made to end every critique at once (``ends``: its end-of-turn tokens win every
    step) or never (they lose every step, so every critique runs into the budget). Feature 0 of
    the residual stream is held at 100 for every token, so after the final norm it is large and
    positive whatever the input; the LM head reads the end-of-turn logits from it alone."""
    params = jax.tree.map(lambda x: x, rm.params)
    params["embed"]["embedding"] = params["embed"]["embedding"].at[:, 0].set(100.0)
    params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(1.0)
    head = params["lm_head"].at[0, :].set(0.0)
    for eot in end_of_turn_ids(rm.tokenizer):
        head = head.at[0, eot].set(1000.0 if ends else -1000.0)
    params["lm_head"] = head
    return dataclasses.replace(rm, params=params)


async def _post(app, path: str, body: dict):
    """One request through the server's ASGI app, as uvicorn hands it over: (status, JSON)."""
    import asyncio

    incoming = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    never = asyncio.Event()  # the client stays until it has its answer

    async def receive():
        if incoming:
            return incoming.pop(0)
        await never.wait()

    sent = []

    async def send(message):
        sent.append(message)

    await app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
               "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
               "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
               "server": ("127.0.0.1", 80), "headers": [(b"content-type", b"application/json")]},
              receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_a_critique_cut_at_the_budget_is_flagged_where_users_read_it(rm, tmp_path, capsys):
    """docs/RELIABILITY.md row 8 where users read it: the Python API's result, the score and
    critique commands' output rows (and their summary line), and the /v1/score and /get_reward
    answers. One model ends every critique at once, the other runs every one into the budget:
    a flag dropped, or set the same for both, on the way to any of them fails here."""
    import asyncio

    from cloud_jax.cli.critique import main as critique_main
    from cloud_jax.serving.engine import ContinuousBackend
    from cloud_jax.serving.server import build_app
    from cloud_jax.serving.static import StaticBackend
    from cloud_jax.serving.types import BackendOptions, Settings

    pair = json.dumps({"id": "b", "prompt": PROMPTS[1], "chosen": RESPONSES[1],
                       "rejected": RESPONSES[2]}) + "\n"
    src, pairs = tmp_path / "rows.jsonl", tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": PROMPTS[0], "response": RESPONSES[0]}) + "\n"
                   + pair)
    pairs.write_text(pair + pair.replace('"b"', '"c"'))
    for ends in (True, False):
        cut = not ends
        model = _ends_or_runs(rm, ends)
        # The Python API.
        result = model.score(PROMPTS, RESPONSES, num_samples=2, temperature=1.0,
                             max_critique_tokens=BUDGET)
        assert (result.truncated == cut).all(), result.truncated
        assert (result.critique_tokens == (BUDGET if cut else 0)).all()
        ckpt = model.save_pretrained(tmp_path / f"ckpt_{ends}")
        # The score command: each output row's flags, and the summary line.
        out = tmp_path / f"scored_{ends}.jsonl"
        assert main(["--checkpoint", str(ckpt), "--input", str(src), "--output", str(out),
                     "--num-samples", "2", "--temperature", "1.0",
                     "--max-critique-tokens", str(BUDGET)]) == 0
        scored = [json.loads(line) for line in out.read_text().splitlines()]
        assert scored[0]["truncated"] == [cut, cut]
        assert scored[1]["chosen_truncated"] == scored[1]["rejected_truncated"] == [cut, cut]
        assert (f"critiques cut at the token budget (--max-critique-tokens {BUDGET}): "
                f"{6 if cut else 0} of 6 samples") in capsys.readouterr().err
        # The critique command: each rewritten row's flags, and the summary line.
        shards = tmp_path / f"critiques_{ends}"
        assert critique_main(["--checkpoint", str(ckpt), "--input", str(pairs), "--output",
                              str(shards), "--max-critique-tokens", str(BUDGET)]) == 0
        rows = [json.loads(line) for f in sorted(shards.glob("critiques-*.jsonl"))
                for line in f.read_text().splitlines()]
        assert [(r["chosen_feedback_truncated"], r["rejected_feedback_truncated"])
                for r in rows] == [(cut, cut)] * 2
        assert f"): {4 if cut else 0} of 4" in capsys.readouterr().err
        # The server, with either batching: /v1/score's per-item flags and /get_reward's
        # fraction (the continuous engine hands each row's flag over as its row ends). The
        # continuous engine serves /get_reward with the request's own sampling combination and
        # two rows (one compiled pool, batch size 1), which keeps its compiles to seconds.
        sampled = Settings(num_samples=2, temperature=1.0, max_critique_tokens=BUDGET)
        for make, slots, defaults in ((StaticBackend, 4, Settings(max_critique_tokens=BUDGET)),
                                      (ContinuousBackend, 2, sampled)):
            backend = make(model, BackendOptions(slots=slots, max_length=256,
                                                 max_critique_tokens=BUDGET, defaults=defaults))
            assert type(backend) is make
            backend.start()
            try:
                app = build_app(backend, defaults, model.tokenizer)
                status, body = asyncio.run(_post(app, "/v1/score", {
                    "items": [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)],
                    "num_samples": 2, "temperature": 1.0}))
                assert status == 200, (make, body)
                assert [r["truncated"] for r in body["results"]] == [[cut, cut]] * len(PROMPTS), \
                    make
                status, body = asyncio.run(_post(app, "/get_reward", {
                    "query": [f"<bos><|user|>{p}<eot><|assistant|>{r}<eot>"
                              for p, r in zip(PROMPTS, RESPONSES)]}))
                assert status == 200, (make, body)
                assert body["extra_logs"]["truncated_fraction"] == [float(cut)] * len(PROMPTS), \
                    make
            finally:
                backend.close(drain=True)


def test_the_score_command_rewards_both_sides_of_a_pair_after_one_prompt(rm, tmp_path):
    """A preference row's chosen and rejected rewards are compared by their reader: where the
    prompt must be cut to fit, both sides lose the same prompt tokens (the larger cut), as
    evaluate does; the shorter side read more of the prompt than the longer one."""
    prompt = "".join(chr(97 + i % 26) for i in range(300))
    chosen, rejected = "short", "a much longer response " * 3
    tok, limit = rm.tokenizer, 200
    cut = max(len(encode_example(tok, prompt, r, None, "classic", max_length=1 << 30).input_ids)
              for r in (chosen, rejected)) - limit  # the byte tokenizer: one token a character
    assert cut > 0
    expected = rm.score([prompt[cut:]] * 2, [chosen, rejected], max_length=limit,
                        classic=True).rewards
    rm.save_pretrained(tmp_path / "model")
    src, out = tmp_path / "pair.jsonl", tmp_path / "scored.jsonl"
    src.write_text(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    assert main(["--checkpoint", str(tmp_path / "model"), "--input", str(src), "--output",
                 str(out), "--max-length", str(limit), "--classic", "--no-progress"]) == 0
    row = json.loads(out.read_text())
    np.testing.assert_allclose([row["chosen_reward"], row["rejected_reward"]], expected,
                               rtol=1e-5)


def test_an_on_batch_that_is_not_callable_is_refused_before_anything_is_scored(rm, monkeypatch):
    # It failed as "'int' object is not callable" only after the first batch had been sampled.
    import cloud_jax.scoring.rewards as rewards

    def no_forward(*args, **kwargs):
        raise AssertionError("scored before on_batch was checked")

    monkeypatch.setattr(rewards, "_forward_rewards", no_forward)
    monkeypatch.setattr(rewards, "_sampling_params", no_forward)
    for classic in (False, True):
        with pytest.raises(TypeError, match=r"on_batch=5: must be callable .*or None"):
            rm.score(PROMPTS, RESPONSES, max_critique_tokens=BUDGET, classic=classic, on_batch=5)
    with pytest.raises(TypeError, match=r"on_batch='x': must be callable"):
        teacher_forced_rewards(rm, PROMPTS, RESPONSES, ["c"] * 3, on_batch="x")


def test_a_min_prompt_cut_that_is_no_whole_number_is_refused_not_truncated(rm):
    # 1.5 was cut to 1 by int() without a word.
    for fn in (lambda cuts: rm.score(PROMPTS, RESPONSES, max_critique_tokens=BUDGET,
                                     min_prompt_cuts=cuts),
               lambda cuts: teacher_forced_rewards(rm, PROMPTS, RESPONSES, ["c"] * 3,
                                                   min_prompt_cuts=cuts)):
        for bad, shown in (([0, 1.5, 0], "1.5"), (np.array([0.0, 0.0, 2.25]), "2.25"),
                           ([0, "1", 0], "'1'"), ([True, 0, 0], "True")):
            with pytest.raises(ValueError, match=rf"min_prompt_cuts\[\d\]={shown}: .*whole number"):
                fn(bad)
    # Whole numbers of any type are taken.
    want = rm.score(PROMPTS, RESPONSES, max_critique_tokens=BUDGET, min_prompt_cuts=[0, 1, 0])
    for cuts in (np.array([0, 1, 0], np.int64), [0.0, 1.0, 0.0]):
        got = rm.score(PROMPTS, RESPONSES, max_critique_tokens=BUDGET, min_prompt_cuts=cuts)
        np.testing.assert_array_equal(got.rewards, want.rewards)


def test_length_buckets_are_checked_when_the_settings_are_made(rm):
    # A float bucket (64.0) failed as a TypeError deep in np.full at the first batch; a bare
    # number failed in sorted().
    for bad, match in (((256.0, 512), r"length_buckets=\(256\.0, 512\): .*whole numbers >= 1"),
                       ((0, 512), r"length_buckets=\(0, 512\): .*whole numbers >= 1"),
                       (("64",), r"length_buckets=\('64',\): .*whole numbers >= 1"),
                       (64, r"length_buckets=64: .*a list")):
        with pytest.raises(ValueError, match=match):
            rm.score(PROMPTS, RESPONSES, max_critique_tokens=BUDGET, length_buckets=bad)
        with pytest.raises(ValueError, match=match):
            ScoreConfig(length_buckets=bad).validate()
    # Whole numbers of any integer type, in a list or tuple, are taken.
    want = rm.score(PROMPTS, RESPONSES, max_critique_tokens=BUDGET, length_buckets=(256, 512))
    got = rm.score(PROMPTS, RESPONSES, max_critique_tokens=BUDGET,
                   length_buckets=[np.int64(256), 512])
    np.testing.assert_array_equal(got.rewards, want.rewards)
