"""The sampling methods against numpy references on small logits (temperature, top-k with ties,
top-p at its edges, the repetition penalty's sign rule), the draws' distribution, the keys of the
K samples of one input, and the cached decode step against full forwards in fp32 and bfloat16
over left-padded prefixes of different lengths."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cloud_jax.model import CLoudModel, with_shared_prefix
from cloud_jax.model import decode_step as ds
from cloud_jax.model.config import ModelConfig
from cloud_jax.sampling import (Greedy, Temperature, TopK, TopP, method_from, pad_prefixes,
                                penalize_repeats, sample)
from cloud_jax.sampling.loop import prefill
from cloud_jax.sharding import SAMPLE_RULES
from model_helpers import random_params

DRAWS = 20_000
# chi-square, 4 degrees of freedom (5 tokens): P(X > 18.47) = 0.001.
CHI2_4_CRITICAL = 18.47


def _keys(n, seed=0):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def _frequencies(method, logits_v, n=DRAWS, seed=0):
    logits = jnp.broadcast_to(jnp.asarray(logits_v, jnp.float32), (n, len(logits_v)))
    return np.bincount(np.asarray(method(logits, _keys(n, seed))), minlength=len(logits_v))


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _chi2(counts, probs):
    """Pearson's statistic over the tokens of positive probability; a draw of a token of
    probability 0 is a failure by itself."""
    probs = np.asarray(probs, np.float64)
    assert counts[probs == 0].sum() == 0, (counts, probs)
    expected = probs[probs > 0] * counts.sum()
    return float(np.sum((counts[probs > 0] - expected) ** 2 / expected))


LOGITS5 = np.array([2.0, 1.0, 0.5, -1.0, 0.0], np.float32)  # softmax ~ .56 .21 .13 .03 .08


def _nucleus(probs, p):
    """numpy top-p: the fewest most likely tokens (ties to the lower id) whose mass reaches p."""
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros(len(probs), bool)
    keep[order[before < p]] = True
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_temperature_draws_follow_softmax_of_the_scaled_logits(temperature):
    counts = _frequencies(Temperature(temperature), LOGITS5)
    assert _chi2(counts, _softmax(LOGITS5 / temperature)) < CHI2_4_CRITICAL


@pytest.mark.parametrize("k,temperature", [(2, 1.0), (3, 0.7), (3, 2.0)])
def test_top_k_draws_follow_the_renormalised_k_likeliest(k, temperature):
    top = np.argsort(-LOGITS5, kind="stable")[:k]
    probs = np.zeros(5)
    probs[top] = _softmax(LOGITS5[top] / temperature)
    assert _chi2(_frequencies(TopK(k, temperature), LOGITS5), probs) < CHI2_4_CRITICAL


def test_top_k_at_or_past_the_vocabulary_is_plain_temperature():
    want = _softmax(LOGITS5 / 1.3)
    for k in (5, 6, 1000):
        counts = _frequencies(TopK(k, 1.3), LOGITS5)
        assert _chi2(counts, want) < CHI2_4_CRITICAL, k
    # top_k=None is off; 0 is not "off" but an error (there is no k-likeliest set of 0 tokens).
    assert method_from(1.3, top_k=None) == Temperature(1.3)
    with pytest.raises(ValueError, match="top_k=0"):
        method_from(1.3, top_k=0)


def test_top_k_ties_at_the_kth_value_keep_exactly_k_tokens_the_lower_ids_first():
    """Three tokens share the 2nd-largest logit and k=2: the kept set is the top token and the
    lowest id of the tied ones (as greedy breaks ties), never a third token."""
    logits = np.array([0.0, 1.0, 1.0, 3.0, 1.0], np.float32)
    counts = _frequencies(TopK(2), logits)
    probs = np.zeros(5)
    probs[[3, 1]] = _softmax([3.0, 1.0])
    assert _chi2(counts, probs) < 10.83  # 1 degree of freedom, P = 0.001
    # All tied and k below their count: only the k lowest ids, equally often.
    counts = _frequencies(TopK(2), np.zeros(5, np.float32))
    assert counts[2:].sum() == 0 and abs(counts[0] - counts[1]) < 0.05 * DRAWS
    assert np.asarray(Greedy()(jnp.asarray([[1.0, 3.0, 3.0]]), _keys(1))).tolist() == [1]


@pytest.mark.parametrize("p,temperature", [(0.6, 1.0), (0.8, 1.0), (0.8, 2.5), (0.95, 0.7)])
def test_top_p_draws_follow_the_nucleus_of_the_scaled_distribution(p, temperature):
    """The nucleus is taken over the probabilities at the temperature (as Hugging Face's warpers
    run: temperature, then top-p): at 2.5 the 0.8-nucleus holds more tokens than at 1."""
    want = _nucleus(_softmax(LOGITS5 / temperature), p)
    counts = _frequencies(TopP(p, temperature), LOGITS5)
    assert _chi2(counts, want) < CHI2_4_CRITICAL


def test_top_p_edges():
    # p = 1: every token can be drawn, with its full probability.
    assert _chi2(_frequencies(TopP(1.0), LOGITS5), _softmax(LOGITS5)) < CHI2_4_CRITICAL
    # A tiny p keeps the most likely token only, even where it alone holds little mass.
    flat = np.array([0.01, 0.0, 0.02, 0.0, 0.0], np.float32)
    assert (_frequencies(TopP(1e-6), flat, n=500) == [0, 0, 500, 0, 0]).all()
    # The boundary: a token is kept while the mass before it is below p, so the nucleus is the
    # fewest tokens reaching p. With 0.56 on the top token, p = 0.5 keeps it alone; p = 0.6 the
    # top two.
    top = _softmax(LOGITS5)[0]
    assert 0.5 < top < 0.6
    assert set(np.flatnonzero(_frequencies(TopP(0.5), LOGITS5, n=2000))) == {0}
    assert set(np.flatnonzero(_frequencies(TopP(0.6), LOGITS5, n=2000))) == {0, 1}
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="top_p"):
            TopP(bad)


def test_temperature_zero_is_greedy_whatever_the_filter():
    logits = jnp.asarray([[0.1, 4.0, 4.0, -2.0], [9.0, 1.0, 8.9, 0.0]], jnp.float32)
    for kwargs in ({}, dict(top_k=2), dict(top_p=0.5)):
        method = method_from(0.0, **kwargs)
        assert method == Greedy()
        assert np.asarray(method(logits, _keys(2))).tolist() == [1, 0]


def test_repetition_penalty_by_hand():
    """Hugging Face's (and CTRL's) rule on seen tokens only: a positive logit divided by the
    penalty, a negative one multiplied, 0 left at 0 (a penalty below 1 favours seen tokens)."""
    logits = jnp.asarray([[2.0, -2.0, 0.0, 3.0, -1.0]], jnp.float32)
    seen = jnp.asarray([[True, True, True, False, False]])
    np.testing.assert_allclose(np.asarray(penalize_repeats(logits, seen, 2.0)),
                               [[1.0, -4.0, 0.0, 3.0, -1.0]])
    np.testing.assert_allclose(np.asarray(penalize_repeats(logits, seen, 0.5)),
                               [[4.0, -1.0, 0.0, 3.0, -1.0]])
    np.testing.assert_array_equal(np.asarray(penalize_repeats(logits, seen, 1.0)),
                                  np.asarray(logits))


CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2)
EOT = 62
PREFIXES = [[1, 5, 9, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11], [20]]


@pytest.fixture(scope="module")
def hot_params():
    # Larger weights than N(0, 0.1): a peaked-enough distribution that samples differ yet repeat.
    return jax.tree.map(lambda x: 4 * x, random_params(CFG, 0))


def test_the_k_samples_of_an_input_draw_apart_and_a_seed_reproduces_them(hot_params):
    settings = dict(max_new_tokens=8, stop_ids=(EOT,), num_samples=4, method=Temperature(1.0))
    out = sample(CFG, hot_params, PREFIXES, seed=11, **settings)
    for b in range(len(PREFIXES)):
        critiques = {tuple(out.critique_ids(b, k)) for k in range(4)}
        assert len(critiques) == 4, b  # each sample its own key: no two samples alike
    again = sample(CFG, hot_params, PREFIXES, seed=11, **settings)
    np.testing.assert_array_equal(again.tokens, out.tokens)
    np.testing.assert_array_equal(again.rewards, out.rewards)
    other = sample(CFG, hot_params, PREFIXES, seed=12, **settings)
    assert not np.array_equal(other.tokens, out.tokens)


def test_a_budget_of_one_token(hot_params):
    out = sample(CFG, hot_params, PREFIXES, max_new_tokens=1, stop_ids=(EOT,))
    greedy = sample(CFG, hot_params, PREFIXES, max_new_tokens=6, stop_ids=(EOT,))
    for b in range(len(PREFIXES)):
        first = greedy.critique_ids(b, 0)[:1]
        assert out.critique_ids(b, 0) == first
        # Cut by the budget unless the greedy draw after the first token is a stop token (a
        # stop drawn at the budget's end is a natural end, not a cut).
        assert out.truncated[b, 0] == (greedy.lengths[b, 0] > 1), b
    assert out.truncated.any()


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 0.05)])
def test_cached_decode_steps_equal_full_forwards_over_left_padded_prefixes(dtype, tol):
    """Prefill over left-padded prefixes of lengths 4, 9 and 1, then three decode steps with two
    samples per input (different tokens each): every step's logits and rewards are those of a
    full forward, without a cache, over the prefix and the tokens fed so far."""
    cfg = dataclasses.replace(CFG, dtype=dtype).validate()
    # Weights large enough that the logits spread over several units, so that a tolerance for
    # bfloat16's rounding still tells a wrong position or slot apart.
    params = jax.tree.map(lambda x: 3 * x, random_params(cfg, 3))
    model = CLoudModel(cfg)
    k, steps, width = 2, 3, 12
    ids, mask = pad_prefixes(PREFIXES, width, side="left")
    logits_b, cache = prefill(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg,
                              cache_len=width, rules=tuple(SAMPLE_RULES))
    cache = with_shared_prefix(cfg, cache, len(PREFIXES) * k, steps)
    fed = np.random.default_rng(1).integers(1, cfg.vocab_size, (len(PREFIXES) * k, steps))

    @jax.jit
    def full(ids_bl, mask_bl):
        out = model.apply({"params": params}, ids_bl, mask_bl,
                          reward_index_b=jnp.full((ids_bl.shape[0],), ids_bl.shape[1] - 1))
        return out.logits[:, -1], out.rewards

    def reference(t):  # rows b * k + s over prefix b and fed[row, :t]
        seqs = [PREFIXES[r // k] + fed[r, :t].tolist() for r in range(len(PREFIXES) * k)]
        ids_r, mask_r = pad_prefixes(seqs, width + t, side="left")
        logits, rewards = full(jnp.asarray(ids_r), jnp.asarray(mask_r))
        return np.asarray(logits), np.asarray(rewards)

    want, _ = reference(0)
    np.testing.assert_allclose(np.repeat(np.asarray(logits_b), k, axis=0), want, atol=tol,
                               rtol=0)
    for t in range(steps):
        live = jnp.ones(len(PREFIXES) * k, bool)
        logits, rewards, cache = ds.decode_step(params, None, cfg, jnp.asarray(fed[:, t]), live,
                                                cache)
        want_logits, want_rewards = reference(t + 1)
        np.testing.assert_allclose(np.asarray(logits), want_logits, atol=tol, rtol=0)
        np.testing.assert_allclose(np.asarray(rewards), want_rewards, atol=tol, rtol=0)


@pytest.mark.parametrize("layout", ["standard", "feature_major"])
def test_a_bfloat16_greedy_critique_follows_full_forwards(layout):
    """The whole decode loop in bfloat16 (cache, prefix segment, phases) over left-padded inputs
    of different lengths: each greedy token is the most likely one of a full forward over the
    sequence so far, up to bfloat16's rounding of nearly tied logits, and each reward is the full
    forward's at the end-of-turn token."""
    cfg = dataclasses.replace(CFG, dtype="bfloat16").validate()
    params = jax.tree.map(lambda x: 3 * x, random_params(cfg, 3))
    model = CLoudModel(cfg)
    out = sample(cfg, params, PREFIXES, max_new_tokens=6, stop_ids=(EOT,), decode_layout=layout)
    assert (out.lengths > 0).any()
    for b, prefix in enumerate(PREFIXES):
        seq = prefix + out.critique_ids(b, 0) + [EOT]
        ids = jnp.asarray([seq])
        full = model.apply({"params": params}, ids, jnp.ones_like(ids),
                           reward_index_b=jnp.asarray([len(seq) - 1]))
        logits = np.asarray(full.logits[0])
        for t, token in enumerate(out.critique_ids(b, 0)):
            row = logits[len(prefix) + t - 1]
            assert row[token] >= row.max() - 0.05, (b, t)
        np.testing.assert_allclose(out.rewards[b, 0], float(full.rewards[0]), atol=0.05, rtol=0)


def test_a_top_k_that_is_no_whole_number_is_a_clear_error():
    """top_k=2.0 (a YAML or JSON number, a Python float) passed every check and failed at the
    first draw inside the sampler ("Shapes must be 1D sequences of concrete values of integer
    type"), naming no setting; True was taken for k=1."""
    from cloud_jax.scoring.rewards import ScoreConfig

    for bad in (2.0, 2.5, True):
        with pytest.raises(ValueError, match=rf"top_k={bad!r}: must be a whole number >= 1"):
            TopK(bad)
        with pytest.raises(ValueError, match=rf"top_k={bad!r}: must be a whole number >= 1"):
            ScoreConfig(temperature=1.0, top_k=bad).validate()
    assert TopK(np.int64(3)).k == 3
    assert np.asarray(TopK(np.int64(2))(jnp.asarray([[0.0, 5.0, 4.0]]), _keys(1))).shape == (1,)
