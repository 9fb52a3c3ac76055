"""The train and eval steps: pure functions of (state, batch), jitted with explicit shardings.

State is a plain pytree ``{"step": int32 [], "params": ..., "opt_state": ...}``; the train step
donates it and returns the next one. A batch is the pipeline's ``[P, 2, T]`` layout (pair axis:
0 = chosen, 1 = rejected); chosen and rejected rows run in one forward as ``[2P, T]``.

Gradient accumulation splits the P pairs into ``grad_accum_steps`` micro-batches and runs them
with ``lax.scan``. Every micro-batch's loss is divided by the *whole* batch's token and pair counts
(:func:`cloud_jax.training.losses.loss_normalizers`), so the summed gradients equal the full batch's
(with reward-head dropout, in expectation: each micro-batch draws its own masks).
Micro-batch ``i`` takes pairs ``i, A + i, 2A + i, ...``: with the batch split over devices in
contiguous blocks, every device then holds its share of every micro-batch and nothing moves.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cloud_jax.model.config import ModelConfig
from cloud_jax.training.config import Config
from cloud_jax.training.losses import lm_target_mask, loss_normalizers, stage_loss
from cloud_jax.training.stages import stage as stage_record
from cloud_jax.model import CLoudModel, mesh_context, param_shapes, param_shardings
from cloud_jax.training.optim import current_learning_rate, make_optimizer, make_schedule
from cloud_jax.sharding import Rules, batch_sharding, replicated

log = logging.getLogger(__name__)

# What the step reads from a pipeline batch (pair_index stays on the host).
DEVICE_KEYS = ("input_ids", "attention_mask", "positions", "targets", "loss_mask",
               "reward_index", "pair_valid")

State = dict[str, Any]
Batch = Mapping[str, jax.Array]


def forward(model: CLoudModel, params: Any, batch: Batch, stage: str, *,
            rng: Optional[jax.Array] = None, lm_chunk_size: int = 0) -> dict[str, jax.Array]:
    """Chosen and rejected rows in one forward: for LM stages ``logits [P,2,T,V]``, or with
    ``lm_chunk_size > 0`` the chunked LM loss ``lm = (loss_sum, token_count)`` over
    :func:`lm_target_mask`; for BT stages ``rewards [P,2]``. With ``rng`` the reward-head dropout
    is on."""
    p = batch["pair_valid"].shape[0]

    def rows(x):  # [P, 2, ...] -> [2P, ...]
        return x.reshape((2 * p,) + x.shape[2:])

    record = stage_record(stage)
    want_rewards = record.bt_loss
    chunked = record.lm_loss and lm_chunk_size > 0
    lm_targets = None
    if chunked:
        lm_targets = (rows(batch["targets"]), rows(lm_target_mask(batch, stage)), lm_chunk_size)
    out = model.apply(
        {"params": params}, rows(batch["input_ids"]), rows(batch["attention_mask"]),
        positions_bt=rows(batch["positions"]),
        reward_index_b=rows(batch["reward_index"]) if want_rewards else None,
        deterministic=rng is None, return_logits=record.lm_loss and not chunked,
        lm_targets=lm_targets, rngs=None if rng is None else {"dropout": rng})
    outputs = {}
    if out.logits is not None:
        outputs["logits"] = out.logits.reshape((p, 2) + out.logits.shape[1:])
    if chunked:
        outputs["lm"] = out.lm
    if want_rewards:
        outputs["rewards"] = out.rewards.reshape(p, 2)
    return outputs


def model_flops_per_token(cfg: ModelConfig, seq_len: int, stage: str) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 per matmul weight plus the
    attention score and value products (PaLM's estimate). Embedding lookups are not matmuls; the
    LM head is one only in stages that compute logits."""
    hd = cfg.resolved_head_dim
    weights = cfg.num_layers * cfg.layer_matmul_params
    if stage_record(stage).lm_loss:
        weights += cfg.hidden_size * cfg.vocab_size
    attention = 2 * 2 * cfg.num_layers * cfg.num_heads * hd * seq_len
    return 3.0 * (2.0 * weights + attention)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]).all()


