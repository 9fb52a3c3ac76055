"""What the commands share: model and sampling options, ``--mesh`` parsing, model loading,
progress bars."""

from __future__ import annotations

import argparse
import glob
import os
import re
import signal
import sys
import threading
from typing import Callable, Dict, Mapping, Optional, Sequence

import jax

from cloud_jax.errors import (INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, CheckpointError,
                              ConfigError, GGUFConversionError, Preempted, RowTooLongError,
                              one_line)
from cloud_jax.model.config import DECODE_ATTENTION_IMPLS
from cloud_jax.scoring.rewards import DEFAULT_MAX_LENGTH, ScoreConfig
from cloud_jax.sharding import MESH_AXES, SAMPLE_RULES, MeshConfig, make_mesh

DTYPES = ("float32", "bfloat16")


def parse_mesh(text: str):
    """``"tensor=4"`` or ``"data=2,fsdp=1,tensor=2"`` -> MeshConfig; unnamed axes keep
    data=-1 (the devices the others leave), fsdp=1, tensor=1."""
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
    parser.add_argument("--decode-attention-impl", choices=DECODE_ATTENTION_IMPLS, default=None,
                        help="the critique decode's attention: XLA's operations (default), "
                             "one Pallas (Triton) kernel a layer on NVIDIA GPUs (pallas), or "
                             "the kernel on an NVIDIA GPU where the shapes suit it and XLA's "
                             "elsewhere (auto) (model.decode_attention_impl; "
                             "cloud_jax/model/gpu_kernels.py)")


def add_input_args(parser: argparse.ArgumentParser, *, required: bool,
                   what: str = "rows") -> None:
    """``--input`` (files or Hugging Face datasets), ``--split`` and ``--column``."""
    parser.add_argument("--input", required=required, default=None,
                        help=f"{what}: JSONL / JSON / Parquet file(s), comma-separated or a glob, "
                             "a Hugging Face dataset directory (save_to_disk, or Parquet/Arrow "
                             "files with a README card) or hf://owner/name")
    parser.add_argument("--split", default="",
                        help="the split of a dataset input that has several (default: its only "
                             "split; row files have none, and a split given for files only is "
                             "refused)")
    parser.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                        help="read FIELD from the input's COLUMN (repeatable), e.g. "
                             "--column prompt=question")


def columns_from_args(args: argparse.Namespace) -> Dict[str, str]:
    """``--column FIELD=COLUMN`` options -> {field: column}, each checked."""
    from cloud_jax.data.config import Columns

    columns: Dict[str, str] = {}
    for item in args.column:
        field, sep, column = item.partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not field or not column:
            raise ConfigError(f"--column {item!r}: expected FIELD=COLUMN, e.g. prompt=question")
        Columns.check_field(field, f"--column {item!r}")
        if field in columns:
            raise ConfigError(f"--column {item!r}: {field} is mapped twice")
        columns[field] = column
    return columns


def add_sampling_args(parser: argparse.ArgumentParser, defaults: ScoreConfig) -> None:
    """Options shared by ``score`` and ``critique``."""
    add_model_args(parser)
    add_input_args(parser, required=True)
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="0 is greedy (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-critique-tokens", type=int, default=defaults.max_critique_tokens,
                        help="critique-token budget; a critique that reaches it is flagged "
                             "truncated (default %(default)s; the reference samples up to 1024)")
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                        help="Hugging Face's repetition penalty; 1.0 is off (default "
                             "%(default)s; the reference samples with 1.01)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress (otherwise on stderr: a bar on a terminal, a line "
                             "every 30 seconds in a log file or pipe)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="inputs per compiled batch (default %(default)s)")
    parser.add_argument("--max-length", type=int, default=defaults.max_length,
                        help="prefill tokens at most, and never more than the model's "
                             "positions leave after --max-critique-tokens + 1; prompts are cut "
                             f"from the left (default {DEFAULT_MAX_LENGTH}, held to what the "
                             "positions allow; a value given above them is warned about once)")
    parser.add_argument("--critique-prefix", default=defaults.critique_prefix,
                        help="text the critique starts after (default: the one the checkpoint "
                             "was trained with, else the standard prefix)")
    parser.add_argument("--steps-per-check", type=int, default=defaults.steps_per_check,
                        help="decode steps between two checks of whether every critique has "
                             "ended; on a GPU each check waits for the device (default "
                             "%(default)s; the same critiques at any value)")
    parser.add_argument("--decode-phases", type=int, default=defaults.decode_phases,
                        help="loops the decode grows the critiques' cache in, each compiled on "
                             "its own: more read fewer empty slots a step, 1 compiles fastest "
                             "(default %(default)s; the same critiques at any value)")


