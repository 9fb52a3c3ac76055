"""Device mesh, multi-host start-up, the logical-axis rules that map array dimensions onto it, and
the chips' peak figures (MFU, the ``aot`` command).

Every parameter, activation and cache array is annotated with logical axis names (``embed``,
``heads``, ``activation_batch``, ...). One rules table maps those names to the mesh axes ``data``,
``fsdp`` and ``tensor``; the sampling variant keeps weights unsharded along ``fsdp`` so a decode
step does not all-gather every weight.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Optional, Sequence, TypeVar

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cloud_jax.errors import ConfigError, Preempted, one_line


log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh. -1 on one axis takes the devices the others leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

Rules = Sequence[tuple[str, Any]]

# Training: batch over data x fsdp, weights' embed dim over fsdp (ZeRO-3 style), heads / mlp / vocab
# over tensor.
TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("reward_hidden", None),
    ("reward_out", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_kv_heads", "tensor"),
    ("cache_length", None),
    ("cache_head_dim", None),
)

# Sampling: weights replicated across data x fsdp (tensor-parallel only), so each decode step reads
# local weights; rows of the batch spread over data x fsdp.
SAMPLE_RULES: Rules = tuple(
    (name, None) if name == "embed" else (name, target) for name, target in TRAIN_RULES
)


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None, *,
              flag: Optional[str] = None) -> Mesh:
    """Builds a ``data x fsdp x tensor`` mesh; one axis may be -1 to take the remaining devices.
    Sizes that make no such mesh of ``devices`` are a ConfigError naming them: as the config's
    ``mesh.AXIS`` keys, or, given ``flag`` (a command's ``--mesh``), as that option's
    ``AXIS=N``."""
    cfg = cfg or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    head = flag or "mesh"

    def key(axis: str) -> str:
        return f"{flag} {axis}" if flag else f"mesh.{axis}"

    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    for axis, size in zip(MESH_AXES, sizes):
        if size < 1 and size != -1:
            raise ConfigError(f"{key(axis)}={size}: an axis size is >= 1, or -1 for the devices "
                              "the other axes leave")
    if sizes.count(-1) > 1:
        raise ConfigError(f"{head}: at most one axis may be -1, got data={cfg.data}, "
                          f"fsdp={cfg.fsdp}, tensor={cfg.tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"{head}: {len(devices)} devices are not divisible by the fixed "
                              f"axes (product {known}) of data={cfg.data}, fsdp={cfg.fsdp}, "
                              f"tensor={cfg.tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"{head}: data*fsdp*tensor = {math.prod(sizes)} but {len(devices)} "
                          f"devices are present; set {key('data')}=-1 to use them all")
    mesh = jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)
    return _tensor_within_hosts(mesh)


def _tensor_within_hosts(mesh: Mesh) -> Mesh:
    """``mesh``, or where its devices span several processes and its tensor groups cross between
    them while ``mesh.tensor`` divides every process's device count, the same mesh shape over the
    same devices with each tensor group on one process's own devices.

    JAX lays a mesh along the slice's physical torus, and the ring it picks for the last axis can
    cross hosts (``tensor=4`` on v5p-64 or v5p-128, whose hosts hold 2x2x1 chips, or on v5e-16):
    each host then holds parts of rows it does not feed, which training refuses
    (:func:`check_batch_split_over_processes`). Kept in the physical order within each host and
    the order the hosts first appear in, each host's devices make whole tensor groups and so
    whole shards of the batch. A mesh whose batch split already suits the hosts is unchanged."""
    groups: dict[int, list] = {}
    for device in mesh.devices.flat:
        groups.setdefault(device.process_index, []).append(device)
    counts = {len(group) for group in groups.values()}
    tensor = mesh.shape["tensor"]
    if len(groups) == 1 or len(counts) != 1 or next(iter(counts)) % tensor:
        return mesh  # one host, or a tensor group no host can hold: the check says so
    try:
        check_batch_split_over_processes(mesh)
        return mesh
    except ConfigError:
        pass
    devices = np.array([d for group in groups.values() for d in group]).reshape(
        mesh.devices.shape)
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def axes_size(mesh: Mesh, axes: Any) -> tuple[tuple[str, ...], int]:
    """A PartitionSpec entry (None, a mesh axis or a tuple of them) as (its axis names, how many
    shards they split a dimension into on ``mesh``)."""
    names = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
    return names, math.prod(mesh.shape[a] for a in names)


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, where: str) -> PartitionSpec:
    """Drops mesh axes that do not divide a dimension, and says so (instead of failing later)."""
    fixed = []
    for dim, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fixed.append(None)
            continue
        names, size = axes_size(mesh, axes)
        if shape[dim] % size:
            log.warning("%s: dimension %d (size %d) is not divisible by mesh axes %s (size %d); "
                        "replicating it instead", where, dim, shape[dim], names, size)
            fixed.append(None)
        else:
            fixed.append(axes)
    return PartitionSpec(*fixed)


def logical_to_shardings(logical_specs: Any, shapes: Any, mesh: Mesh, rules: Rules) -> Any:
    """Maps a tree of logical PartitionSpecs (and matching shapes) to NamedShardings on ``mesh``."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    flat_specs, treedef = jax.tree.flatten_with_path(
        mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_shapes = treedef.flatten_up_to(shapes)
    out = []
    for (path, spec), shape in zip(flat_specs, flat_shapes):
        shape = tuple(getattr(shape, "shape", shape))
        spec = _fit_spec(spec, shape, mesh, jax.tree_util.keystr(path))
        out.append(NamedSharding(mesh, spec))
    return jax.tree.unflatten(treedef, out)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = TRAIN_RULES) -> NamedSharding:
    """Sharding for a batch array whose leading dim is the batch: over the rule for ``batch``."""
    axes = dict(rules)["batch"]
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def check_batch_split_over_processes(mesh: Mesh, rules: Rules = TRAIN_RULES,
                                     process_of=lambda device: device.process_index) -> None:
    """A ConfigError unless the batch's sharding gives every process of ``mesh`` its own equal,
    disjoint share of the rows: each process feeds only its rows (``global_batch_from_host``), so
    a batch axis that leaves processes holding the same rows (``mesh.tensor`` across hosts with
    ``data x fsdp`` smaller than the process count) would silently mix their batches."""
    processes = sorted({process_of(d) for d in mesh.devices.flat})
    if len(processes) == 1:
        return
    names, shards = axes_size(mesh, dict(rules)["batch"])
    held = {p: set() for p in processes}
    for device, index in batch_sharding(mesh, 1, rules).devices_indices_map((shards,)).items():
        held[process_of(device)].add(index[0].indices(shards)[0])
    sizes = {len(rows) for rows in held.values()}
    if len(sizes) > 1 or sum(map(len, held.values())) != shards:
        raise ConfigError(
            f"mesh {dict(mesh.shape)}: the batch is split over {' x '.join(names) or 'no axis'} "
            f"({shards} shard(s)), which does not give each of the {len(processes)} processes "
            "its own rows; make mesh.data x mesh.fsdp a multiple of the process count, with "
            "mesh.tensor within one host")


