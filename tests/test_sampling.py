"""The KV-cache sampler against full forwards: greedy tokens, in-loop rewards, padding, batching."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloud_jax.model.config import ModelConfig
from cloud_jax.model import CLoudModel, param_shapes
from cloud_jax.sampling import (Greedy, Temperature, TopK, TopP, bucket_length, method_from,
                                pad_prefixes, sample, sample_padded)

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2)
EOT = 62
PREFIXES = [[1, 5, 9, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [20], [7, 7, 30, 31, 2, 9]]


def random_params(cfg, seed):
    """Random weights without compiling the initialiser (which costs seconds per test file)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype),
                        param_shapes(cfg))


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, 0)


@pytest.fixture(scope="module")
def full_forward(params):
    """(logits [T, V], reward at the last token) of one causal forward over a sequence: the
    logits at t are those of a full forward over its first t + 1 tokens."""
    model = CLoudModel(CFG)
    width = 32  # right padding to one shape, so the reference compiles once

    @jax.jit
    def fwd(ids, mask, last):
        out = model.apply({"params": params}, ids[None], mask[None], reward_index_b=last[None])
        return out.logits[0], out.rewards[0]

    def run(seq):
        ids, mask = pad_prefixes([seq], width, side="right")
        logits, reward = fwd(jnp.asarray(ids[0]), jnp.asarray(mask[0]), jnp.asarray(len(seq) - 1))
        return np.asarray(logits)[:len(seq)], float(reward)

    return run


def check_against_full_forward(out, prefixes, stop_ids, max_new, full_forward):
    """Every greedy token is the argmax of a full forward over the sequence so far; each reward
    is the full-forward reward over prefix + critique + end-of-turn."""
    for b, prefix in enumerate(prefixes):
        for k in range(out.tokens.shape[1]):
            critique = out.critique_ids(b, k)
            logits, reward = full_forward(prefix + critique + [stop_ids[0]])
            for t in range(len(critique) + 1):
                predicted = int(np.argmax(logits[len(prefix) + t - 1]))
                if t < len(critique):
                    assert predicted == critique[t], (b, k, t)
                elif out.truncated[b, k]:
                    assert len(critique) == max_new
                else:
                    assert predicted in stop_ids
            assert np.all(out.tokens[b, k, len(critique):] == 0)
            np.testing.assert_allclose(out.rewards[b, k], reward, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["standard", "feature_major"])
def test_greedy_decode_and_rewards_equal_full_forward(params, full_forward, layout):
    probe = sample(CFG, params, PREFIXES, max_new_tokens=6, stop_ids=(EOT,),
                   decode_layout=layout)
    # A second stop id that row 0 draws at step 3 (and not before): that row stops, the others
    # most likely run into the budget.
    stop = int(probe.tokens[0, 0, 3])
    assert stop not in probe.tokens[0, 0, :3]
    out = sample(CFG, params, PREFIXES, max_new_tokens=6, stop_ids=(EOT, stop),
                 decode_layout=layout)
    check_against_full_forward(out, PREFIXES, (EOT, stop), 6, full_forward)
    assert out.lengths[0, 0] == 3 and not out.truncated[0, 0]
    assert out.truncated.any()


# Tests share shapes and settings where they can: each new combination is one more compile.
MORE_PREFIXES = PREFIXES + [[40, 41], [2, 4, 6, 8, 10], [33] * 7, [12, 13, 14]]
RANDOM = dict(max_new_tokens=6, stop_ids=(EOT, 5), num_samples=2, method=TopK(20, 1.5), seed=7)


def test_left_and_right_padding_agree(params):
    left = sample_padded(CFG, params, *pad_prefixes(MORE_PREFIXES, 16, side="left"), **RANDOM)
    right = sample_padded(CFG, params, *pad_prefixes(MORE_PREFIXES, 16, side="right"), **RANDOM)
    np.testing.assert_array_equal(left.tokens, right.tokens)
    np.testing.assert_allclose(left.rewards, right.rewards, atol=1e-5, rtol=0)


def test_greedy_samples_all_equal_single_greedy(params):
    one = sample(CFG, params, PREFIXES, max_new_tokens=6, stop_ids=(EOT,))
    three = sample(CFG, params, PREFIXES, max_new_tokens=6, stop_ids=(EOT,), num_samples=3,
                   method=method_from(temperature=0.0))
    for k in range(3):
        np.testing.assert_array_equal(three.tokens[:, k], one.tokens[:, 0])
        np.testing.assert_allclose(three.rewards[:, k], one.rewards[:, 0], atol=1e-6, rtol=0)


