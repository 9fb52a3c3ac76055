"""Typed, frozen configuration loaded from YAML with dotted ``key=value`` overrides.

OmegaConf does the YAML parsing, merging and type checking against the dataclass schema; an
unknown key or a value of the wrong type is a :class:`ConfigError` that names the key. A section
left empty in the file (``model:`` with every key under it commented out) takes its defaults, as
leaving it out does. Null (``key=null``, ``~`` or ``None`` on the command line; an empty value
in the file) leaves a key unset: None for an Optional key (``model.head_dim``), the empty text
for a text key that is off when empty (``init_from``, ``data.eval_path``); quoted
(``key='null'``) it is the text. The result is a tree of frozen dataclasses, so a loaded config
cannot change under a running job. OmegaConf is imported where a config is read or written, not
with this module: the schema's dataclasses alone (what `bench train` builds its step from) need
no YAML stack.

    cfg = load_config("configs/tiny_cpu.yaml", ["model.num_layers=4", "seed=1"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from typing import Any, Optional, Sequence

from cloud_jax.data.config import DataConfig
from cloud_jax.errors import ConfigError
from cloud_jax.model.config import ModelConfig, RopeScalingConfig
from cloud_jax.sharding import DISTRIBUTED_MODES, MeshConfig
from cloud_jax.training.losses import LossConfig
from cloud_jax.training.optim import OptimConfig
from cloud_jax.training.stages import stage

__all__ = ["Config", "ConfigError", "MeshConfig", "ModelConfig", "RopeScalingConfig",
           "config_from_dict", "load_config", "save_config", "to_yaml"]


NONFINITE_POLICIES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Paths are relative to the top-level ``output_dir`` unless absolute."""

    # critique_sft | cloud | classic | lm_pretrain (see docs/TRAINING.md).
    stage: str = "critique_sft"
    # Optimizer updates in the whole run; the learning-rate schedule spans exactly these. 0: one
    # pass over the train split for data.num_epochs epochs (the count is saved with the run).
    total_steps: int = 100
    # Stop (after a checkpoint) once this step is reached, leaving the schedule untouched; a later
    # run with the same output_dir resumes. 0 runs to total_steps. For time-limited jobs.
    stop_at_step: int = 0
    # Micro-batches per update: data.batch_pairs pairs are split into this many equal parts that
    # run one after another (lax.scan), and their gradients add up to the full batch's.
    grad_accum_steps: int = 1
    # Held-out evaluation every this many steps and at the end (needs data.eval_path); 0: never.
    eval_every: int = 100
    # Eval batches per evaluation; 0 reads the whole eval split.
    eval_batches: int = 0
    # Checkpoint every this many steps and at the end; 0: only at the end.
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # Orbax writes checkpoints in the background while training goes on.
    async_checkpointing: bool = True
    # Directory of the orbax checkpoints; empty: <output_dir>/checkpoints.
    checkpoint_dir: str = ""
    # Write the final weights as a reference-layout CLoud directory, <output_dir>/final, which
    # `init_from` of the next stage and `cloud_jax.load` read.
    export_final: bool = True
    # Metrics are averaged over this many steps before they are written; a window also ends at
    # each checkpoint, so a run resumed from one logs the steps an uninterrupted run logs.
    log_every: int = 10
    # One JSON object per logged step and per evaluation (relative: under output_dir), with
    # throughput.jsonl beside it; empty: neither file is written.
    metrics_file: str = "metrics.jsonl"
    # TensorBoard event files (tensorboardX, no TensorFlow) under this directory; empty: off.
    tensorboard_dir: str = "tensorboard"
    # On an object store (gs://, s3://) the metrics files and TensorBoard events are uploaded
    # (each upload rewrites whole objects) at most every this many seconds, and before each
    # checkpoint and at the end; 0: after every logged step. Local files are written at once.
    metrics_upload_every_s: float = 30.0
    # Weights & Biases project; empty: off. Needs `pip install wandb`.
    wandb_project: str = ""
    wandb_run_name: str = ""
    # What a non-finite loss or gradient norm does: error (stop with the step number) or skip
    # (leave params and optimizer state unchanged for that step, count it and go on; the
    # learning-rate schedule's counter is part of that state, so it does not advance).
    on_nonfinite: str = "error"
    # Peak FLOP/s of one device for the MFU estimate; 0 looks the device kind up in a small table
    # (TPU and recent NVIDIA GPUs, bf16) and leaves MFU out where it is unknown.
    peak_flops_per_device: float = 0.0
    # jax.distributed.initialize(): auto when JAX_COORDINATOR_ADDRESS is set or a multi-host TPU /
    # SLURM job is detected; on: always; off: never.
    distributed: str = "auto"
    # Progress on process 0: a tqdm bar on a terminal, a line every 30 s in a log file.
    progress_bar: bool = True

    def validate(self) -> "TrainConfig":
        stage(self.stage)
        if self.total_steps < 0:
            raise ConfigError(f"train.total_steps={self.total_steps}: must be >= 0 (0: one "
                              "pass over the data for data.num_epochs epochs)")
        if self.stop_at_step < 0 or self.total_steps and self.stop_at_step > self.total_steps:
            raise ConfigError(f"train.stop_at_step={self.stop_at_step}: must be in "
                              f"[0, train.total_steps={self.total_steps}]")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps={self.grad_accum_steps}: must be >= 1")
        for key in ("eval_every", "eval_batches", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)}: must be >= 0")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints={self.keep_checkpoints}: must be >= 1")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every={self.log_every}: must be >= 1")
        if not self.metrics_upload_every_s >= 0:
            raise ConfigError(f"train.metrics_upload_every_s={self.metrics_upload_every_s}: "
                              "must be >= 0 (seconds; 0: upload after every logged step)")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"train.on_nonfinite={self.on_nonfinite!r}: expected one of "
                              f"{', '.join(NONFINITE_POLICIES)}")
        if self.distributed not in DISTRIBUTED_MODES:
            raise ConfigError(f"train.distributed={self.distributed!r}: expected one of "
                              f"{', '.join(DISTRIBUTED_MODES)}")
        if self.peak_flops_per_device < 0:
            raise ConfigError(f"train.peak_flops_per_device={self.peak_flops_per_device}: "
                              "must be >= 0")
        return self