def global_batch_from_host(local: dict[str, np.ndarray], mesh: Mesh,
                           rules: Rules = TRAIN_RULES) -> dict[str, jax.Array]:
    """Assembles global arrays from each host's shard of the batch (leading dim split by host)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, rules), v)
        for k, v in local.items()
    }


# When to call jax.distributed.initialize(); see init_distributed.
DISTRIBUTED_MODES = ("auto", "on", "off")


_GCE_METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


def _tpu_vm_slice_workers() -> int:
    """The workers of the Cloud TPU VM slice this host belongs to, as the GCE metadata server
    lists them (what JAX's own cluster detection reads); 0 where that is not known. Asked only
    on a host with TPU chips attached, so other machines make no network call."""
    try:
        from jax._src import hardware_utils

        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except Exception:  # a JAX without the helper: the environment variables decide
        return 0
    if not chips:
        return 0
    import urllib.request

    request = urllib.request.Request(_GCE_METADATA + "worker-network-endpoints",
                                     headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            endpoints = answer.read().decode()
    except OSError:
        return 0
    return len([w for w in endpoints.split(",") if w.strip()])


def _multi_host_environment() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    # A TPU pod slice on GKE lists every worker; one host lists one (or nothing).
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    # A Cloud TPU VM slice (tpu_scripts/) sets none of these: its metadata lists the workers.
    return _tpu_vm_slice_workers() > 1


def init_distributed(mode: str) -> bool:
    """Calls ``jax.distributed.initialize()`` where the environment asks for it; returns whether
    it did. Must run before anything touches a JAX device."""
    if mode == "off" or (mode == "auto" and not _multi_host_environment()):
        return False
    import jax

    def env_int(name: str) -> Optional[int]:
        value = os.environ.get(name)
        return int(value) if value not in (None, "") else None

    # SIGTERM stays with cloud_jax's handlers (cloud_jax.cli.common.run_command; the training
    # loop's hosts agree on the step to stop at). JAX's preemption service would take it over
    # for its own sync point, and swallow it before the step loop: a run resumed from a
    # checkpoint then never reached that point, and trained on until killed.
    jax.config.update("jax_enable_preemption_service", False)
    # Unset values are left to JAX's cluster detection (TPU metadata, SLURM, Open MPI).
    jax.distributed.initialize(num_processes=env_int("JAX_NUM_PROCESSES"),
                               process_id=env_int("JAX_PROCESS_ID"))
    return True


# How long the other processes wait for process 0's part of first_on_process_0 (a day: a data
# set tokenized on one host can take hours; a dead process 0 ends the wait sooner, see there).
FIRST_ON_PROCESS_0_TIMEOUT_S = 24 * 3600
# Calls of first_on_process_0 so far in this process, by name: every process makes the same calls
# in the same order, so the n-th call of a name has the same key on each.
_FIRST_ON_PROCESS_0_CALLS: dict[str, int] = {}

T = TypeVar("T")


def first_on_process_0(work: Callable[[], T], name: str, what: str, *,
                       timeout_s: float = FIRST_ON_PROCESS_0_TIMEOUT_S, poll_s: float = 0.5,
                       user_errors: tuple[type[BaseException], ...] = (ConfigError,),
                       client: Any = None, process_index: Optional[int] = None,
                       process_count: Optional[int] = None) -> T:
    """Runs ``work`` on process 0, then on every other process of the job, and returns its result
    on each: process 0 makes something in a place the hosts may share (a cache directory on NFS
    or a bucket), the others then find it made instead of writing it at the same time. One
    process (no ``jax.distributed``) just runs ``work``.

    The others wait on ``jax.distributed``'s key-value store, not on a device collective (on CPU
    that one gives up after 30 s, and on an accelerator it would wait for ever on a process 0
    that failed). Process 0 posts how its ``work`` ended under ``cloud_jax/<name>/<n>/outcome``;
    where it raised, the others raise too, without running ``work``, naming process 0 and its error
    (``what`` says what it was doing): a ConfigError where the error was one of ``user_errors``,
    Preempted where process 0 was stopped, else a RuntimeError. A wait longer than ``timeout_s``,
    or a key-value store that no longer answers (process 0, which runs it, is gone), is a
    RuntimeError saying so. ``client``, ``process_index`` and ``process_count`` default to the
    running job's."""
    count = jax.process_count() if process_count is None else process_count
    if count == 1:
        return work()
    index = jax.process_index() if process_index is None else process_index
    if client is None:
        from jax._src import distributed

        client = distributed.global_state.client
    if client is None:  # processes JAX joined without jax.distributed: only a device barrier
        from jax.experimental import multihost_utils

        result = work() if index == 0 else None
        multihost_utils.sync_global_devices(f"cloud_jax {name}")
        return result if index == 0 else work()
    round_ = _FIRST_ON_PROCESS_0_CALLS.get(name, 0)
    _FIRST_ON_PROCESS_0_CALLS[name] = round_ + 1
    # A directory of one key: the store lists a directory without an error where it is empty.
    directory = f"cloud_jax/{name}/{round_}"
    key = directory + "/outcome"
    if index == 0:
        try:
            result = work()
        except BaseException as err:
            kind = ("preempted" if isinstance(err, (Preempted, KeyboardInterrupt))
                    else "user" if isinstance(err, user_errors) else "other")
            try:
                client.key_value_set(key, json.dumps(
                    {"kind": kind, "error": f"{type(err).__name__}: {one_line(err)}"}))
            except Exception as post:  # noqa: BLE001 - process 0's own error is the one to raise
                log.warning("could not tell the other processes that process 0 failed: %s",
                            one_line(post))
            raise
        client.key_value_set(key, json.dumps({"kind": "done"}))
        return result
    outcome = _wait_for_key(client, directory, key, what, timeout_s, poll_s)
    if outcome["kind"] == "done":
        return work()
    message = (f"process 0 could not {what}: {outcome['error']} (process {index} of {count} "
               "waited for it; process 0's log has the details)")
    if outcome["kind"] == "user":
        raise ConfigError(message)
    if outcome["kind"] == "preempted":
        raise Preempted(f"process 0 was stopped before it could {what}; run the same command "
                        "again to resume")
    raise RuntimeError(message)