def test_same_seed_same_samples_at_any_batch_size_and_order(params):
    whole = sample(CFG, params, MORE_PREFIXES, **RANDOM)
    assert len({tuple(t) for t in whole.tokens.reshape(-1, 6)}) > 8  # samples really differ

    def in_chunks(order, size):
        parts = [sample(CFG, params, [MORE_PREFIXES[i] for i in order[s:s + size]], **RANDOM)
                 for s in range(0, len(order), size)]
        tokens = np.concatenate([p.tokens for p in parts])
        rewards = np.concatenate([p.rewards for p in parts])
        back = np.argsort(order)
        return tokens[back], rewards[back]

    # Batch sizes 1, 3 (over the first six inputs) and 8 in a shuffled order.
    for order, size in [(np.arange(8), 1), (np.arange(6), 3),
                        (np.array([5, 2, 7, 0, 3, 6, 1, 4]), 8)]:
        tokens, rewards = in_chunks(order, size)
        np.testing.assert_array_equal(tokens, whole.tokens[:len(order)])
        np.testing.assert_allclose(rewards, whole.rewards[:len(order)], atol=1e-5, rtol=0)


def test_zero_token_budget_forces_end_of_turn(params, full_forward):
    out = sample(CFG, params, PREFIXES, max_new_tokens=0, stop_ids=(EOT,))
    assert out.tokens.shape == (4, 1, 0) and (out.lengths == 0).all()
    check_against_full_forward(out, PREFIXES, (EOT,), 0, full_forward)


def test_empty_critique_ends_in_eot_with_finite_reward(params, full_forward):
    first = int(sample(CFG, params, PREFIXES, max_new_tokens=6, stop_ids=(EOT,)).tokens[0, 0, 0])
    out = sample(CFG, params, PREFIXES, max_new_tokens=6, stop_ids=(EOT, first))
    assert out.lengths[0, 0] == 0 and not out.truncated[0, 0]
    assert np.isfinite(out.rewards).all()
    check_against_full_forward(out, PREFIXES, (EOT, first), 6, full_forward)


def test_a_pad_id_outside_the_vocabulary_is_never_read(params):
    """A tokenizer's pad token may have no row in the embedding (a pad added after training):
    pads are never attended, so the critiques and rewards are those of an in-vocabulary pad (it
    was NaN rewards and critiques of token 0 for every padded input)."""
    want = sample(CFG, params, PREFIXES, max_new_tokens=3, stop_ids=(EOT,))
    for layout in ("standard", "feature_major"):
        got = sample(CFG, params, PREFIXES, max_new_tokens=3, stop_ids=(EOT,),
                     pad_id=CFG.vocab_size, decode_layout=layout)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        written = np.arange(3)[None, None, :] < want.lengths[..., None]
        np.testing.assert_array_equal(np.where(written, got.tokens, 0), want.tokens)
        assert (got.tokens[~written] == CFG.vocab_size).all()
        np.testing.assert_allclose(got.rewards, want.rewards, atol=1e-5, rtol=0)


def test_token_ids_outside_the_vocabulary_are_clear_errors(params):
    # They were read as NaN embeddings (or, negative, as other tokens): NaN rewards, no error.
    for bad in (CFG.vocab_size, -1):
        with pytest.raises(ValueError, match=rf"input 1: token id {bad} at position 1 is not "
                                             rf"in the model's vocabulary \[0, 64\)"):
            sample(CFG, params, [[1, 2], [3, bad, 4]], max_new_tokens=2, stop_ids=(EOT,))
        with pytest.raises(ValueError, match=rf"stop_ids: {bad} is not in the model's "
                                             rf"vocabulary \[0, 64\)"):
            sample(CFG, params, PREFIXES, max_new_tokens=2, stop_ids=(EOT, bad))


def test_budgets_of_the_wrong_shape_are_clear_errors(params):
    # A broadcasting TypeError inside the decode; one budget for 4 inputs (K=1) was taken by all.
    for budgets in ([2, 3], [2], [[2], [2], [2], [2]], [2, -1, 2, 2]):
        with pytest.raises(ValueError, match=r"budgets: one critique budget >= 0 per input "
                                             r"\(4 inputs\)"):
            sample(CFG, params, PREFIXES, max_new_tokens=2, stop_ids=(EOT,), budgets=budgets)