@dataclasses.dataclass
class StepBuilder:
    """Jitted train / eval steps for one config and mesh, with the shardings they agree on."""

    cfg: Config
    mesh: Mesh
    rules: Rules
    model_cfg: ModelConfig

    def __post_init__(self):
        tc = self.cfg.train
        self.stage = tc.stage
        self.model = CLoudModel(self.model_cfg)
        self.schedule = make_schedule(self.cfg.optim, tc.total_steps)
        self.tx = make_optimizer(self.cfg.optim, tc.total_steps)
        self.param_shardings = param_shardings(self.model_cfg, self.mesh, self.rules)
        opt_shapes = jax.eval_shape(self.tx.init, param_shapes(self.model_cfg))
        rep = replicated(self.mesh)
        self.opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, opt_shapes, self.param_shardings,
            transform_non_params=lambda _: rep)
        self.state_shardings = {"step": rep, "params": self.param_shardings,
                                "opt_state": self.opt_shardings}
        self.batch_shardings = {
            k: batch_sharding(self.mesh, 1 if k == "pair_valid" else 2 if k == "reward_index"
                              else 3, self.rules)
            for k in DEVICE_KEYS}
        self._train = None
        self._eval = None

    # -- state -----------------------------------------------------------------------------

    def abstract_state(self) -> State:
        """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
        shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                  "params": param_shapes(self.model_cfg)}
        shapes["opt_state"] = jax.eval_shape(self.tx.init, shapes["params"])
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)

    def init_state(self, params: Any) -> State:
        """Step 0 state around ``params`` (already in ``param_shardings``)."""
        with mesh_context(self.mesh, self.rules):
            opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
        return {"step": step, "params": params, "opt_state": opt_state}

    # -- the steps -------------------------------------------------------------------------

    def _loss_fn(self) -> Callable:
        lc = self.cfg.loss
        margin = lc.margin if lc.margin else None

        def loss_fn(params, batch, normalizers, rng):
            outputs = forward(self.model, params, batch, self.stage, rng=rng,
                              lm_chunk_size=lc.lm_chunk_size)
            return stage_loss(self.stage, outputs, batch, lm_coef=lc.lm_coef, margin=margin,
                              center_coef=lc.center_coef, normalizers=normalizers)

        return loss_fn

    def _micro_batches(self, batch: Batch, n: int) -> Batch:
        """[P, ...] -> [n, P/n, ...]; micro-batch i holds pairs i, n+i, 2n+i, ..."""
        batch_axes = dict(self.rules)["batch"]

        def split(x):
            x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
            spec = PartitionSpec(None, batch_axes, *([None] * (x.ndim - 2)))
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

        return jax.tree.map(split, dict(batch))

    def train_step_fn(self) -> Callable[[State, Batch], tuple[State, dict]]:
        """The pure ``(state, batch) -> (state, metrics)``, unjitted (see :meth:`train_step`)."""
        tc = self.cfg.train
        n_micro = tc.grad_accum_steps
        grad_fn = jax.value_and_grad(self._loss_fn(), has_aux=True)
        base_key = jax.random.key(self.cfg.seed)
        skip_nonfinite = tc.on_nonfinite == "skip"

        def step_fn(state, batch):
            params = state["params"]
            normalizers = loss_normalizers(self.stage, batch)
            rng = jax.random.fold_in(base_key, state["step"])
            if n_micro == 1:
                (loss, sums), grads = grad_fn(params, batch, normalizers, rng)
            else:
                micro = self._micro_batches(batch, n_micro)
                first = jax.tree.map(lambda x: x[0], micro)
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                     jax.eval_shape(grad_fn, params, first, normalizers, rng))

                def body(acc, xs):
                    i, mb = xs
                    out = grad_fn(params, mb, normalizers, jax.random.fold_in(rng, i))
                    return jax.tree.map(jnp.add, acc, out), None

                ((loss, sums), grads), _ = jax.lax.scan(
                    body, zeros, (jnp.arange(n_micro), micro))
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = self.tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
            # Finite gradients can still overflow the parameters (an extreme learning rate or
            # weight decay); such a step is as unusable as one with a NaN loss.
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(new_params)
            if skip_nonfinite:
                keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
                new_params = jax.tree.map(keep, new_params, params)
                opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
            mask = batch["attention_mask"] * (batch["pair_valid"] != 0)[:, None, None]
            metrics = dict(sums, loss=loss, grad_norm=grad_norm,
                           learning_rate=current_learning_rate(self.schedule, state["opt_state"]),
                           nonfinite=1 - finite.astype(jnp.int32),
                           tokens=jnp.sum(mask, dtype=jnp.float32))
            new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
            return new_state, metrics

        return step_fn

    def eval_step_fn(self) -> Callable[[Any, Batch], dict]:
        """``(params, batch) -> metric sums`` of the stage's losses, dropout off."""
        lc = self.cfg.loss
        margin = lc.margin if lc.margin else None

        def eval_fn(params, batch):
            outputs = forward(self.model, params, batch, self.stage,
                              lm_chunk_size=lc.lm_chunk_size)
            _, sums = stage_loss(self.stage, outputs, batch, lm_coef=lc.lm_coef, margin=margin,
                                 center_coef=lc.center_coef)
            return sums

        return eval_fn

    def train_step(self) -> "CompiledStep":
        if self._train is None:
            jitted = jax.jit(self.train_step_fn(),
                             in_shardings=(self.state_shardings, self.batch_shardings),
                             out_shardings=(self.state_shardings, replicated(self.mesh)),
                             donate_argnums=(0,))
            self._train = CompiledStep(jitted, "train step", self.mesh, self.rules)
        return self._train

    def eval_step(self) -> "CompiledStep":
        if self._eval is None:
            jitted = jax.jit(self.eval_step_fn(),
                             in_shardings=(self.param_shardings, self.batch_shardings),
                             out_shardings=replicated(self.mesh))
            self._eval = CompiledStep(jitted, "eval step", self.mesh, self.rules)
        return self._eval

    def device_batch(self, local: Mapping[str, Any]) -> dict[str, jax.Array]:
        """This host's numpy batch -> global arrays in ``batch_shardings``."""
        return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], local[k])
                for k in DEVICE_KEYS}