def as_flags(message: str, names) -> str:
    """``message`` about settings by their Python names, told in the command's flags: ``top_k=0``
    becomes ``--top-k 0`` and ``top_k`` ``--top-k`` (names without an underscore only in the
    ``name=value`` form, so that words such as "seed" in prose stay words)."""
    for name in sorted(names, key=len, reverse=True):
        flag = "--" + name.replace("_", "-")
        message = re.sub(rf"(?<![-\w]){re.escape(name)}=", flag + " ", message)
        if "_" in name:
            message = re.sub(rf"(?<![-\w]){re.escape(name)}(?!\w)", flag, message)
    return message


def too_long_in_flags(err: RowTooLongError, args: argparse.Namespace) -> ConfigError:
    """An input too long (its row and field named), with what to change told in the command's
    flags: ``raise --max-length`` where the Python API says ``raise max_length``."""
    return ConfigError(f"{err.where}: {as_flags(err.detail, vars(args))}")


def field_error(field: str, err: Exception, names) -> str:
    """A serving setting's error (``InvalidField``: "field: message") for a command line: the
    message in flags, led by the flag unless it names it already."""
    text = str(err)
    text = as_flags(text[len(field) + 2:] if text.startswith(f"{field}: ") else text, names)
    flag = "--" + field.replace("_", "-")
    return text if re.search(rf"{flag}(?![-\w])", text) else f"{flag}: {text}"


def config_from_args(args: argparse.Namespace, **fields) -> ScoreConfig:
    """The scoring options as a checked ScoreConfig; a bad one is a ConfigError (status 2) told in
    the command's flags."""
    try:
        return _config_from_args(args, **fields)
    except ValueError as err:
        raise ConfigError(as_flags(str(err), vars(args))) from None


def _config_from_args(args: argparse.Namespace, **fields) -> ScoreConfig:
    return ScoreConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       max_critique_tokens=args.max_critique_tokens, seed=args.seed,
                       repetition_penalty=args.repetition_penalty,
                       batch_size=args.batch_size, max_length=args.max_length,
                       critique_prefix=args.critique_prefix,
                       steps_per_check=args.steps_per_check,
                       decode_phases=args.decode_phases, **fields).validate()


def load_model(args: argparse.Namespace, *, all_devices: bool = True):
    """The model of ``add_model_args``' options, placed on this host's devices (without
    ``--mesh``: every one on data, or the first alone where ``all_devices`` is false)."""
    import cloud_jax
    from cloud_jax.data.tokenizer import load_tokenizer

    # Local devices only: every host of a pod samples its own share, with no traffic between hosts.
    devices = jax.local_devices()
    many = all_devices and len(devices) > 1
    mesh_cfg = args.mesh if args.mesh is not None else (MeshConfig() if many else None)
    try:
        mesh = None if mesh_cfg is None else make_mesh(mesh_cfg, devices, flag="--mesh")
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"--mesh: {err}") from None
    overrides = {k: v for k, v in (("dtype", args.dtype), ("param_dtype", args.param_dtype),
                                   ("decode_attention_impl", args.decode_attention_impl))
                 if v is not None}
    rm = cloud_jax.load(args.checkpoint, mesh=mesh, rules=SAMPLE_RULES, **overrides)
    if mesh is not None:
        print(f"model on a {dict(mesh.shape)} mesh of {len(devices)} local device(s)",
              file=sys.stderr)
    if args.tokenizer is not None:
        try:
            rm.tokenizer = load_tokenizer(args.tokenizer)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--tokenizer {args.tokenizer!r} does not load ({err}); give "
                              "'byte', a tokenizer directory or a hub id") from None
    if rm.tokenizer is None:
        raise ConfigError(f"{args.checkpoint} holds no tokenizer: pass --tokenizer")
    return rm