@dataclasses.dataclass(frozen=True)
class Config:
    """Top-level config. Sections for later stages are added here as they land."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    # Weight init and reward-head dropout; in [0, 2**32) (data.seed shuffles the rows).
    seed: int = 0
    # The run's directory (config.yaml, checkpoints, metrics, final/); empty is refused.
    output_dir: str = "runs/default"
    # Where the model comes from: "" (random init from `model`), a local HF or CLoud directory, or a
    # hub id.
    init_from: str = ""


def _explain(err: Exception, source: str, schema: type) -> ConfigError:
    """An OmegaConf error as a ConfigError naming its key, and for a key the schema does not have,
    the keys it may have meant."""
    from omegaconf.errors import ConfigKeyError

    key = getattr(err, "full_key", None)
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    where = f": key '{key}'" if key else ""
    hint = _did_you_mean(key, schema) if key and isinstance(err, ConfigKeyError) else ""
    return ConfigError(f"{source}{where}: {msg}{hint}")


def _did_you_mean(key: str, schema: type) -> str:
    """For `train.learning_rate`: '; learning_rate is a key of another section: optim.learning_rate'
    (OmegaConf itself suggests the close spellings within the section)."""
    from omegaconf import DictConfig, OmegaConf

    last = key.rsplit(".", 1)[-1]
    found: list[str] = []

    def walk(node, prefix: str) -> None:
        for name in node:
            child = node._get_node(name)
            if isinstance(child, DictConfig) and not child._is_none():
                walk(child, f"{prefix}{name}.")
            elif name == last:
                found.append(f"{prefix}{name}")

    walk(OmegaConf.structured(schema), "")
    return f"; {last} is a key of another section: {' or '.join(found)}" if found else ""


def _make_writable(node) -> None:
    # Frozen dataclasses give read-only nodes at every level; merging needs them writable until
    # `to_object` turns the tree back into frozen dataclasses.
    from omegaconf import DictConfig, OmegaConf

    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _make_writable(child)


_NO_DEFAULT = object()

# What `key=...` on the command line gives to leave a key unset (YAML's null, and Python's None).
_NULL_WORDS = ("null", "Null", "NULL", "~", "None")


def _defaults(schema: type) -> dict:
    """The dataclass ``schema``'s default of each field (_NO_DEFAULT: none)."""
    return {f.name: f.default if f.default is not dataclasses.MISSING
            else f.default_factory() if f.default_factory is not dataclasses.MISSING
            else _NO_DEFAULT for f in dataclasses.fields(schema)}