def _gib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**30:.3f} GiB"


def memory_figures(compiled) -> Optional[dict[str, int]]:
    """Per-device bytes of a compiled step: arguments, outputs, temporaries, the donated bytes
    outputs share with arguments (alias), generated code, and the total resident at once; None on
    backends without a memory analysis."""
    try:
        mem = compiled.memory_analysis()
    except NotImplementedError:
        return None
    if mem is None:
        return None
    out = {k: int(getattr(mem, f"{k}_size_in_bytes"))
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["total"] = (out["argument"] + out["output"] - out["alias"] + out["temp"]
                    + out["generated_code"])
    return out


def memory_report(compiled, name: str) -> str:
    """One line with a compiled executable's per-device memory figures."""
    figures = memory_figures(compiled)
    if figures is None:
        return f"{name}: memory analysis unavailable on this backend"
    detail = ", ".join(f"{k} {_gib(v)}" for k, v in figures.items() if k != "total")
    return f"{name} memory per device: {detail}; total ~{_gib(figures['total'])}"


class CompiledStep:
    """Compiles a jitted step once per batch shape (one per length bucket), logs the compiled
    program's memory analysis, and keeps the seconds spent compiling for throughput numbers."""

    def __init__(self, jitted, name: str, mesh: Mesh, rules: Rules):
        self._jitted, self._name, self._mesh, self._rules = jitted, name, mesh, rules
        self._compiled: dict = {}
        self.compile_seconds = 0.0
        self.reports: list[str] = []

    def compiled_for(self, *args):
        key = jax.tree.map(lambda x: (x.shape, x.dtype), args[-1])
        key = tuple(sorted((k, v) for k, v in key.items()))
        if key not in self._compiled:
            start = time.perf_counter()
            with mesh_context(self._mesh, self._rules):
                compiled = self._jitted.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
            shape = dict(key).get("input_ids", ("?",))[0]
            report = memory_report(compiled, f"{self._name} {tuple(shape)}")
            self.reports.append(report)
            log.info("%s (compiled in %.1f s)", report, time.perf_counter() - start)
            self._compiled[key] = compiled
        return self._compiled[key]

    def __call__(self, *args):
        return self.compiled_for(*args)(*args)
