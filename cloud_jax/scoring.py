"""Scoring: critique -> reward for (prompt, response) pairs, with self-consistency over K samples.

    result = rm.score(prompts, responses, num_samples=8, temperature=0.7)
    result.rewards [B] (mean over samples), result.sample_rewards [B, K], result.reward_std [B],
    result.critiques [B][K], result.truncated [B, K]

Each input is prefilled as ``[user: prompt][assistant: response][user: critique prefix`` once;
K critiques are sampled from its replicated cache and each reward is read inside the decode loop
at the end-of-turn token. A classic model (``classic=True``) has no critique: its reward is read
by one forward over ``[user: prompt][assistant: response]<end-of-turn>``.

``python -m cloud_jax score --checkpoint C --input rows.jsonl --output scored.jsonl`` writes every
input row back with its rewards and critiques: rows with ``prompt`` + ``response`` get ``reward``,
``sample_rewards``, ``reward_std``, ``critiques``, ``truncated``; preference rows (``prompt``,
``chosen``, ``rejected``) get those fields prefixed ``chosen_`` and ``rejected_``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from cloud_jax.config import ModelConfig
from cloud_jax.data.config import CRITIQUE_PREFIX
from cloud_jax.data.layout import encode_critique_prefix, encode_example
from cloud_jax.data.tokenizer import end_of_turn_ids
from cloud_jax.model import CLoudModel, param_shardings, unstack_layers
from cloud_jax.sampling import bucket_length, method_from, pad_prefixes, sample
from cloud_jax.sharding import SAMPLE_RULES

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """How critiques are sampled and rewards read."""

    num_samples: int = 1
    # 0 is greedy; top_k / top_p (at most one) apply when temperature > 0.
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    # Critique-token budget; a critique that reaches it gets the end-of-turn token forced and is
    # flagged truncated.
    max_critique_tokens: int = 256
    seed: int = 0
    # Inputs per compiled batch (each becomes num_samples decode rows).
    batch_size: int = 8
    # Prefill tokens at most; longer inputs lose prompt tokens from the left.
    max_length: int = 2048
    # The text the critique starts after. None: the one stored in the model's checkpoint by
    # training (RewardModel.critique_prefix), else data.config.CRITIQUE_PREFIX.
    critique_prefix: Optional[str] = None
    # A classic reward model: no critique, one forward.
    classic: bool = False
    # Prefill length buckets; empty: powers of two.
    length_buckets: tuple[int, ...] = ()

    def validate(self) -> "ScoreConfig":
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if self.max_critique_tokens < 0:
            raise ValueError(f"max_critique_tokens={self.max_critique_tokens}: must be >= 0")
        method_from(self.temperature, self.top_k, self.top_p)
        return self


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    rewards: np.ndarray  # float32 [B]: mean over the samples
    sample_rewards: np.ndarray  # float32 [B, K] (K = 1 for a classic model)
    reward_std: np.ndarray  # float32 [B]: population std over the samples
    critiques: list[list[str]]  # [B][K]; [B][0] (empty lists) for a classic model
    truncated: np.ndarray  # bool [B, K]: critique hit the token budget
    critique_tokens: np.ndarray  # int32 [B, K]: critique length in tokens


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _sampling_params(rm) -> tuple[ModelConfig, Any]:
    cfg, params = rm.config, rm.params
    if cfg.scan_layers:
        params = unstack_layers(params, cfg.num_layers)
        cfg = dataclasses.replace(cfg, scan_layers=False)
    if rm.mesh is not None:
        params = jax.device_put(params, param_shardings(cfg, rm.mesh, SAMPLE_RULES))
    return cfg, params


@functools.partial(jax.jit, static_argnames=("cfg",))
def _classic_rewards(params, ids_bl, mask_bl, reward_index_b, *, cfg: ModelConfig):
    out = CLoudModel(cfg).apply({"params": params}, ids_bl, mask_bl,
                                reward_index_b=reward_index_b, return_logits=False)
    return out["rewards"]


def _require_tokenizer(rm):
    if rm.tokenizer is None:
        raise ValueError("this model has no tokenizer: load a checkpoint directory that holds "
                         "one, or set rm.tokenizer (e.g. cloud_jax.data.tokenizer.load_tokenizer)")
    return rm.tokenizer


def _score_classic(rm, prompts, responses, cfg: ScoreConfig, on_batch) -> ScoreResult:
    tok = _require_tokenizer(rm)
    seqs = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ex = encode_example(tok, p, r, None, "classic", cfg.critique_prefix, cfg.max_length,
                            "truncate_prompt")
        if ex is None:
            raise ValueError(f"input {i}: the response alone is longer than "
                             f"max_length={cfg.max_length} tokens")
        seqs.append(ex.input_ids.tolist())
    rewards = np.zeros(len(seqs), np.float32)
    for start, end in _batches(len(seqs), cfg.batch_size):
        chunk = seqs[start:end]
        # Right padding: the reward index is each row's last token.
        ids, mask = pad_prefixes(chunk, bucket_length(max(map(len, chunk)), cfg.length_buckets),
                                 side="right")
        index = np.asarray([len(s) - 1 for s in chunk], np.int32)
        rewards[start:end] = np.asarray(_classic_rewards(rm.params, ids, mask, index,
                                                         cfg=rm.config))
        if on_batch is not None:
            on_batch(end - start, 0)
    n = len(seqs)
    return ScoreResult(rewards=rewards, sample_rewards=rewards[:, None],
                       reward_std=np.zeros(n, np.float32), critiques=[[] for _ in range(n)],
                       truncated=np.zeros((n, 1), bool), critique_tokens=np.zeros((n, 1), np.int32))


def resolve_critique_prefix(rm, cfg: ScoreConfig) -> str:
    """The prefix to score with: ``cfg``'s, else the model's own, else CRITIQUE_PREFIX."""
    trained = getattr(rm, "critique_prefix", None)
    if cfg.critique_prefix is None:
        return CRITIQUE_PREFIX if trained is None else trained
    if trained is not None and cfg.critique_prefix != trained:
        _warn_once(f"scoring with critique_prefix {cfg.critique_prefix!r}, but the model was "
                   f"trained with {trained!r}")
    return cfg.critique_prefix


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def score(rm, prompts: Sequence[str], responses: Sequence[str], cfg: ScoreConfig = ScoreConfig(),
          on_batch: Optional[Callable[[int, int], None]] = None) -> ScoreResult:
    """Scores every (prompt, response); ``rm`` is a :class:`cloud_jax.RewardModel`.

    ``on_batch(inputs_done, critique_tokens)`` is called after each batch (progress bars).
    A fixed seed gives the same critiques whatever the batch size or input order: each input's
    random stream derives from its tokens.
    """
    cfg.validate()
    cfg = dataclasses.replace(cfg, critique_prefix=resolve_critique_prefix(rm, cfg))
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("nothing to score: no prompts given")
    if cfg.classic:
        return _score_classic(rm, prompts, responses, cfg, on_batch)
    tok = _require_tokenizer(rm)
    stop_ids = end_of_turn_ids(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    prefixes = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        try:
            prefixes.append(encode_critique_prefix(tok, p, r, cfg.critique_prefix,
                                                   cfg.max_length))
        except ValueError as err:
            raise ValueError(f"input {i}: {err}; raise max_length or shorten the "
                             "response") from None
    model_cfg, params = _sampling_params(rm)
    method = method_from(cfg.temperature, cfg.top_k, cfg.top_p)
    n, k, m = len(prefixes), cfg.num_samples, cfg.max_critique_tokens
    tokens = np.zeros((n, k, m), np.int32)
    lengths = np.zeros((n, k), np.int32)
    rewards = np.zeros((n, k), np.float32)
    truncated = np.zeros((n, k), bool)
    # Rows per prefill: on a mesh, a multiple of the devices the batch is split over.
    split = 1 if rm.mesh is None else rm.mesh.shape["data"] * rm.mesh.shape["fsdp"]
    rows = -(-min(cfg.batch_size, n) // split) * split
    # Similar lengths share a batch (less padding); results do not depend on the grouping.
    order = sorted(range(n), key=lambda i: len(prefixes[i]))
    for start, end in _batches(n, cfg.batch_size):
        idx = order[start:end]
        chunk = [prefixes[i] for i in idx]
        # A short last batch is filled up with copies, so every batch has one compiled shape.
        filler = [chunk[0]] * (rows - len(chunk))
        out = sample(model_cfg, params, chunk + filler, max_new_tokens=m, stop_ids=stop_ids,
                     num_samples=k, method=method, seed=cfg.seed, pad_id=pad_id,
                     buckets=cfg.length_buckets or None, mesh=rm.mesh, rules=SAMPLE_RULES)
        real = slice(0, len(chunk))
        tokens[idx], lengths[idx] = out.tokens[real], out.lengths[real]
        rewards[idx], truncated[idx] = out.rewards[real], out.truncated[real]
        if on_batch is not None:
            on_batch(len(chunk), int(out.lengths[real].sum()))
    critiques = [[tok.decode(tokens[b, j, :lengths[b, j]].tolist(), skip_special_tokens=True)
                  for j in range(k)] for b in range(n)]
    return ScoreResult(rewards=rewards.mean(axis=1), sample_rewards=rewards,
                       reward_std=rewards.std(axis=1), critiques=critiques, truncated=truncated,
                       critique_tokens=lengths)


# --- command line ---------------------------------------------------------------------------


MESH_AXES = ("data", "fsdp", "tensor")
DTYPES = ("float32", "bfloat16")


def parse_mesh(text: str):
    """``"tensor=4"`` or ``"data=2,fsdp=1,tensor=2"`` -> MeshConfig; unnamed axes keep
    data=-1 (the devices the others leave), fsdp=1, tensor=1."""
    from cloud_jax.config import MeshConfig

    sizes = {}
    for part in (p.strip() for p in text.split(",")):
        axis, eq, value = part.partition("=")
        axis = axis.strip()
        if not eq or axis not in MESH_AXES:
            raise argparse.ArgumentTypeError(
                f"{part!r}: expected AXIS=N with AXIS one of {', '.join(MESH_AXES)}, "
                "e.g. tensor=4 or data=2,tensor=2")
        if axis in sizes:
            raise argparse.ArgumentTypeError(f"{text!r}: axis {axis} given twice")
        try:
            sizes[axis] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: {value!r} is not an integer") from None
        if sizes[axis] < 1 and sizes[axis] != -1:
            raise argparse.ArgumentTypeError(f"{part!r}: an axis size is >= 1, or -1 for the "
                                             "devices the others leave")
    return MeshConfig(**sizes)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Where and in what precision the model runs (``score``, ``critique``, ``evaluate``)."""
    parser.add_argument("--checkpoint", required=True,
                        help="CLoud reference-layout or HF directory (or hub id)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer ('byte', a directory or hub id) if the checkpoint has none")
    parser.add_argument("--mesh", type=parse_mesh, default=None, metavar="AXIS=N[,AXIS=N]",
                        help="a data x fsdp x tensor mesh over this host's devices, e.g. "
                             "tensor=4 to split the weights four ways (unnamed axes: data=-1, "
                             "fsdp=1, tensor=1); default: every local device on data, weights "
                             "replicated")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute dtype (default: float32)")
    parser.add_argument("--param-dtype", choices=DTYPES, default=None,
                        help="weights in memory (default: float32; bfloat16 halves them)")