def _declared(schema: type, key: str) -> tuple[Any, Any]:
    """The type the dataclass ``schema`` declares for the dotted ``key`` and its default
    ((None, _NO_DEFAULT): no such key)."""
    import typing

    declared: Any = schema
    default: Any = _NO_DEFAULT
    for part in key.split("."):
        if not dataclasses.is_dataclass(declared):
            return None, _NO_DEFAULT
        declared, default = (typing.get_type_hints(declared).get(part),
                             _defaults(declared).get(part, _NO_DEFAULT))
    return declared, default


def _is_optional(declared: Any) -> bool:
    import types
    import typing

    return (typing.get_origin(declared) in (typing.Union, types.UnionType)
            and type(None) in typing.get_args(declared))


def _checked(value: Any, declared: Any, key: str, where: str, *, default: Any = _NO_DEFAULT,
             override: bool = False):
    """``value`` (as YAML reads it) for the dotted ``key`` the schema declares as ``declared``
    (with ``default``), ready to merge. A section left empty (null: every key under it commented
    out) is its defaults; a section given anything but keys is a ConfigError naming it. Null
    leaves a key unset: None for an Optional key (the text None too, which no Optional key
    takes), the empty text for a text key that is off when empty (init_from, data.eval_path);
    any other key has no unset value, and null for it is a ConfigError naming the key and its
    default. Keys the schema does not have pass through, for OmegaConf to name with the close
    spellings. ``override``: the value of a command-line ``key=value``, where a null section is
    refused (it would read as a reset, and merges nothing)."""
    import typing

    if dataclasses.is_dataclass(declared):
        if value is None and not override:
            return {}
        if value is None:
            raise ConfigError(f"{where}: key '{key}' is a section: set its keys "
                              f"({key}.KEY=value)")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}': a section of keys ({key}.KEY: value), "
                              f"not {value!r}")
        hints, defaults = typing.get_type_hints(declared), _defaults(declared)
        return {name: _checked(item, hints[name], f"{key}.{name}" if key else str(name), where,
                               default=defaults[name])
                if name in hints else item for name, item in value.items()}
    if _is_optional(declared):
        return None if value == "None" else value
    if typing.get_origin(declared) in (tuple, list) and value is not None:
        return _checked_list(value, typing.get_args(declared)[0], key, where)
    if value is not None:
        return value
    if declared is str and default == "":
        return ""
    shown = list(default) if isinstance(default, tuple) else default
    hint = ("" if default is _NO_DEFAULT else f" (its default: {shown!r})" if override
            else f", or leave the key out for its default ({shown!r})")
    raise ConfigError(f"{where}: key '{key}' has no value (null); give one{hint}")


# What an item of a list of each type must be, for the error that names a wrong one.
_ITEM_KINDS = {int: "an integer", float: "a number", str: "a text", bool: "true or false"}


