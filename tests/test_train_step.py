"""The jitted train step: sharded equals single-device, accumulation equals one big batch,
losses against values computed by hand from the model's outputs.

Run as a script (``python tests/test_train_step.py sharded``) it is the 8-fake-device child.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from cloud_jax.model.config import ModelConfig  # noqa: E402
from cloud_jax.sharding import MeshConfig  # noqa: E402
from cloud_jax.training.config import Config  # noqa: E402
from cloud_jax.training.losses import LossConfig  # noqa: E402
from cloud_jax.model import CLoudModel, init_params  # noqa: E402
from cloud_jax.training.optim import OptimConfig  # noqa: E402
from cloud_jax.sharding import TRAIN_RULES, make_mesh  # noqa: E402
from cloud_jax.training.config import TrainConfig  # noqa: E402
from cloud_jax.training.step import StepBuilder, forward, model_flops_per_token  # noqa: E402

MODEL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2)


def make_config(stage="cloud", grad_accum=1, mesh=MeshConfig(data=1), lr=1e-2, lm_chunk=5,
                **train):
    # lm_chunk 5 over rows of 12: the chunked LM loss with a shorter last chunk, and (see
    # make_batch) a first chunk without targets that is skipped.
    return Config(model=MODEL, mesh=mesh,
                  optim=OptimConfig(learning_rate=lr, warmup_ratio=0.0, grad_clip_norm=1.0),
                  loss=LossConfig(lm_coef=0.5, margin=0.1, center_coef=0.01,
                                  lm_chunk_size=lm_chunk),
                  train=TrainConfig(stage=stage, total_steps=10, grad_accum_steps=grad_accum,
                                    **train))


def make_batch(pairs=8, length=12, seed=0):
    """A pipeline-layout batch: right padding, loss targets on a tail span, one filler pair."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, MODEL.vocab_size, (pairs, 2, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, (pairs, 2))
    pos = np.arange(length)
    mask = (pos[None, None, :] < lengths[..., None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)
    targets = np.concatenate([ids[..., 1:], np.zeros((pairs, 2, 1), np.int32)], axis=-1)
    loss_mask = ((pos >= 5)[None, None, :] & (pos[None, None, :] < lengths[..., None] - 1))
    pair_valid = np.ones(pairs, np.int32)
    pair_valid[-1] = 0
    loss_mask = loss_mask.astype(np.float32) * pair_valid[:, None, None]
    return {"input_ids": ids, "attention_mask": mask, "positions": pos * mask,
            "targets": targets, "loss_mask": loss_mask,
            "reward_index": (lengths - 1).astype(np.int32), "pair_valid": pair_valid,
            "pair_index": np.arange(pairs, dtype=np.int32)}


def run_steps(cfg, batches, params=None):
    size = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    mesh = make_mesh(cfg.mesh, jax.devices()[:size])
    builder = StepBuilder(cfg, mesh, TRAIN_RULES, cfg.model)
    if params is None:
        params = init_params(cfg.model, jax.random.key(0), mesh, TRAIN_RULES)
    else:
        params = jax.device_put(params, builder.param_shardings)
    state = builder.init_state(params)
    step = builder.train_step()
    losses = []
    for b in batches:
        state, metrics = step(state, builder.device_batch(b))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state["params"]), losses, metrics, builder


def max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _sharded_child():
    assert jax.device_count() == 8, jax.devices()
    batches = [make_batch()]
    out = {}
    # Adam's first update is about lr * sign(gradient), so a gradient entry that is rounding noise
    # around 0 moves by up to lr whatever the noise; a small rate keeps that below the tolerance.
    for accum in (2,):
        single, l1, m1, _ = run_steps(make_config(grad_accum=accum, lr=1e-4), batches)
        cfg8 = make_config(grad_accum=accum, mesh=MeshConfig(data=2, fsdp=2, tensor=2), lr=1e-4)
        sharded, l8, m8, builder = run_steps(cfg8, batches)
        q = builder.param_shardings["layers_0"]["attn"]["q_proj"]["kernel"].spec
        out[f"accum{accum}"] = {"params_diff": max_diff(single, sharded),
                                "loss_diff": max(abs(a - b) for a, b in zip(l1, l8)),
                                # The gradient norm checks the gradients themselves, which the
                                # sign-like first Adam update hides.
                                "grad_norm_rel_diff": abs(float(m1["grad_norm"])
                                                          - float(m8["grad_norm"]))
                                / float(m1["grad_norm"]),
                                "q_spec": str(q)}
    print(json.dumps(out))