def test_methods_draw_from_the_right_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000, jnp.float32))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(2000))
    freq = lambda toks: np.bincount(np.asarray(toks), minlength=4) / 2000  # noqa: E731
    np.testing.assert_allclose(freq(Temperature(1.0)(logits, keys)), [0.5, 0.3, 0.15, 0.05],
                               atol=0.03)
    np.testing.assert_allclose(freq(TopK(2)(logits, keys)), [0.625, 0.375, 0, 0], atol=0.03)
    # The top tokens reaching p=0.7 are the first two (0.5 + 0.3); the third is never drawn.
    np.testing.assert_allclose(freq(TopP(0.7)(logits, keys)), [0.625, 0.375, 0, 0], atol=0.03)
    assert (np.asarray(Greedy()(logits, keys)) == 0).all()
    assert (np.asarray(TopK(1)(logits, keys)) == 0).all()
    assert (np.asarray(TopP(0.1)(logits, keys)) == 0).all()
    low = freq(Temperature(0.25)(logits, keys))
    assert low[0] > 0.85


def test_top_p_of_one_cuts_nothing():
    """top_p=1.0 is no nucleus at all: in float32 the cumulative mass before a token of a
    probability of a few 1e-7 rounds to 1.0, which the cut ``mass_before < p`` dropped, so a
    token the temperature alone draws was never drawn. It now draws what the temperature
    alone draws, for every uniform number."""
    rng = np.random.default_rng(0)
    raw = [rng.normal(size=64) * 3 for _ in range(45)][-1]
    logits = jnp.asarray(raw, jnp.float32)[None]
    probs = jax.nn.softmax(jnp.sort(logits, axis=-1)[:, ::-1], axis=-1)
    assert float((jnp.cumsum(probs, axis=-1) - probs)[0, -1]) >= 1.0  # what the cut dropped
    rare = int(np.argmin(raw))  # that token: probability 3.6e-7
    u = jnp.asarray([0.90794736], jnp.float32)  # where the temperature alone draws it
    for t in (1.0, 0.7):
        us = jnp.concatenate([u, jnp.linspace(0.0, 1.0, 4001, endpoint=False)])
        rows = jnp.repeat(logits, us.shape[0], axis=0)
        expected = np.asarray(Temperature(t).draw(rows, us))
        np.testing.assert_array_equal(np.asarray(TopP(1.0, t).draw(rows, us)), expected)
        if t == 1.0:
            assert expected[0] == rare  # drawn by both


@pytest.mark.parametrize("temperature", [1e-37, 1e-39, 5e-324])
def test_a_tiny_temperature_draws_as_greedy_does(temperature):
    """logits / T overflows (and a subnormal T is flushed to 0 on CPU): the draw must still be the
    most likely token, not token 0 or whatever NaN probabilities give."""
    logits = jnp.asarray([[0.0, 1.0, 5.0, 2.0], [-3.0, 40.0, 50.0, 49.0]], jnp.float32)
    keys = jax.random.split(jax.random.key(0), 2)
    for method in (method_from(temperature), method_from(temperature, top_k=3),
                   method_from(temperature, top_p=0.9)):
        assert np.asarray(method(logits, keys)).tolist() == [2, 2], method


def test_bad_settings_are_clear_errors(params):
    with pytest.raises(ValueError, match="temperature"):
        Temperature(0.0)
    with pytest.raises(ValueError, match="top_k or top_p"):
        method_from(1.0, top_k=3, top_p=0.5)
    # The knobs of the command line and the server: no Python-only advice, no uniform draws.
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=r"must be a finite number >= 0 \(0 is greedy\)"):
            method_from(bad)
    # At temperature 0 the filters are unused, but a bad one is still an error, not ignored.
    for kwargs, message in ((dict(top_k=3, top_p=0.5), "top_k or top_p"),
                            (dict(top_k=0), "top_k=0"), (dict(top_p=1.5), "top_p=1.5")):
        with pytest.raises(ValueError, match=message):
            method_from(0.0, **kwargs)
    assert method_from(0.0, top_p=0.9) == Greedy()
    with pytest.raises(ValueError, match="stop_ids"):
        sample(CFG, params, PREFIXES, max_new_tokens=2, stop_ids=())
    # Keys hold 32 bits: a larger seed would repeat a smaller one's critiques, or overflow.
    for seed in (-1, 2**32 + 1, 2**63, 1.5, True):
        with pytest.raises(ValueError, match=r"seed=.*\[0, 2\*\*32\)"):
            sample(CFG, params, PREFIXES, max_new_tokens=2, stop_ids=(EOT,), seed=seed)
    with pytest.raises(ValueError, match="largest prefill bucket"):
        bucket_length(40, buckets=(16, 32))
    assert bucket_length(17) == 32 and bucket_length(3) == 16 and bucket_length(20, (24, 64)) == 24