def progress_bar(total: int, unit: str, disable: bool = False, desc: str = ""):
    """A progress bar over rows that also shows critique tokens per second; returns (bar,
    callback). On a terminal a tqdm bar, in a log a line every 30 seconds
    (:mod:`cloud_jax.progress`). ``disable``: no bar (--no-progress)."""
    import time

    from cloud_jax import progress

    bar = progress.bar(total, unit, desc=desc, disable=disable)
    start, counted = time.perf_counter(), [0]

    def on_batch(done: int, new_tokens: int) -> None:
        counted[0] += new_tokens
        bar.update(done)
        bar.set_postfix(tokens_per_s=f"{counted[0] / max(time.perf_counter() - start, 1e-9):.1f}")

    return bar, on_batch


# Device nodes through which JAX could reach an accelerator on Linux, as globs under /dev: an
# NVIDIA GPU's driver (nvidiactl inside containers, dxg under WSL2), AMD's ROCm driver (kfd), a
# TPU's (accel* up to v4, a VFIO group from v5e on; any group counts, whatever its device).
ACCELERATOR_DEVICE_NODES = ("nvidia[0-9]*", "nvidiactl", "dxg", "kfd", "accel*", "vfio/[0-9]*")
# Variables that say this process is meant to run on a TPU (a GKE TPU pod sets them; JAX's own
# override) or on a PJRT plugin named by path. Not every TPU_*: JAX and libtpu set
# TPU_LIBRARY_PATH and TPU_SKIP_MDS_QUERY in-process on any host, the latter precisely when they
# see no TPU; and TPU_NAME, which neither JAX nor libtpu reads, is tpu_scripts/' name of the
# slice to reach, often exported in a workstation's shell (a TPU VM itself shows its device nodes).
ACCELERATOR_VARIABLES = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID",
                         "TPU_TOPOLOGY", "CLOUD_TPU_TASK_ID", "JAX_FORCE_TPU_INIT",
                         "PJRT_NAMES_AND_LIBRARY_PATHS")
# Plugin families whose devices ACCELERATOR_DEVICE_NODES finds; a JAX plugin of any other name
# may serve a device these nodes do not show, and keeps JAX's own discovery.
KNOWN_PLUGIN_FAMILIES = ("cuda", "rocm")


def _installed_jax_plugins() -> list:
    """The names of the PJRT plugins JAX would load: modules of the ``jax_plugins`` namespace
    and ``jax_plugins`` entry points (libtpu is not one; its devices are the TPU nodes)."""
    import importlib.metadata
    import importlib.util
    import pkgutil

    names = []
    try:
        spec = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    names += [ep.value for ep in importlib.metadata.entry_points(group="jax_plugins")]
    return names