def test_step_on_2x2x2_mesh_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, "sharded"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for accum in ("accum2",):
        assert "fsdp" in result[accum]["q_spec"] and "tensor" in result[accum]["q_spec"]
        assert result[accum]["params_diff"] <= 1e-5, result
        assert result[accum]["loss_diff"] <= 1e-5, result
        assert result[accum]["grad_norm_rel_diff"] <= 1e-5, result


def test_grad_accumulation_over_4_micro_batches_equals_one_batch():
    # cloud has both terms (LM over tokens, BT over pairs), each with its own normalizer; the
    # small rate is explained in _sharded_child.
    batches = [make_batch()]
    one, l1, m1, _ = run_steps(make_config(lr=1e-4), batches)
    four, l4, m4, _ = run_steps(make_config(grad_accum=4, lr=1e-4), batches)
    assert max_diff(one, four) <= 1e-5
    np.testing.assert_allclose(l1, l4, atol=1e-5)
    for key in m1:
        np.testing.assert_allclose(np.asarray(m1[key]), np.asarray(m4[key]), rtol=1e-5,
                                   atol=1e-5, err_msg=key)


@pytest.mark.parametrize("stage", ["cloud", "critique_sft"])
def test_chunked_lm_loss_step_equals_full_logits_step(stage):
    """loss.lm_chunk_size > 0 (chunks of 5 and 4 positions, chunks without targets skipped)
    gives the step of the whole-logits loss (lm_chunk_size 0): losses, metrics, parameters."""
    batches = [make_batch(seed=0), make_batch(seed=1)]
    full, l0, m0, _ = run_steps(make_config(stage, lr=1e-4, lm_chunk=0), batches)
    for chunk in (4, 5, 64):
        chunked, lc, mc, _ = run_steps(make_config(stage, lr=1e-4, lm_chunk=chunk), batches)
        assert max_diff(full, chunked) <= 1e-5, chunk
        np.testing.assert_allclose(l0, lc, rtol=1e-6)
        for key in m0:
            np.testing.assert_allclose(np.asarray(m0[key]), np.asarray(mc[key]), rtol=1e-5,
                                       atol=1e-6, err_msg=key)


def test_cloud_loss_equals_hand_computed_value():
    cfg = make_config()
    batch = make_batch()
    params = init_params(MODEL, jax.random.key(0))
    # The step's loss (before its update) from the model's own outputs, by hand in numpy.
    out = jax.device_get(jax.jit(lambda p, b: forward(CLoudModel(MODEL), p, b, "cloud"))(
        params, batch))
    logits, rewards = out["logits"].astype(np.float64), out["rewards"].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    lm = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    valid = batch["pair_valid"] == 1
    gap = rewards[valid, 0] - rewards[valid, 1] - 0.1
    bt = np.mean(np.log1p(np.exp(-gap)) + 0.01 * (rewards[valid, 0] + rewards[valid, 1]) ** 2)
    expected = bt + 0.5 * lm
    _, losses, metrics, _ = run_steps(cfg, [batch], params=params)
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert float(metrics["tokens"]) == batch["attention_mask"][valid].sum()
    assert float(metrics["learning_rate"]) == pytest.approx(1e-2)


def test_nonfinite_skip_keeps_params():
    batch = make_batch()
    params = jax.device_get(init_params(MODEL, jax.random.key(0)))
    params["reward_head"]["out_proj"]["bias"] = np.full_like(
        params["reward_head"]["out_proj"]["bias"], np.nan)
    after, _, metrics, _ = run_steps(make_config(on_nonfinite="skip"), [batch], params=params)
    assert int(metrics["nonfinite"]) == 1
    np.testing.assert_array_equal(after["embed"]["embedding"], params["embed"]["embedding"])


def test_a_skipped_step_leaves_the_schedule_where_it_was():
    # train.on_nonfinite=skip: the skipped step applies no rate and does not advance the
    # schedule, so the next applied update uses the rate the skipped one would have, and its
    # metrics log that rate.
    from cloud_jax.training.optim import update_count

    cfg = make_config(on_nonfinite="skip")  # warmup 0: the cosine falls from step 0 on
    batch = make_batch()
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    builder = StepBuilder(cfg, mesh, TRAIN_RULES, cfg.model)
    good = jax.device_get(init_params(MODEL, jax.random.key(0)))
    bad = jax.tree.map(np.copy, good)
    bad["reward_head"]["out_proj"]["bias"] = np.full_like(
        bad["reward_head"]["out_proj"]["bias"], np.nan)
    step = builder.train_step()
    state = builder.init_state(jax.device_put(bad, builder.param_shardings))
    before = jax.device_get(state["opt_state"])
    state, skipped = step(state, builder.device_batch(batch))
    assert int(skipped["nonfinite"]) == 1
    assert int(state["step"]) == 1 and int(update_count(state["opt_state"])) == 0
    # Every leaf of the optimizer state (Adam's moments too, not only its counter) is kept.
    kept = jax.tree.leaves(jax.device_get(state["opt_state"]))
    assert len(kept) == len(jax.tree.leaves(before)) > 1
    for a, b in zip(jax.tree.leaves(before), kept):
        np.testing.assert_array_equal(a, b)
    state = dict(state, params=jax.device_put(good, builder.param_shardings))
    state, applied = step(state, builder.device_batch(batch))
    assert int(applied["nonfinite"]) == 0
    assert int(state["step"]) == 2 and int(update_count(state["opt_state"])) == 1
    assert float(applied["learning_rate"]) == pytest.approx(float(builder.schedule(0)))
    assert float(builder.schedule(0)) > float(builder.schedule(1))