@pytest.mark.parametrize("tied", [False, True])
def test_step_logits_equal_logits(tied):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    params = random_params(cfg, 1)
    hidden_nd = jnp.asarray(np.random.default_rng(2).normal(size=(5, cfg.hidden_size)),
                            jnp.float32)
    model = CLoudModel(cfg)
    want = model.apply({"params": params}, hidden_nd, method=CLoudModel.logits)
    got = model.apply({"params": params}, hidden_nd, method=CLoudModel.step_logits)
    assert got.shape == (5, cfg.vocab_size) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def _attention_inputs(seed, t, groups=2, rows=3):
    """Random q, k, v, mask and a shared prefix (k, v, mask) for :func:`gqa_attention`."""
    rng = np.random.default_rng(seed)
    h, kv, d, p, s = 4, 2, 8, 5, 6
    b = groups * rows
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    q, k, v = normal(b, t, h, d), normal(b, kv, s, d), normal(b, kv, s, d)
    pk, pv = normal(groups, kv, p, d), normal(groups, kv, p, d)
    pmask = jnp.asarray(rng.random((b, t, p)) < 0.7)
    mask = jnp.asarray(rng.random((b, t, s)) < 0.6)
    return q, k, v, mask, (pk, pv, pmask)


def test_prefix_attention_equals_attention_over_concatenated_keys():
    """The shared-prefix branch equals plain attention over [prefix copied to each row, own keys],
    one softmax over both, with masked slots in both segments."""
    from cloud_jax.model.layers import gqa_attention

    rows = 3
    q, k, v, mask, (pk, pv, pmask) = _attention_inputs(3, t=2, rows=rows)
    got = gqa_attention(q, k, v, mask, (pk, pv, pmask))
    want = gqa_attention(q, jnp.concatenate([jnp.repeat(pk, rows, axis=0), k], axis=2),
                         jnp.concatenate([jnp.repeat(pv, rows, axis=0), v], axis=2),
                         jnp.concatenate([pmask, mask], axis=2))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_repetition_penalty_equals_hugging_face_over_full_forwards(params, full_forward):
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    penalty = 1.8
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    plain = sample(CFG, params, PREFIXES, max_new_tokens=8, stop_ids=(EOT,))
    out = sample(CFG, params, PREFIXES, max_new_tokens=8, stop_ids=(EOT,),
                 repetition_penalty=penalty)
    assert not np.array_equal(out.tokens, plain.tokens)  # the penalty changes what is drawn
    for b, prefix in enumerate(PREFIXES):
        critique = out.critique_ids(b, 0)
        logits, reward = full_forward(prefix + critique + [EOT])
        for t in range(len(critique) + 1):
            so_far = torch.tensor([prefix + critique[:t]])
            scores = processor(so_far, torch.tensor(logits[len(prefix) + t - 1][None]))
            predicted = int(scores.argmax())
            if t < len(critique):
                assert predicted == critique[t], (b, t)
            elif not out.truncated[b, 0]:
                assert predicted == EOT
        np.testing.assert_allclose(out.rewards[b, 0], reward, atol=1e-5, rtol=0)


def test_repetition_penalty_keeps_samples_independent_of_the_batch(params):
    settings = dict(RANDOM, repetition_penalty=1.3)
    whole = sample(CFG, params, MORE_PREFIXES, **settings)
    part = sample(CFG, params, MORE_PREFIXES[5:1:-1], **settings)
    np.testing.assert_array_equal(part.tokens, whole.tokens[5:1:-1])
    with pytest.raises(ValueError, match="repetition_penalty"):
        sample(CFG, params, PREFIXES, max_new_tokens=2, stop_ids=(EOT,), repetition_penalty=0.0)
    # An infinite penalty would make a seen token's logit of exactly 0 a NaN (0 * inf).
    from cloud_jax.sampling.methods import check_repetition_penalty
    with pytest.raises(ValueError, match=r"repetition_penalty=inf: must be a finite number > 0"):
        check_repetition_penalty(float("inf"))


def test_attention_over_transposed_keys_is_the_same():
    """Keys stored [.., D, S] (the feature-major decode's cache) give the same attention, with a
    prefix segment and without."""
    from cloud_jax.model.layers import gqa_attention

    q, k, v, mask, (pk, pv, pmask) = _attention_inputs(4, t=1)
    kt, pkt = jnp.swapaxes(k, 2, 3), jnp.swapaxes(pk, 2, 3)
    for prefix, prefix_t in (((pk, pv, pmask), (pkt, pv, pmask)), (None, None)):
        want = gqa_attention(q, k, v, mask, prefix)
        got = gqa_attention(q, kt, v, mask, prefix_t, keys_transposed=True)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["standard", "feature_major"])