def _wait_for_key(client: Any, directory: str, key: str, what: str, timeout_s: float,
                  poll_s: float) -> dict:
    """The JSON value process 0 posts under ``key`` (in ``directory``). Polled with a short sleep
    rather than one long blocking call, so that a signal (SIGTERM, Ctrl-C) is handled while
    waiting."""
    start = time.monotonic()
    next_note = start + 600
    while True:
        try:
            found = client.key_value_dir_get(directory)
        except Exception as err:  # noqa: BLE001 - any failure of the store ends the wait
            raise RuntimeError(
                f"lost contact with process 0 (jax.distributed's coordinator) while waiting for "
                f"it to {what}: {one_line(err)}. Process 0's log says why it stopped") from None
        values = [value for k, value in found if k == key]
        if values:
            return json.loads(values[0])
        now = time.monotonic()
        if now - start > timeout_s:
            raise RuntimeError(
                f"process 0 did not {what} within {timeout_s:.0f} s; see its log for where it "
                "stands, and run again once it is unstuck (a finished part is reused)")
        if now >= next_note:
            log.info("waiting for process 0 to %s (%.0f min so far)", what, (now - start) / 60)
            next_note = now + 600
        time.sleep(poll_s)


# --- the chips the devices are ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's figures: its peak for MFU, and for TPUs what the ``aot`` command
    needs to lay out a slice of them."""

    name: str  # for a TPU, the topology-string prefix libtpu knows
    device_kinds: tuple[str, ...]  # substrings of jax.Device.device_kind that name this chip
    peak_flops: float  # bf16 dense FLOP/s per chip
    hbm_bytes: float = 0.0  # per program; recorded for TPUs only
    torus_dims: int = 0  # 3: 3D torus (v4, v5p); 2: 2D (v5e, v6e); 0: not a TPU slice
    cores_in_name: int = 1  # TensorCores per chip counted by the accelerator-type name


# Peak FLOP/s: Google's Cloud TPU system-architecture pages and NVIDIA's data sheets (dense, not
# sparse). TPU hbm_bytes: what the TPU compiler of libtpu 0.0.42.1 lets one program use per chip
# (read from its out-of-memory message), a little under the 32 / 96 / 16 / 32 GiB on the chip.
CHIPS = {chip.name: chip for chip in (
    Chip("v4", ("TPU v4",), 275e12, 30.75 * 2**30, 3, 2),
    Chip("v5p", ("TPU v5p", "TPU v5"), 459e12, 95.74 * 2**30, 3, 2),
    Chip("v5e", ("TPU v5e", "TPU v5 lite"), 197e12, 15.75 * 2**30, 2, 1),
    Chip("v6e", ("TPU v6",), 918e12, 31.25 * 2**30, 2, 1),
    Chip("H200", ("H200",), 989e12),
    Chip("H100", ("H100",), 989e12),
    # The PCIe and NVL cards of a generation run slower clocks than its SXM ones.
    Chip("H100 PCIe", ("H100 PCIe",), 756e12),
    Chip("H100 NVL", ("H100 NVL",), 835e12),
    Chip("H200 NVL", ("H200 NVL",), 835e12),
    Chip("A100", ("A100",), 312e12),
)}


def chip_of(device_kind: str) -> Optional[Chip]:
    """The chip a ``jax.Device.device_kind`` names, or None; the longest matching name wins
    ("TPU v5 lite" is a v5e, not the v5p that "TPU v5" names)."""
    kind = device_kind.lower()
    matches = [(len(name), chip) for chip in CHIPS.values() for name in chip.device_kinds
               if name.lower() in kind]
    return max(matches, key=lambda m: m[0])[1] if matches else None