def test_a_logged_window_averages_the_applied_steps_and_counts_the_skipped():
    from cloud_jax.training.metrics import summarize_window

    def step(loss, lr, nonfinite, correct):
        return {"loss": np.float32(loss), "grad_norm": np.float32(loss), "nonfinite":
                np.int32(nonfinite), "learning_rate": np.float32(lr), "tokens": np.float32(10),
                "pairs": np.float32(2), "correct": np.float32(correct),
                "bt_loss_sum": np.float32(2 * loss), "center_sum": np.float32(0),
                "margin_sum": np.float32(0), "chosen_sum": np.float32(0),
                "chosen_sq_sum": np.float32(0), "rejected_sum": np.float32(0),
                "rejected_sq_sum": np.float32(0)}

    window = summarize_window([step(1.0, 0.3, 0, 2), step(np.nan, 0.2, 1, 0),
                               step(3.0, 0.2, 0, 1), step(np.inf, 0.1, 1, 0)])
    assert window["loss"] == window["grad_norm"] == window["bt_loss"] == 2.0
    assert window["accuracy"] == 0.75 and window["learning_rate"] == pytest.approx(0.2)
    assert window["nonfinite_steps"] == 2 and window["tokens"] == 40
    skipped = summarize_window([step(np.nan, 0.1, 1, 0)])
    assert skipped["loss"] is None and skipped["learning_rate"] is None
    assert skipped["bt_loss"] is None and skipped["nonfinite_steps"] == 1


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # lr 1e39 in fp32
def test_update_that_overflows_the_params_is_skipped():
    # Loss and gradients are finite, but a learning rate beyond float32 turns the update into
    # inf: such a step must not be applied (nor, in the trainer, checkpointed).
    batch = make_batch()
    params = jax.device_get(init_params(MODEL, jax.random.key(0)))
    after, losses, metrics, _ = run_steps(make_config(on_nonfinite="skip", lr=1e39), [batch],
                                          params=params)
    assert np.isfinite(losses[0]) and np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["nonfinite"]) == 1
    assert max_diff(after, params) == 0


def test_flops_per_token_matches_parameter_count():
    cfg = dataclasses.replace(MODEL, tie_word_embeddings=False)
    d, f, v, L = 32, 64, 64, 2
    # q and o are d x d, k and v d x d/2 (2 of 4 heads), the MLP 3 d x f, the LM head d x v.
    weights = L * (2 * d * d + 2 * d * (d // 2) + 3 * d * f) + d * v
    assert model_flops_per_token(cfg, 10, "cloud") == 6 * weights + 3 * 4 * L * 32 * 10
    assert model_flops_per_token(cfg, 10, "classic") == 6 * (weights - d * v) + 3 * 4 * L * 32 * 10


if __name__ == "__main__" and sys.argv[1:] == ["sharded"]:
    _sharded_child()


def test_bf16_first_moment_runs_and_stays_close_to_fp32():
    batches = [make_batch(seed=s) for s in range(3)]
    base = make_config()
    bf16 = dataclasses.replace(base, optim=dataclasses.replace(base.optim, mu_dtype="bfloat16"))
    want, want_losses, _, _ = run_steps(base, batches)
    got, losses, _, builder = run_steps(bf16, batches)
    mu = [x for path, x in jax.tree_util.tree_leaves_with_path(builder.abstract_state()["opt_state"])
          if any(getattr(k, "name", None) == "mu" for k in path)]
    assert mu and all(x.dtype == jax.numpy.bfloat16 for x in mu)
    np.testing.assert_allclose(losses[0], want_losses[0], rtol=1e-6)  # same start
    assert 0 < max_diff(got, want) < 1e-3  # bf16 moments move the weights, but barely differently