def add_sampling_args(parser: argparse.ArgumentParser, defaults: ScoreConfig) -> None:
    """Options shared by ``score`` and ``critique``."""
    add_model_args(parser)
    parser.add_argument("--input", required=True, help="rows: JSONL file(s), comma-separated")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="0 is greedy (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-critique-tokens", type=int, default=defaults.max_critique_tokens)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="inputs per compiled batch (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=defaults.max_length,
                        help="prefill tokens at most; prompts are cut from the left")
    parser.add_argument("--critique-prefix", default=defaults.critique_prefix,
                        help="text the critique starts after (default: the one the checkpoint "
                             "was trained with, else the standard prefix)")


def config_from_args(args: argparse.Namespace, **fields) -> ScoreConfig:
    return ScoreConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       max_critique_tokens=args.max_critique_tokens, seed=args.seed,
                       batch_size=args.batch_size, max_length=args.max_length,
                       critique_prefix=args.critique_prefix, **fields).validate()


def load_model(args: argparse.Namespace):
    """The model of ``add_model_args``' options, placed on this host's devices."""
    import cloud_jax
    from cloud_jax.config import MeshConfig
    from cloud_jax.data.tokenizer import load_tokenizer
    from cloud_jax.sharding import make_mesh

    # Local devices only: every host of a pod samples its own share, with no traffic between hosts.
    devices = jax.local_devices()
    mesh_cfg = args.mesh if args.mesh is not None else (MeshConfig() if len(devices) > 1 else None)
    try:
        mesh = None if mesh_cfg is None else make_mesh(mesh_cfg, devices)
    except ValueError as err:
        raise SystemExit(f"--mesh: {err}") from None
    overrides = {k: v for k, v in (("dtype", args.dtype), ("param_dtype", args.param_dtype))
                 if v is not None}
    rm = cloud_jax.load(args.checkpoint, mesh=mesh, rules=SAMPLE_RULES, **overrides)
    if mesh is not None:
        print(f"model on a {dict(mesh.shape)} mesh of {len(devices)} local device(s)",
              file=sys.stderr)
    if args.tokenizer is not None:
        rm.tokenizer = load_tokenizer(args.tokenizer)
    if rm.tokenizer is None:
        raise SystemExit(f"{args.checkpoint} holds no tokenizer: pass --tokenizer")
    return rm


