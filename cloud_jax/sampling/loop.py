"""Critiques and their rewards in two compiled calls: a prefill, then a ``lax.while_loop`` decode.

    out = sample(cfg, params, prefixes, max_new_tokens=256, stop_ids=(eot,), num_samples=K,
                 method=Temperature(0.8), seed=0)
    out.tokens [B,K,M], out.lengths [B,K], out.rewards [B,K] fp32, out.truncated [B,K]

Prefill runs once per input over a batch padded to a length bucket (left or right padding both
work: positions and validity come from the mask). Its cache becomes a shared prefix segment that
the K samples of an input all read, stored and read from memory once per input rather than once
per sample; each sample's own tokens go to a separate segment, grown in phases
(:func:`phase_lengths`) so that early steps do not attend over slots that later steps fill. Each
decode step (:func:`cloud_jax.model.decode_step.decode_step`, in the layout
:func:`~cloud_jax.model.decode_step.decode_layout` picks for the machine) chooses one token per
row; a row ends its critique when it draws a stop token or when the budget of ``max_new_tokens`` critique tokens is spent (then it is flagged
truncated). Either way the next token fed is the end-of-turn token ``stop_ids[0]``, and the reward
is read from the hidden state of that very step, so a critique's reward costs no second forward
over prefix + critique. Tokens after a row's end are ``pad_id``.

Random keys are ``fold_in(fold_in(fold_in(key(seed), row_id), sample), step)``: a row's critique
depends on the seed, its row id and its sample index only, never on the batch it shares. The
uniform number each step's draw reads from its key is made for every step before the loop
(:func:`~cloud_jax.sampling.methods.step_uniforms`).

With ``repetition_penalty`` != 1, each row carries the set of tokens it holds (its prefix, then
its critique so far) and the next-token logits of those are penalized as Hugging Face's
``generate`` does, before the sampling method; a row's set is its own, so the result is still
independent of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from cloud_jax.model.config import ModelConfig
from cloud_jax.model import (CLoudModel, KVCache, init_cache, last_attended_index, mesh_context,
                             with_shared_prefix)
from cloud_jax.model.decode_step import (DecodeWeights, check_layout, decode_step,
                                         prepare_decode_weights, rope_table)
from cloud_jax.model.decode_step import decode_layout as default_layout
from cloud_jax.sampling.methods import (Greedy, SamplingMethod, check_repetition_penalty,
                                        check_seed, penalize_repeats, step_uniforms)
from cloud_jax.sharding import SAMPLE_RULES, Rules


# The loops a decode grows its critiques' cache in, by default (:func:`phase_lengths`).
DECODE_PHASES = 4


@flax.struct.dataclass
class DecodeState:
    """Carry of the decode loop; N = inputs x samples rows."""

    step: jax.Array  # [] int32: index of the critique token chosen by the next iteration
    cache: KVCache
    logits_nv: jax.Array  # fp32, next-token logits of every row
    tokens_nm: jax.Array  # int32 [N, M+1]: the critique so far, pad_id after its end
    lengths_n: jax.Array  # int32: critique tokens written, the end-of-turn token excluded
    done_n: jax.Array  # bool: end-of-turn fed and reward read
    truncated_n: jax.Array  # bool: ended by the budget, not by a stop token
    rewards_n: jax.Array  # fp32, valid where done
    keys_n: jax.Array  # per-row keys, folded with the step at each draw
    # bool [N, V]: tokens the row holds, for the repetition penalty (None without one).
    seen_nv: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """Host-side result; B inputs, K samples each, M = max_new_tokens."""

    tokens: np.ndarray  # int32 [B, K, M], pad_id after each critique
    lengths: np.ndarray  # int32 [B, K]
    rewards: np.ndarray  # float32 [B, K]
    truncated: np.ndarray  # bool [B, K]

    def critique_ids(self, b: int, k: int) -> list[int]:
        return self.tokens[b, k, :self.lengths[b, k]].tolist()


def bucket_length(n: int, buckets: Optional[Sequence[int]] = None) -> int:
    """The smallest bucket >= n; default buckets are the powers of two from 16, so a batch of any
    length compiles to one of a few shapes."""
    if buckets:
        fitting = [b for b in sorted(buckets) if b >= n]
        if not fitting:
            raise ValueError(f"a prefix of {n} tokens is longer than the largest prefill bucket "
                             f"{max(buckets)}; add a larger bucket or shorten the inputs")
        return fitting[0]
    return max(16, 1 << max(n - 1, 0).bit_length())


def pad_prefixes(prefixes: Sequence[Sequence[int]], length: int, pad_id: int = 0,
                 side: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids [B, length] int32, mask [B, length] int32), padded on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r}: expected 'left' or 'right'")
    ids = np.full((len(prefixes), length), pad_id, np.int32)
    mask = np.zeros((len(prefixes), length), np.int32)
    for i, p in enumerate(prefixes):
        if not 0 < len(p) <= length:
            raise ValueError(f"input {i}: prefix of {len(p)} tokens does not fit length {length} "
                             "(it must hold at least one token)")
        cols = slice(length - len(p), length) if side == "left" else slice(0, len(p))
        ids[i, cols] = p
        mask[i, cols] = 1
    return ids, mask


def content_row_ids(prefixes: Sequence[Sequence[int]]) -> np.ndarray:
    """A uint32 id per input from its tokens: the same input gets the same random stream in any
    batch, at any position."""
    out = np.empty(len(prefixes), np.uint32)
    for i, p in enumerate(prefixes):
        digest = hashlib.blake2b(np.asarray(p, np.int64).tobytes(), digest_size=4).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "rules"))
def prefill(params, ids_bl, mask_bl, *, cfg: ModelConfig, cache_len: int, rules: Rules):
    """Writes the prefixes into a fresh cache of ``cache_len`` slots; returns (next-token logits
    [B, V] fp32 read at each row's last attended token, cache)."""
    model = CLoudModel(cfg)
    with nn.logical_axis_rules(rules):
        cache = init_cache(cfg, ids_bl.shape[0], cache_len)
        hidden_bld, cache = model.apply({"params": params}, ids_bl, mask_bl, cache=cache,
                                        method=CLoudModel.hidden_states)
        last_b = last_attended_index(mask_bl)
        hidden_bd = jnp.take_along_axis(hidden_bld, last_b[:, None, None], axis=1)[:, 0]
        logits_bv = model.apply({"params": params}, hidden_bd, method=CLoudModel.logits)
    return logits_bv, cache


def seen_tokens(ids_bl, mask_bl, vocab_size: int) -> jax.Array:
    """bool [B, V]: which tokens each row's attended prefix holds."""
    b = ids_bl.shape[0]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids_bl.shape)
    return jnp.zeros((b, vocab_size), bool).at[rows, ids_bl].max(mask_bl > 0)


