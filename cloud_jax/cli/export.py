"""``python -m cloud_jax export-hf``: write a loaded model in the CLoud reference layout, or its
backbone as a plain transformers causal-LM directory."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from cloud_jax.checkpoints.hf import save_hf_backbone


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_jax export-hf", description=__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="CLoud reference-layout directory, HF causal-LM directory or hub id")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", choices=("cloud", "backbone"), default="cloud",
                        help="cloud: reference CLoud layout (default); backbone: plain HF LM")
    parser.add_argument("--base-model-name", default=None,
                        help="base_model_name_or_path to record in the CLoud config")
    args = parser.parse_args(argv)

    import cloud_jax

    rm = cloud_jax.load(args.checkpoint)
    if args.format == "cloud":
        out = rm.save_pretrained(args.out, base_model_name_or_path=args.base_model_name)
    else:
        out = save_hf_backbone(rm.params, rm.config, args.out)
        if rm.tokenizer is not None:
            rm.tokenizer.save_pretrained(str(out))
    print(f"wrote {out}")
    return 0