def progress_bar(total: int, unit: str):
    """A tqdm bar over rows that also shows critique tokens per second; returns (bar, callback)."""
    import time

    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, dynamic_ncols=True, file=sys.stderr)
    start, counted = time.perf_counter(), [0]

    def on_batch(done: int, new_tokens: int) -> None:
        counted[0] += new_tokens
        bar.update(done)
        bar.set_postfix(tokens_per_s=f"{counted[0] / max(time.perf_counter() - start, 1e-9):.1f}")

    return bar, on_batch


def read_jsonl(paths: str) -> list[tuple[str, dict]]:
    """(``file:line``, row object) for every non-blank line of the comma-separated files."""
    from cloud_jax.data.schema import expand_paths

    rows = []
    for path in expand_paths(paths):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: invalid JSON: {err.msg}") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: a row must be a JSON object")
                rows.append((f"{path}:{lineno}", obj))
    return rows


def _texts(rows: list[tuple[str, dict]]) -> tuple[list[str], list[tuple[int, str]]]:
    """The fields to score in each row: ``response``, or ``chosen`` and ``rejected``."""
    jobs = []
    for i, (where, obj) in enumerate(rows):
        fields = ["response"] if "response" in obj else ["chosen", "rejected"]
        for field in ["prompt"] + fields:
            if not isinstance(obj.get(field), str):
                raise ValueError(f"{where}: field '{field}' must be a string (a row needs "
                                 "'prompt' and 'response', or 'prompt', 'chosen' and 'rejected')")
        jobs.extend((i, f) for f in fields)
    return [rows[i][1]["prompt"] for i, _ in jobs], jobs