def _checked_list(value: Any, item_type: Any, key: str, where: str) -> Any:
    """``value`` for the list-typed ``key`` of ``item_type`` items; a value that is no list, or an
    item that is not an ``item_type``, is a ConfigError naming the key (and the item's index),
    where OmegaConf names neither."""
    from omegaconf import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode
    from omegaconf.errors import ValidationError

    if isinstance(value, str) and value.startswith("${"):  # an interpolation: resolved later
        return value
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: key '{key}': a list ([a, b, ...]), not {value!r}")
    node = {int: IntegerNode, float: FloatNode, str: StringNode, bool: BooleanNode}.get(
        item_type, AnyNode)
    for i, item in enumerate(value):
        try:
            if item is None or isinstance(item, (dict, list, tuple)):
                raise ValidationError("not a single value")
            node(value=item)
        except ValidationError:
            kind = _ITEM_KINDS.get(item_type, getattr(item_type, "__name__", str(item_type)))
            raise ConfigError(f"{where}: key '{key}[{i}]': {item!r} is not {kind}") from None
    return value


def _list_in(schema: type, key: str) -> str | None:
    """The list-typed key that the dotted ``key`` goes into (data.length_buckets for
    data.length_buckets.1 or data.length_buckets[1]), None where it goes into none."""
    import typing

    declared: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(declared):
            return None
        name = part.split("[", 1)[0]
        declared = typing.get_type_hints(declared).get(name)
        if typing.get_origin(declared) in (tuple, list) and (name != part or i < len(parts) - 1):
            return ".".join(parts[:i] + [name])
    return None


def _yaml_value(value: str) -> Any:
    """An override's value as OmegaConf reads it (YAML; an interpolation stays as written)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.from_dotlist(["value=" + value]))["value"]


# A plain YAML 1.1 integer with a leading 0 (010) is octal: 8. Nobody writing a batch size or a
# step count means that, and the value would be taken without a word.
_OCTAL = re.compile(r"[-+]?0[0-7_]*[0-7][0-7_]*")


def _octal_problem(text: str) -> Optional[str]:
    """Why ``text`` (a plain scalar) must not be read as YAML reads it, or None."""
    text = text.strip()
    if not _OCTAL.fullmatch(text):
        return None
    return (f"{text} has a leading 0, and YAML reads such a number as octal ({text} is "
            f"{int(text.replace('_', ''), 8)}); write it without the leading 0 (or quoted, as "
            "text)")


def _octal_in_file(text: str, source: str) -> None:
    """Refuses a plain integer with a leading 0 anywhere in a YAML file, naming its line."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # the loader's own error names it
    todo = [root] if root is not None else []
    while todo:
        node = todo.pop()
        if isinstance(node, yaml.ScalarNode):
            if node.style is None and node.tag == "tag:yaml.org,2002:int":
                problem = _octal_problem(node.value)
                if problem:
                    raise ConfigError(f"{source}:{node.start_mark.line + 1}: {problem}")
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            todo.extend(v for pair in node.value for v in pair)


