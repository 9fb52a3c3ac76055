"""``python -m cloud_jax export-hf``: write a loaded model in the CLoud reference layout, or its
backbone as a plain transformers causal-LM directory.

    python -m cloud_jax export-hf --checkpoint runs/sft/final --out exported
    python -m cloud_jax export-hf --checkpoint runs/sft --step 400 --out runs/sft/step_400

With ``--checkpoint`` a training run's output_dir (or its checkpoint directory) the weights of a
saved step are exported (``--step``, default the newest), as the run exports its last step to
``final/``: to evaluate or sample from a checkpoint before the end of training.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from cloud_jax import storage
from cloud_jax.checkpoints.hf import base_model_name_of, save_hf_backbone, staged_export


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_jax export-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="CLoud reference-layout directory, HF causal-LM directory or hub "
                             "id; or a training run's output_dir or checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", choices=("cloud", "backbone"), default="cloud",
                        help="cloud: reference CLoud layout (default); backbone: plain HF LM")
    parser.add_argument("--base-model-name", default=None,
                        help="base_model_name_or_path to record in the CLoud config")
    parser.add_argument("--step", type=int, default=None,
                        help="a training run's saved step to export (default: the newest)")
    parser.add_argument("--tokenizer", default=None,
                        help="with a training run: the tokenizer to write beside the weights, "
                             "when the run's data.tokenizer does not load here")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out although it is not empty: files of the names the "
                             "export has are replaced, an earlier export's weight files and chat "
                             "template (chat_template.jinja) removed, and the other files left as "
                             "they are")
    args = parser.parse_args(argv)
    if args.base_model_name and args.format == "backbone":
        parser.error("--base-model-name is recorded by a CLoud export (--format cloud); a "
                     "backbone export's config.json has no place for it")
    storage.check_output_dir(args.out, "--out")
    # Another model's files of other names (a chat template, base_config/) would stay beside the
    # export's.
    if not args.overwrite and storage.listdir(args.out):
        parser.error(f"--out {args.out} is not empty; pass --overwrite to write the export into "
                     "it anyway, or give an empty or new directory")

    from cloud_jax.training.loop import (export_params, is_checkpoint_dir, is_run_dir,
                                         load_checkpoint)

    if (args.step is not None or is_run_dir(args.checkpoint)
            or is_checkpoint_dir(args.checkpoint)):
        if args.base_model_name:
            parser.error("--base-model-name applies to a loaded model; a run's export records "
                         "the base model of its init_from")
        step, cfg, params, tok = load_checkpoint(args.checkpoint, args.step, args.tokenizer)
        if args.format == "cloud":
            out = export_params(cfg, cfg.model, params, tok, args.out)
        else:
            with staged_export(args.out) as local:
                save_hf_backbone(params, cfg.model, local)
                tok.save_pretrained(str(local))
            out = args.out
        print(f"wrote {out} (step {step} of {args.checkpoint})")
        return 0
    if args.tokenizer:
        parser.error("--tokenizer applies to a training run's checkpoint (with --step)")
    if args.base_model_name and base_model_name_of(args.base_model_name) is None:
        parser.error(f"--base-model-name {args.base_model_name!r} is not a hub id (owner/name) "
                     "nor a model directory that records one; an export never records a local "
                     "path (leave the flag out to record base_config, the backbone config beside "
                     "the weights)")

    import cloud_jax

    rm = cloud_jax.load(args.checkpoint)
    if args.format == "cloud":
        out = rm.save_pretrained(args.out, base_model_name_or_path=args.base_model_name)
    else:
        with staged_export(args.out) as local:
            save_hf_backbone(rm.params, rm.config, local)
            if rm.tokenizer is not None:
                rm.tokenizer.save_pretrained(str(local))
        out = args.out
    print(f"wrote {out}")
    return 0