def write_jsonl_atomic(path: str, objs: Sequence[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for obj in objs:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_jax score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(parser, ScoreConfig())
    parser.add_argument("--output", required=True, help="scored rows (JSONL)")
    parser.add_argument("--num-samples", type=int, default=1, help="K critiques per response")
    parser.add_argument("--classic", action="store_true",
                        help="a classic reward model: no critique, one forward per response")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, num_samples=args.num_samples, classic=args.classic)
    rows = read_jsonl(args.input)
    prompts, jobs = _texts(rows)
    rm = load_model(args)
    bar, on_batch = progress_bar(len(jobs), "responses")
    with bar:
        result = score(rm, prompts, [rows[i][1][f] for i, f in jobs], cfg, on_batch)
    out = [dict(obj) for _, obj in rows]
    for j, (i, field) in enumerate(jobs):
        prefix = "" if field == "response" else f"{field}_"
        out[i].update({
            f"{prefix}reward": float(result.rewards[j]),
            f"{prefix}sample_rewards": result.sample_rewards[j].tolist(),
            f"{prefix}reward_std": float(result.reward_std[j]),
        })
        if not cfg.classic:
            out[i][f"{prefix}critiques"] = result.critiques[j]
            out[i][f"{prefix}truncated"] = result.truncated[j].tolist()
    write_jsonl_atomic(args.output, out)
    print(f"scored {len(jobs)} responses of {len(rows)} rows -> {args.output}", file=sys.stderr)
    return 0