def _unquoted(value: str) -> str:
    """``value`` less the quotes around it where it is one YAML-quoted string."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        import yaml

        try:
            text = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(text, str):
            return text
    return value


def config_from_dict(data: dict, overrides: Sequence[str] = (), schema: type = Config,
                     source: str = "<dict>"):
    """Builds a frozen ``schema`` instance from a plain dict plus ``key=value`` overrides."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(schema)
    _make_writable(base)
    try:
        merged = OmegaConf.merge(base, OmegaConf.create(_checked(data or {}, schema, "", source)))
    except OmegaConfBaseException as err:
        raise _explain(err, source, schema) from None
    # The override that last set each key: an interpolation in it is resolved only at the end.
    set_by: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.num_layers=4")
        key, value = item.split("=", 1)
        key, where = key.strip(), f"override {item!r}"
        if key.startswith("+"):  # Hydra's +key=value (add a key) and ++key=value
            bare = key.lstrip("+")
            if _declared(schema, bare)[0] is not None:
                raise ConfigError(f"{where}: '+' adds a key, and this config's keys are fixed; "
                                  f"{bare} is one: give {bare}={value}")
            raise ConfigError(f"{where}: '+' adds a key, and this config's keys are fixed; "
                              f"{bare} is not one of them{_did_you_mean(bare, schema)}")
        declared, default = _declared(schema, key)
        try:
            if declared is None and _list_in(schema, key):
                whole = _list_in(schema, key)
                raise ConfigError(f"{where}: key '{whole}' is a list: give it whole, e.g. "
                                  f"{whole}=[a,b]")
            if declared is None:  # no such key: OmegaConf names it, with the close spellings
                merged.merge_with(OmegaConf.from_dotlist([item]))
                continue
            if declared is str:
                # A text key takes the text as given, not as YAML reads it: `key=` is the empty
                # text (e.g. data.eval_path= for no eval split), not null; "Critique: " stays
                # text with its trailing space, not a mapping; 0123 stays 0123. A value quoted
                # whole ('...' or "...") is unquoted as YAML does; unquoted, null (~, None)
                # leaves the key unset.
                value = None if value.strip() in _NULL_WORDS else _unquoted(value)
            else:
                problem = _octal_problem(value)
                if problem:
                    raise ConfigError(f"{where}: {problem}")
                value = _yaml_value(value)
            OmegaConf.update(merged, key, _checked(value, declared, key, where, default=default,
                                                   override=True), merge=True)
            set_by[key] = where
        except OmegaConfBaseException as err:
            raise _explain(err, where, schema) from None
        except yaml.YAMLError as err:  # the value is read as YAML: model.num_layers=[1
            why = getattr(err, "problem", None) or " ".join(str(err).split())
            raise ConfigError(f"{where}: the value is not valid YAML ({why})") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        # A value that fails to resolve is the file's, unless an override gave it.
        raise _explain(err, _setter(getattr(err, "full_key", None), set_by, source),
                       schema) from None
    if isinstance(cfg, Config):
        if not 0 <= cfg.seed < 2**32:  # jax.random.key keeps the low 32 bits of a larger seed
            raise ConfigError(f"seed={cfg.seed}: must be in [0, 2**32)")
        cfg.model.validate()
        problem = cfg.model.hf_family_problem()
        if problem:  # trained, it could not be exported as its family's checkpoint
            raise ConfigError(problem)
        cfg.optim.validate()
        cfg.data.validate()
        cfg.loss.validate()
        cfg.train.validate()
    return cfg


def _setter(key: Optional[str], set_by: dict, source: str) -> str:
    """Where the value of ``key`` (or of a section holding it) was given: the override that set
    it last, else ``source``."""
    key = re.sub(r"\[[^]]*\]", "", key or "")
    while key:
        if key in set_by:
            return set_by[key]
        key = key.rpartition(".")[0]
    return source


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (),
                schema: type = Config):
    """Loads ``path`` (YAML) onto the ``schema`` defaults, then applies dotted overrides."""
    from omegaconf import OmegaConf

    data: dict = {}
    source = "<defaults>"
    if path is not None:
        from cloud_jax import storage

        source = os.fspath(path)
        storage.check_path(source, "--config")
        # A local path or a gs:// / s3:// URL, read through storage.
        if storage.isdir(source):
            raise ConfigError(f"config file {source} is a directory: give a YAML file in it "
                              "(e.g. configs/tiny_cpu.yaml)")
        if not storage.isfile(source):
            raise ConfigError(f"config file {source} does not exist")
        text = storage.read_text(source)
        try:
            loaded = OmegaConf.load(io.StringIO(text))
        except Exception as err:  # yaml errors carry line numbers in their text
            raise ConfigError(f"{source}: not valid YAML: {err}") from None
        _octal_in_file(text, source)
        data = OmegaConf.to_container(loaded) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys")
    return config_from_dict(data, overrides, schema=schema, source=source)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Writes the resolved config, so a run or checkpoint records exactly what produced it."""
    from cloud_jax import storage

    storage.write_text_atomic(os.fspath(path), to_yaml(cfg))