@functools.partial(jax.jit, static_argnames=(
    "cfg", "rules", "method", "num_samples", "max_new_tokens", "pad_id", "repetition_penalty",
    "layout", "steps_per_check", "decode_phases"))
def decode(params, cache: KVCache, logits_bv, row_keys_b, stop_ids_s, seen_bv=None,
           budget_b=None, weights=None, *,
           cfg: ModelConfig, rules: Rules, method: SamplingMethod, num_samples: int,
           max_new_tokens: int, pad_id: int, repetition_penalty: float = 1.0,
           layout: str = "standard", steps_per_check: int = 1,
           decode_phases: int = DECODE_PHASES):
    """Decodes K samples per input over its shared prefill cache until every row has its reward.

    ``stop_ids_s`` [S] int32 are data, not compile-time constants: ``stop_ids_s[0]`` is the
    end-of-turn token fed at each row's end. ``seen_bv`` (:func:`seen_tokens` of the prefill)
    is needed when ``repetition_penalty`` != 1. ``budget_b`` [B] int32, optional: each input's
    own critique budget (at most ``max_new_tokens``); a row ends at its budget exactly as it
    would with ``max_new_tokens`` equal to it. ``layout``: the decode step's
    (:mod:`cloud_jax.model.decode_step`); ``feature_major`` reads ``weights``
    (:func:`~cloud_jax.model.decode_step.prepare_decode_weights` of ``params``), prepared here,
    once before the loop, when not given.

    ``steps_per_check``: decode steps between two checks of whether every row has ended. The
    loop's condition is read by the host on a GPU (a copy and a wait for the device each time
    it is checked), while a fixed count of steps runs with no such wait; checking every C steps
    costs up to C - 1 steps that change nothing once the last row has ended (a row that has
    ended keeps its tokens and reward), and gives the same critiques and rewards.

    ``decode_phases``: the loops the critiques' cache grows in (:func:`phase_lengths`). Each is
    compiled on its own, so compile time grows with their number; the same critiques and rewards
    at any value.

    Returns (tokens [N, M] int32, lengths [N], rewards [N] fp32, truncated [N] bool), rows ordered
    input-major (row ``b * K + k``).
    """
    check_layout(layout)
    check_steps_per_check(steps_per_check)  # decode_phases: checked by phase_lengths below
    if layout == "standard":
        weights = None
    elif weights is None:
        weights = prepare_decode_weights(params, cfg)
    k, m = num_samples, max_new_tokens
    eot = stop_ids_s[0]
    sample_keys_bk = jax.vmap(lambda key: jax.vmap(lambda s: jax.random.fold_in(key, s))(
        jnp.arange(k, dtype=jnp.uint32)))(row_keys_b)
    with nn.logical_axis_rules(rules):
        logits_nv = jnp.repeat(logits_bv, k, axis=0)
        n = logits_nv.shape[0]
        c = steps_per_check
        # Each phase a whole number of checks, so that no step runs past its cache's end.
        phases = sorted({-(-length // c) * c for length in phase_lengths(m + 1, decode_phases)})
        # A no-op without a mesh; on one, lays the decode cache out like the prefilled one.
        cache = with_shared_prefix(cfg, cache, n, phases[0]).constrain()
        table = None
        if weights is not None:
            cache = cache.with_keys_transposed()
            table = rope_table(cfg, phases[-1] + cache.prefix.valid.shape[1])
        state = DecodeState(
            step=jnp.zeros((), jnp.int32), cache=cache, logits_nv=logits_nv,
            tokens_nm=jnp.full((n, m + c), pad_id, jnp.int32),  # steps past m write pads
            lengths_n=jnp.zeros((n,), jnp.int32), done_n=jnp.zeros((n,), bool),
            truncated_n=jnp.zeros((n,), bool), rewards_n=jnp.zeros((n,), jnp.float32),
            keys_n=sample_keys_bk.reshape(n),
            seen_nv=None if repetition_penalty == 1.0 else jnp.repeat(seen_bv, k, axis=0))

        # Every step's uniform number for each row, made here at once rather than by hashing each
        # row's key in every step (two short loops of small operations a step on a CPU): the
        # same numbers, uniforms(fold_in(key, step)), for the steps the loop can run (up to
        # m + c - 1: the last check may start at step m).
        uniforms_nt = step_uniforms(state.keys_n, m + c) if method.random else None

        budget_n = (jnp.full((n,), m, jnp.int32) if budget_b is None
                     else jnp.repeat(jnp.minimum(budget_b, m), k, axis=0))

        def cond(s: DecodeState):
            # Also stops when this phase's cache is full (each step writes one slot per row).
            return (s.step <= m) & ~jnp.all(s.done_n) & (s.cache.end < s.cache.valid.shape[1])

        def body(s: DecodeState):
            uniforms_n = (None if uniforms_nt is None else
                          jax.lax.dynamic_index_in_dim(uniforms_nt, s.step, 1, keepdims=False))
            logits_nv = s.logits_nv
            if s.seen_nv is not None:
                logits_nv = penalize_repeats(logits_nv, s.seen_nv, repetition_penalty)
            drawn_n = method.draw(logits_nv, uniforms_n)
            is_stop = jnp.isin(drawn_n, stop_ids_s)
            ending = ~s.done_n & (is_stop | (s.step >= budget_n))
            writing = ~s.done_n & ~ending
            # A row that has ended feeds token 0 (not attended): pad_id may have no embedding.
            fed_n = jnp.where(ending, eot, jnp.where(writing, drawn_n, 0))
            logits_nv, rewards_n, cache = decode_step(params, weights, cfg, fed_n, ~s.done_n,
                                                      s.cache, table)
            return DecodeState(
                step=s.step + 1, cache=cache, logits_nv=logits_nv,
                tokens_nm=s.tokens_nm.at[:, s.step].set(jnp.where(writing, drawn_n, pad_id)),
                lengths_n=s.lengths_n + writing.astype(jnp.int32),
                done_n=s.done_n | ending, truncated_n=s.truncated_n | (ending & ~is_stop),
                rewards_n=jnp.where(ending, rewards_n, s.rewards_n), keys_n=s.keys_n,
                seen_nv=None if s.seen_nv is None else s.seen_nv.at[
                    jnp.arange(s.seen_nv.shape[0]), drawn_n].max(writing))

        def steps(s: DecodeState):
            # A fixed count: no host check between these steps.
            return jax.lax.fori_loop(0, c, lambda _, s: body(s), s) if c > 1 else body(s)

        for i, length in enumerate(phases):
            if i:
                state = state.replace(cache=state.cache.grown(length).constrain())
            state = jax.lax.while_loop(cond, steps, state)
    return state.tokens_nm[:, :m], state.lengths_n, state.rewards_n, state.truncated_n


def check_steps_per_check(steps_per_check) -> None:
    if isinstance(steps_per_check, bool) or not isinstance(steps_per_check, int) \
            or steps_per_check < 1:
        raise ValueError(f"steps_per_check={steps_per_check!r} must be a whole number >= 1 "
                         "(decode steps between two checks of whether every row has ended)")


def phase_lengths(slots: int, phases: int = DECODE_PHASES, shortest: int = 64) -> list[int]:
    """The decode's own-segment cache sizes, phase by phase: a decode of ``slots`` steps runs in
    ``phases`` loops over caches of 1/phases, 2/phases, ... of ``slots`` slots (one loop when
    ``slots`` < ``shortest``), so with 4 phases a step's attention reads about 5/8 of the
    critique slots it would read with the whole cache from the start. Each phase compiles its
    own loop: one phase compiles fastest (docs/RESULTS.md, "On one GPU")."""
    check_decode_phases(phases)
    if slots < shortest:
        return [slots]
    return sorted({-(-slots * j // phases) for j in range(1, phases + 1)})


def check_decode_phases(decode_phases) -> None:
    if isinstance(decode_phases, bool) or not isinstance(decode_phases, int) \
            or decode_phases < 1:
        raise ValueError(f"decode_phases={decode_phases!r} must be a whole number >= 1 (the "
                         "loops a decode grows its critiques' cache in; 1 compiles fastest)")


def check_token_ids(ids_bl: np.ndarray, mask_bl: np.ndarray, stop_ids: Sequence[int],
                    vocab_size: int) -> None:
    """A ValueError naming the first attended token id or stop id outside ``[0, vocab_size)``:
    the embedding has no row for it (a lookup would read NaN, or, for a negative id, another
    token's row). Pads (mask 0) are never read, so any pad id is fine."""
    outside = (mask_bl > 0) & ((ids_bl < 0) | (ids_bl >= vocab_size))
    if outside.any():
        b, t = np.argwhere(outside)[0]
        # The position among the input's own tokens, as its caller gave them (pads not counted).
        raise ValueError(f"input {b}: token id {ids_bl[b, t]} at position "
                         f"{int(np.sum(mask_bl[b, :t] > 0))} is not in the model's vocabulary "
                         f"[0, {vocab_size})")
    for s in stop_ids:
        if not 0 <= int(s) < vocab_size:
            raise ValueError(f"stop_ids: {int(s)} is not in the model's vocabulary "
                             f"[0, {vocab_size})")


def stop_array(stop_ids: Sequence[int]) -> np.ndarray:
    """Stop ids as the int32 array :func:`decode` takes, padded with the end-of-turn id (the
    first) to a multiple of 4 so a new stop set rarely recompiles."""
    ids = [int(s) for s in stop_ids]
    return np.asarray(ids + ids[:1] * (-len(ids) % 4), np.int32)


def row_keys(seed: int, row_ids_b: np.ndarray) -> jax.Array:
    """One PRNG key per input: ``fold_in(key(seed), row_id)``."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(row_ids_b, jnp.uint32))


def sample_padded(cfg: ModelConfig, params, ids_bl: np.ndarray, mask_bl: np.ndarray, *,
                  max_new_tokens: int, stop_ids: Sequence[int], num_samples: int = 1,
                  method: SamplingMethod = Greedy(), seed: int = 0,
                  row_ids: Optional[np.ndarray] = None, pad_id: int = 0,
                  mesh: Optional[Mesh] = None, rules: Rules = SAMPLE_RULES,
                  repetition_penalty: float = 1.0,
                  budgets: Optional[Sequence[int]] = None,
                  decode_layout: Optional[str] = None,
                  decode_weights: Optional[DecodeWeights] = None,
                  steps_per_check: int = 1,
                  decode_phases: int = DECODE_PHASES) -> SampleOutput:
    """Samples from an already padded batch (any padding side). ``row_ids`` [B] default to
    :func:`content_row_ids` of the attended tokens. ``budgets`` [B]: per-input critique budgets
    (at most ``max_new_tokens``), as if each input were sampled with its own. ``decode_layout``:
    ``standard`` or ``feature_major`` (:mod:`cloud_jax.model.decode_step`); None picks the
    machine's (:func:`~cloud_jax.model.decode_step.decode_layout`). Both give the same critiques
    up to float rounding. ``decode_weights``: the feature-major weights of ``params``
    (:func:`~cloud_jax.model.decode_step.prepare_decode_weights`), prepared once by a caller that
    samples many batches; without them the decode prepares its own. ``steps_per_check`` and
    ``decode_phases``: see :func:`decode` (the same critiques at any value)."""
    check_repetition_penalty(repetition_penalty)
    check_seed(seed)
    check_steps_per_check(steps_per_check)
    check_decode_phases(decode_phases)
    if decode_layout is None:
        decode_layout = "feature_major" if decode_weights is not None else default_layout(cfg, mesh)
    check_layout(decode_layout)
    if decode_weights is not None and decode_layout != "feature_major":
        raise ValueError(f"decode_weights are for the feature_major layout, not {decode_layout}")
    if cfg.scan_layers:
        raise ValueError("sampling needs unrolled layers: convert the params with "
                         "cloud_jax.model.unstack_layers and use scan_layers=False")
    if not stop_ids:
        raise ValueError("stop_ids is empty: give at least the end-of-turn token id")
    if max_new_tokens < 0 or num_samples < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0 and "
                         f"num_samples={num_samples} >= 1")
    ids_bl, mask_bl = np.asarray(ids_bl, np.int32), np.asarray(mask_bl, np.int32)
    if ids_bl.ndim != 2 or ids_bl.shape != mask_bl.shape:
        raise ValueError(f"ids {ids_bl.shape} and mask {mask_bl.shape} must both be [batch, len]")
    if not mask_bl.any(axis=1).all():
        raise ValueError("every input needs at least one attended token")
    check_token_ids(ids_bl, mask_bl, stop_ids, cfg.vocab_size)
    if budgets is not None:
        budgets = np.asarray(budgets)
        if budgets.shape != ids_bl.shape[:1] or (budgets < 0).any():
            raise ValueError(f"budgets: one critique budget >= 0 per input ({len(ids_bl)} "
                             f"inputs), got shape {budgets.shape}"
                             + (", a negative one" if budgets.size and budgets.min() < 0 else ""))
    if row_ids is None:
        row_ids = content_row_ids([r[m > 0] for r, m in zip(ids_bl, mask_bl)])
    b, length = ids_bl.shape
    with mesh_context(mesh, rules):
        logits_bv, cache = prefill(params, ids_bl, mask_bl, cfg=cfg, cache_len=length,
                                   rules=tuple(rules))
        seen = (None if repetition_penalty == 1.0
                else seen_tokens(ids_bl, mask_bl, cfg.vocab_size))
        budget_b = None if budgets is None else np.asarray(budgets, np.int32)
        tokens, lengths, rewards, truncated = decode(
            params, cache, logits_bv, row_keys(seed, row_ids), stop_array(stop_ids), seen,
            budget_b, decode_weights,
            cfg=cfg, rules=tuple(rules), method=method, num_samples=num_samples,
            max_new_tokens=max_new_tokens, pad_id=pad_id,
            repetition_penalty=float(repetition_penalty), layout=decode_layout,
            steps_per_check=steps_per_check, decode_phases=decode_phases)
    if not tokens.is_fully_addressable:
        # Several processes: the rows are spread over all of them, and each returns every row.
        tokens, lengths, rewards, truncated = multihost_utils.process_allgather(
            (tokens, lengths, rewards, truncated), tiled=True)
    k = num_samples
    return SampleOutput(
        tokens=np.asarray(tokens).reshape(b, k, max_new_tokens),
        lengths=np.asarray(lengths).reshape(b, k),
        rewards=np.asarray(rewards, np.float32).reshape(b, k),
        truncated=np.asarray(truncated).reshape(b, k))


def sample(cfg: ModelConfig, params, prefixes: Sequence[Sequence[int]], *, max_new_tokens: int,
           stop_ids: Sequence[int], num_samples: int = 1, method: SamplingMethod = Greedy(),
           seed: int = 0, row_ids: Optional[np.ndarray] = None, pad_id: int = 0,
           buckets: Optional[Sequence[int]] = None, mesh: Optional[Mesh] = None,
           rules: Rules = SAMPLE_RULES, repetition_penalty: float = 1.0,
           budgets: Optional[Sequence[int]] = None,
           decode_layout: Optional[str] = None,
           decode_weights: Optional[DecodeWeights] = None,
           steps_per_check: int = 1,
           decode_phases: int = DECODE_PHASES) -> SampleOutput:
    """K critiques (and their rewards) for each token prefix, left-padded to a length bucket."""
    if not prefixes:
        raise ValueError("no inputs to sample from")
    length = bucket_length(max(len(p) for p in prefixes), buckets)
    ids, mask = pad_prefixes(prefixes, length, pad_id)
    if row_ids is None:
        row_ids = content_row_ids(prefixes)
    return sample_padded(cfg, params, ids, mask, max_new_tokens=max_new_tokens,
                         stop_ids=stop_ids, num_samples=num_samples, method=method, seed=seed,
                         row_ids=row_ids, pad_id=pad_id, mesh=mesh, rules=rules,
                         repetition_penalty=repetition_penalty, budgets=budgets,
                         decode_layout=decode_layout, decode_weights=decode_weights,
                         steps_per_check=steps_per_check, decode_phases=decode_phases)