def test_checking_for_the_end_every_few_steps_gives_the_same_critiques(params, layout):
    """steps_per_check = C runs C steps between two checks of whether every row has ended: the
    steps past the last row's end change nothing, and the phases' caches round up to whole
    checks. 70 new tokens: four phases (18, 36, 54, 71 slots; with C = 8: 24, 40, 56, 72)."""
    settings = dict(max_new_tokens=70, stop_ids=(EOT,), num_samples=2, method=TopK(20, 1.5),
                    seed=3, budgets=[70, 9, 70, 33], decode_layout=layout)
    every = sample(CFG, params, PREFIXES, **settings)
    # Rows end at different steps: by a stop token, by their own budget, at the last step.
    assert len(set(every.lengths.ravel().tolist())) > 2 and every.truncated.any()
    assert (every.lengths == 70).any() and not every.truncated.all()
    for c in (3, 8, 100):
        out = sample(CFG, params, PREFIXES, steps_per_check=c, **settings)
        np.testing.assert_array_equal(out.tokens, every.tokens)
        np.testing.assert_array_equal(out.lengths, every.lengths)
        np.testing.assert_array_equal(out.truncated, every.truncated)
        np.testing.assert_allclose(out.rewards, every.rewards, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="steps_per_check"):
        sample(CFG, params, PREFIXES, steps_per_check=0, **settings)


@pytest.mark.parametrize("layout", ["standard", "feature_major"])
def test_any_number_of_decode_phases_gives_the_same_critiques(params, layout):
    """decode_phases = P grows the critiques' cache in P loops: fewer loops read more empty
    slots a step (and compile faster), more read fewer; the critiques and rewards are the same.
    70 new tokens: 1 phase (71 slots), 2 (36, 71), 4 (18, 36, 54, 71), 8 (9, 18, ..., 71); with
    steps_per_check 8 each rounds up to whole checks. (More phases than slots: phase_lengths'
    test.)"""
    settings = dict(max_new_tokens=70, stop_ids=(EOT,), num_samples=2, method=TopK(20, 1.5),
                    seed=3, budgets=[70, 9, 70, 33], decode_layout=layout)
    four = sample(CFG, params, PREFIXES, decode_phases=4, **settings)
    assert (four.lengths > 54).any()  # the decode reached its last phase
    for phases, c in ((1, 1), (2, 1), (8, 1), (1, 8), (2, 8)):
        out = sample(CFG, params, PREFIXES, decode_phases=phases, steps_per_check=c, **settings)
        np.testing.assert_array_equal(out.tokens, four.tokens)
        np.testing.assert_array_equal(out.lengths, four.lengths)
        np.testing.assert_array_equal(out.truncated, four.truncated)
        np.testing.assert_allclose(out.rewards, four.rewards, atol=1e-5, rtol=0)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="decode_phases"):
            sample(CFG, params, PREFIXES, decode_phases=bad, **settings)


def test_a_step_uniform_table_holds_the_numbers_each_step_would_draw_with_its_folded_key():
    """The decode loop makes every step's uniform number before the loop (step_uniforms) instead
    of folding the step into each row's key inside every step: the same numbers, so the same
    critiques, and each method draws the same token from a number as from the key it came from."""
    from cloud_jax.sampling.methods import step_uniforms, uniforms

    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(7), r))(jnp.arange(5))
    table = np.asarray(step_uniforms(keys, 11))
    assert table.shape == (5, 11) and ((table >= 0) & (table < 1)).all()
    for t in (0, 3, 10):
        folded = jax.vmap(lambda key: jax.random.fold_in(key, t))(keys)
        np.testing.assert_array_equal(table[:, t], np.asarray(uniforms(folded)))
    assert len(np.unique(table)) == table.size  # rows and steps draw apart
    logits = jax.random.normal(jax.random.key(1), (5, 300)) * 3
    for method in (Temperature(0.7), TopK(9, 1.3), TopP(0.8, 1.1), Greedy()):
        for t in (0, 4):
            folded = jax.vmap(lambda key: jax.random.fold_in(key, t))(keys)
            np.testing.assert_array_equal(np.asarray(method.draw(logits, table[:, t])),
                                          np.asarray(method(logits, folded)))