def accelerator_hint(environ: Optional[Mapping[str, str]] = None, dev: str = "/dev",
                     plugins: Optional[Sequence[str]] = None,
                     platform: Optional[str] = None) -> Optional[str]:
    """Why JAX should look for accelerators itself on this host, or None where it has none to
    find: a device node of ACCELERATOR_DEVICE_NODES, a variable of ACCELERATOR_VARIABLES, an
    installed JAX plugin of a family other than KNOWN_PLUGIN_FAMILIES, or an OS other than Linux
    (whose device nodes these are). Reads names of files and variables only: nothing is loaded
    or initialised. ``environ``, ``dev``, ``plugins``, ``platform``: this host's by default."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux"):
        return f"platform {platform}"
    for pattern in ACCELERATOR_DEVICE_NODES:
        found = sorted(glob.glob(os.path.join(dev, pattern)))
        if found:
            return found[0]
    for name in ACCELERATOR_VARIABLES:
        if name in environ:
            return f"${name}"
    for name in _installed_jax_plugins() if plugins is None else plugins:
        if not any(family in name.lower() for family in KNOWN_PLUGIN_FAMILIES):
            return f"JAX plugin {name}"
    return None


def default_to_cpu_without_accelerator(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Where ``JAX_PLATFORMS`` is not set and :func:`accelerator_hint` finds nothing, pins JAX to
    the CPU (``jax_platforms=cpu``) before it creates a backend, and returns True.

    A CPU host with libtpu or JAX's CUDA plugin installed (``make venv-tpu``, ``make
    venv-gpu-aot``, for ``aot``) would otherwise print some 40 lines of plugin tracebacks and
    TPU warnings as every command starts, and probe for a TPU first. Pinned, JAX still registers
    the CUDA plugin and ``aot`` still loads libtpu for a topology: compiling for either needs no
    device. Any ``JAX_PLATFORMS`` (``""`` included: JAX's own discovery), a platform set in
    JAX's config, or a backend already made is left alone. Prints nothing."""
    environ = os.environ if environ is None else environ
    if ("JAX_PLATFORMS" in environ or jax.config.jax_platforms is not None
            or accelerator_hint(environ) is not None):
        return False
    try:
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # a backend exists already: JAX has chosen
        return False
    return True


USER_ERROR_EXIT_CODE = 2


def user_error_types() -> tuple[type[BaseException], ...]:
    """What a user can fix by changing a flag, a config value, a file or a path.

    Imported here, not at module level, so that ``--help`` of a command does not load the data and
    checkpoint stacks. FloatingPointError is the training loss turning NaN, which the config (learning
    rate, dtype) fixes.
    """
    from cloud_jax.data.schema import RowError
    from cloud_jax.scoring.rewards import InputTooLongError

    return (ConfigError, CheckpointError, RowError, GGUFConversionError, FileNotFoundError,
            FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
            FloatingPointError, InputTooLongError)


def run_command(main_fn: Callable[[Optional[Sequence[str]]], Optional[int]],
                argv: Sequence[str]) -> int:
    """Runs one command: a user error becomes one ``error: ...`` line on stderr and exit status 2.

    SIGTERM (how preemption arrives) makes the command exit with PREEMPTED_EXIT_CODE and one
    ``preempted: ...`` line, so that schedulers relaunch it: the training loop saves a checkpoint
    first and installs its own handler for that; anywhere else (data preparation, a checkpoint
    restore, ``critique``, ``score``, ``evaluate``) the signal raises Preempted where it lands,
    and the rerun resumes or redoes the work (every output is written whole or not at all). On
    several hosts too (JAX's preemption service, which would catch the signal, is off:
    cloud_jax.sharding.init_distributed), except that training there keeps a SIGTERM from
    before its step loop until the first step, where every host stops together.
    On a host with no accelerator device and no ``JAX_PLATFORMS``, JAX runs on the CPU without
    probing for one (:func:`default_to_cpu_without_accelerator`).
    Ctrl-C (SIGINT, KeyboardInterrupt) stops a command the same way, with one ``interrupted: ...``
    line and INTERRUPTED_EXIT_CODE (130) instead of a traceback of wherever it landed. Any other
    exception is a bug and keeps its traceback. A leading ``--debug`` in ``argv`` keeps the
    traceback of user errors and of Ctrl-C too.
    """
    default_to_cpu_without_accelerator()
    argv = list(argv)
    debug = argv[:1] == ["--debug"]
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_preempted)
    try:
        return int(main_fn(argv[debug:]) or 0)
    except Preempted as err:
        print(f"preempted: {err}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: stopped by Ctrl-C (SIGINT) before finishing; run the same command "
              "again to resume (finished work is kept, unfinished work is redone)",
              file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs just below
        if debug or not isinstance(err, user_error_types()):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_preempted(signum, frame) -> None:
    raise Preempted("stopped by SIGTERM before finishing; run the same command again to resume "
                    "(finished work is kept, unfinished work is redone)")


