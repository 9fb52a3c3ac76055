"""Strict typed config: YAML + dotted overrides, errors that name the key, saved resolved config."""

import dataclasses
import re
from pathlib import Path

import pytest

from cloud_jax.errors import ConfigError
from cloud_jax.training.config import Config, load_config, save_config

YAML = """
model:
  num_layers: 3
  rope_scaling:
    type: llama3
    factor: 8.0
seed: 5
"""


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    cfg = load_config(path, ["model.hidden_size=96", "model.num_heads=6", "seed=7"])
    assert isinstance(cfg, Config)
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 96 and cfg.seed == 7
    assert cfg.model.rope_scaling.type == "llama3" and cfg.model.rope_scaling.factor == 8.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1


@pytest.mark.parametrize("text,override,needle", [
    ("model:\n  num_layer: 2\n", [], "model.num_layer"),
    ("", ["model.hidden_sise=3"], "model.hidden_sise"),
    ("", ["model.num_layers=two"], "model.num_layers"),
    ("", ["model.num_heads"], "key=value"),
    ("model:\n  family: gpt2\n", [], "model.family"),
    ("model:\n  num_heads: 4\n  num_kv_heads: 3\n", [], "num_kv_heads"),
    ("model: [1, 2\n", [], "not valid YAML"),
    # An override's value is read as YAML too: a malformed one is named, not a parser traceback.
    ("", ["data.length_buckets=[64,128"], "the value is not valid YAML"),
    ("", ["seed=@x"], "the value is not valid YAML"),
    ("", ["model.reward_dropout=1.0"], "model.reward_dropout"),
    ("", ["model.reward_dropout=-0.1"], "model.reward_dropout"),
    ("", ["model.reward_dropout=nan"], "model.reward_dropout"),
    # Seeds are 32-bit: 2**32 would initialise as seed 0 does, and 2**63 overflow in JAX.
    ("", ["seed=4294967296"], "seed=4294967296: must be in"),
    ("", ["seed=-1"], "seed=-1: must be in"),
    ("seed: 9223372036854775808\n", [], "seed=9223372036854775808"),
    # Sizes and RoPE settings no model has (num_kv_heads=0 was a ZeroDivisionError traceback).
    ("", ["model.num_kv_heads=0"], "model.num_kv_heads=0: must be >= 1"),
    ("", ["model.num_heads=0"], "model.num_heads=0: must be >= 1"),
    ("", ["model.num_layers=0"], "model.num_layers=0: must be >= 1"),
    ("", ["model.head_dim=0"], "model.head_dim=0"),
    # An odd head size was a broadcasting TypeError inside the first forward's RoPE.
    ("", ["model.head_dim=7"], "model.head_dim=7 is odd"),
    ("", ["model.hidden_size=60"], r"model.head_dim=15 \(hidden_size 60 / num_heads 4\) is odd"),
    ("", ["model.rms_norm_eps=-1e-5"], "model.rms_norm_eps"),
    ("", ["model.rope_theta=0"], "model.rope_theta"),
    ("", ["model.rope_scaling.factor=0"], "model.rope_scaling.factor"),
    # Llama-3.1's scaling with equal factors divided by zero (numpy warnings, then a silent
    # fallback), and a context of 0 scaled every frequency.
    ("", ["model.rope_scaling.type=llama3", "model.rope_scaling.high_freq_factor=1.0"],
     "needs 0 < low_freq_factor < high_freq_factor"),
    ("", ["model.rope_scaling.type=llama3", "model.rope_scaling.low_freq_factor=0"],
     "needs 0 < low_freq_factor < high_freq_factor"),
    ("", ["model.rope_scaling.type=llama3",
          "model.rope_scaling.original_max_position_embeddings=0"],
     "model.rope_scaling.original_max_position_embeddings=0: must be >= 1"),
    # grain's ValueError traceback once the data was tokenized.
    ("", ["data.num_threads=-1"], "data.num_threads=-1: must be >= 0"),
    ("", ["data.prefetch_buffer_size=-1"], "data.prefetch_buffer_size=-1: must be >= 0"),
])
def test_bad_config_names_the_key(tmp_path, text, override, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(path, override)


def test_a_key_given_in_the_wrong_section_names_where_it_is(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"learning_rate is a key of another section: "
                                          r"optim\.learning_rate$"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"another section: model\.rope_scaling\.factor$"):
        load_config(None, ["train.factor=2"])
    with pytest.raises(ConfigError) as err:  # a key no section has: no section named
        load_config(None, ["train.lr=1"])
    assert "another section" not in str(err.value)


def test_an_empty_override_of_a_text_field_is_the_empty_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML + "data:\n  eval_path: eval.jsonl\n")
    assert load_config(path).data.eval_path == "eval.jsonl"
    assert load_config(path, ["data.eval_path="]).data.eval_path == ""
    assert load_config(path, ["data.eval_path=''"]).data.eval_path == ""
    with pytest.raises(ConfigError, match=r"model\.num_layers"):
        load_config(path, ["model.num_layers="])


def test_a_text_override_is_taken_as_given_not_as_yaml():
    """What a shell passes for data.critique_prefix="Critique: " is text, not a mapping; its
    trailing space is the layout's; 0123 is not an octal number."""
    def prefix(value):
        return load_config(None, [f"data.critique_prefix={value}"]).data.critique_prefix

    assert prefix("Critique: ") == "Critique: "
    assert prefix("Feedback - ") == "Feedback - "
    assert prefix('"Critique: "') == "Critique: "  # quoted whole: unquoted as YAML does
    assert prefix("'it''s: '") == "it's: "
    assert prefix("'half") == "'half"
    assert load_config(None, ["data.tokenizer=0123"]).data.tokenizer == "0123"
    assert load_config(None, ["data.train_path=a.jsonl,b.jsonl"]).data.train_path == \
        "a.jsonl,b.jsonl"
    assert load_config(None, ["seed=12"]).seed == 12  # a number key still reads a number


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    # Not "not valid YAML: [Errno 21] Is a directory".
    with pytest.raises(ConfigError, match=r"config file .* is a directory: give a YAML file"):
        load_config(tmp_path)


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["model.num_layers=5", "output_dir=/x/y"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_every_shipped_config_loads():
    import glob
    root = Path(__file__).resolve().parent.parent
    paths = sorted(glob.glob(str(root / "configs" / "*.yaml")))
    assert paths, "configs/ has no YAML files"
    from omegaconf import OmegaConf

    from cloud_jax.experiments.cloud_vs_classic.config import load_pipeline_config

    for p in paths:
        # Pipeline configs (python -m cloud_jax pipeline) carry a `stages` section.
        raw = OmegaConf.load(p)
        cfg = load_pipeline_config(p) if "stages" in raw else load_config(p)
        if "data" in raw:  # a config that trains: its sequences fit the model's positions
            assert cfg.data.max_length <= cfg.model.max_position_embeddings, p


def test_shipped_cloud_configs_read_the_shards_critique_writes():
    # The cloud stage trains on stage 2's output: `python -m cloud_jax critique --output DIR`
    # writes DIR/critiques-SSSSS-of-NNNNN.jsonl (and provenance.json, which is not rows).
    import fnmatch
    import glob
    import os

    from cloud_jax.scoring.relabel import shard_name

    root = Path(__file__).resolve().parent.parent
    for p in sorted(glob.glob(str(root / "configs" / "*_cloud.yaml"))):
        data = load_config(p).data
        if "toy_data" in data.train_path:  # the tiny config trains on the toy set's oracle rows
            continue
        for path in (data.train_path, data.eval_path):
            name = os.path.basename(path)
            assert fnmatch.fnmatch(shard_name(0, 4), name), (p, path)


def test_shipped_configs_starting_from_a_pretrained_model_use_its_tokenizer():
    # A config with init_from a pretrained model (not a run's final/) reads its rows with that
    # model's tokenizer: the byte tokenizer (the default) would feed the model other token ids,
    # and nothing at run time tells the two apart (its 272 ids fit any vocabulary).
    import glob

    from omegaconf import OmegaConf

    from cloud_jax.experiments.cloud_vs_classic.config import PipelineConfig

    root = Path(__file__).resolve().parent.parent
    checked = 0
    for p in sorted(glob.glob(str(root / "configs" / "*.yaml"))):
        cfg = load_config(p, schema=PipelineConfig if "stages" in OmegaConf.load(p) else Config)
        if cfg.init_from and not cfg.init_from.startswith("runs/"):
            assert cfg.data.tokenizer == cfg.init_from, p
            checked += 1
    assert checked >= 10


def test_readme_names_every_shipped_config():
    import glob
    import itertools

    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    section = text[text.index("## Configs"):text.index("## Sharding")]
    named = set()
    for pattern in re.findall(r"`([\w{},]+\.yaml)`", section):
        parts = re.split(r"\{([^}]*)\}", pattern)  # expands tiny_cpu_{a,b}.yaml
        choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
        named.update("".join(c) for c in itertools.product(*choices))
    shipped = {Path(p).name for p in glob.glob(str(root / "configs" / "*.yaml"))}
    assert shipped - named == set()
    assert named - shipped == set()


ROOT = Path(__file__).resolve().parent.parent


def _flat_defaults(obj, prefix=""):
    """{dotted key: default} of a config dataclass instance, nested sections flattened."""
    out = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat_defaults(value, f"{prefix}{field.name}."))
        else:
            out[prefix + field.name] = value
    return out


def _key_table(text):
    """{key: (default cell, meaning)} of the `| `key` | `default` | meaning |` rows in text."""
    rows = re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \| (.*) \|$", text, re.M)
    assert len({key for key, _, _ in rows}) == len(rows), "a key is listed twice"
    return {key: (cell, meaning) for key, cell, meaning in rows}


def _doc_value(cell):
    """A default as docs/TRAINING.md writes it, as the dataclass holds it."""
    import yaml

    from cloud_jax.data.config import CRITIQUE_PREFIX

    if cell == "CRITIQUE_PREFIX":
        return CRITIQUE_PREFIX
    value = yaml.safe_load(cell)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-5 as text
        except ValueError:
            return value
    return tuple(value) if isinstance(value, list) else value


def test_every_config_key_is_documented_with_its_default():
    # docs/TRAINING.md, "Config keys": one row per key of the training config and of the
    # pipeline's own sections, with the dataclasses' default; a key added, renamed or given
    # another default shows here until the table says so.
    from cloud_jax.data.synthetic.reasoning import ReasoningBenchmarkConfig
    from cloud_jax.experiments.cloud_vs_classic.config import PipelineConfig

    text = (ROOT / "docs" / "TRAINING.md").read_text()
    table = _key_table(text[text.index("## Config keys"):])
    train = _flat_defaults(Config())
    pipeline = {k: v for k, v in _flat_defaults(PipelineConfig()).items()
                if k not in train and not k.startswith("benchmark.")}
    assert (set(train) | set(pipeline)) - set(table) == set(), "keys missing from the table"
    assert set(table) - set(train) - set(pipeline) == set(), "table rows that are no key"
    for key, default in {**train, **pipeline}.items():
        documented = _doc_value(table[key][0])
        assert documented == default, (key, table[key][0], default)
        assert isinstance(documented, bool) == isinstance(default, bool), (key, documented)
    # A shared key whose pipeline default differs says so in its row.
    for key, value in _flat_defaults(PipelineConfig()).items():
        if key in train and value != train[key]:
            assert f"`{value}`" in table[key][1], (key, value)
    # The benchmark section: docs/REASONING_BENCHMARK.md, "Knobs", names every field.
    bench = (ROOT / "docs" / "REASONING_BENCHMARK.md").read_text()
    knobs = bench[bench.index("## Knobs"):]
    knobs = knobs[:knobs.index("\n\n", knobs.index("|---"))]
    named = {name for row in knobs.splitlines()[2:]
             for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert named == {f.name for f in dataclasses.fields(ReasoningBenchmarkConfig)}


def _command_options():
    """{command: its option strings}, read from the usage line of every command's --help (the
    commands of python -m cloud_jax, each benchmark of `bench`, and cloud_jax.train)."""
    import contextlib
    import importlib
    import io

    from cloud_jax.__main__ import COMMANDS
    from cloud_jax.cli.bench import BENCHMARKS

    modules = {name: module for name, (module, _) in COMMANDS.items() if name != "bench"}
    modules.update({f"bench {name}": module for name, (module, _) in BENCHMARKS.items()})
    modules["train"] = "cloud_jax.cli.train"
    options = {}
    for name, module in modules.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            importlib.import_module(module).main(["--help"])
        usage = out.getvalue().split("\n\n")[0]  # the description may name other commands' flags
        assert usage.startswith("usage:"), name
        options[name] = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", usage)) | {"--help"}
    return options


def test_every_documented_command_line_uses_flags_its_command_has():
    # Every `python -m cloud_jax <command> ...` (and `python -m cloud_jax.train ...`) in the
    # README, docs/ and the Makefile names a command that exists and only flags it takes.
    options = _command_options()
    checked = 0
    for path in [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", path.read_text())  # shell line continuations
        for line in text.splitlines():
            for m in re.finditer(r"python3? -m cloud_jax(\.train\b)?((?: [\w-]+){0,2})", line):
                words = m.group(2).split()
                if m.group(1):
                    command, rest = "train", line[m.start(2):]
                elif not words or words[0] == "--debug":
                    continue  # `python -m cloud_jax <command>`, `... [--debug] <command>`
                elif words[0] == "bench":
                    if len(words) < 2 or f"bench {words[1]}" not in options:
                        continue  # `bench train|sample|serve`
                    command, rest = f"bench {words[1]}", line[m.end(2):]
                else:
                    command = words[0]
                    assert command in options, (path.name, line)
                    rest = line[m.start(2) + 1 + len(command):]
                rest = re.split(r"`| \| |;| && ", rest)[0]
                flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", rest)) - {"--debug"}
                assert flags <= options[command], (path.name, command, flags - options[command])
                checked += 1
    assert checked > 50


def test_an_empty_section_takes_its_defaults(tmp_path):
    """A section whose keys are all commented out is null in YAML: it means the defaults, as
    leaving the section out does, at any depth (it was refused as 'not Optional')."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n#  num_layers: 4\n  rope_scaling:\ntrain:\nseed: 3\n")
    assert load_config(path) == load_config(None, ["seed=3"])
    from cloud_jax.experiments.cloud_vs_classic.config import PipelineConfig, StagesConfig

    path.write_text("stages:\n  cloud:\n  #  total_steps: 5\n")
    assert load_config(path, schema=PipelineConfig).stages == StagesConfig()


@pytest.mark.parametrize("text,override,needle", [
    # A section given a value rather than keys: named, not "Merge error: int is not a subclass".
    ("model: 3\n", [], r"key 'model': a section of keys \(model\.KEY: value\), not 3"),
    ("model:\n  rope_scaling: [1]\n", [],
     r"key 'model\.rope_scaling': a section of keys .*not \[1\]"),
    ("", ["model.rope_scaling=2"], r"key 'model\.rope_scaling': a section of keys"),
    # On the command line a null section would read as a reset that does not happen.
    ("", ["model=null"], r"override 'model=null': key 'model' is a section: set its keys"),
])
def test_a_section_given_a_value_names_the_section(tmp_path, text, override, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path, override)


@pytest.mark.parametrize("word", ["null", "~", "None", "NULL"])
def test_null_leaves_a_key_unset(tmp_path, word):
    """init_from=null was the text 'null' (a model directory to load); head_dim=None an error."""
    path = tmp_path / "c.yaml"
    path.write_text("init_from: runs/x/final\nmodel:\n  head_dim: 16\ndata:\n  eval_path: e.jsonl\n")
    cfg = load_config(path, [f"init_from={word}", f"model.head_dim={word}",
                             f"data.eval_path={word}", f"optim.weight_decay={word}"])
    assert (cfg.init_from, cfg.model.head_dim, cfg.data.eval_path, cfg.optim.weight_decay) == \
        ("", None, "", None)
    from cloud_jax.experiments.cloud_vs_classic.config import PipelineConfig

    assert load_config(None, [f"evaluation.top_p={word}"], schema=PipelineConfig
                       ).evaluation.top_p is None
    # Quoted, it is the text.
    assert load_config(None, [f"init_from='{word}'"]).init_from == word


def test_null_in_the_file_leaves_a_key_unset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("init_from:\ndata:\n  eval_path: null\nmodel:\n  head_dim: None\n")
    cfg = load_config(path)
    assert (cfg.init_from, cfg.data.eval_path, cfg.model.head_dim) == ("", "", None)


@pytest.mark.parametrize("text,override,needle", [
    # Keys with no unset value: named with their default, not "'null': expected float32, ..."
    # or "field 'seed' is not Optional".
    ("", ["model.dtype=null"], r"override 'model\.dtype=null': key 'model\.dtype' has no "
                               r"value \(null\); give one \(its default: 'float32'\)$"),
    ("", ["seed=~"], r"key 'seed' has no value \(null\).*default: 0"),
    ("seed:\n", [], r"c\.yaml: key 'seed' has no value \(null\); give one, or leave the key "
                     r"out for its default \(0\)$"),
    ("output_dir:\n", [], r"key 'output_dir' has no value \(null\).*'runs/default'"),
    ("", ["data.length_buckets=null"], r"key 'data\.length_buckets' has no value \(null\).*"
                                       r"default: \[\]"),
])
def test_null_for_a_key_that_cannot_be_unset_names_it(tmp_path, text, override, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path, override)


@pytest.mark.parametrize("text,override,needle", [
    # A wrong item named by its key and index (it was "Value '$VALUE' of type '$VALUE_TYPE'
    # could not be converted to Integer", no key).
    ("data:\n  length_buckets: [64, x, 128]\n", [],
     r"c\.yaml: key 'data\.length_buckets\[1\]': 'x' is not an integer$"),
    ("model:\n  eos_token_ids: [1, 2.5]\n", [],
     r"key 'model\.eos_token_ids\[1\]': 2\.5 is not an integer"),
    ("", ["data.length_buckets=[64,x,128]"],
     r"override 'data\.length_buckets=\[64,x,128\]': key 'data\.length_buckets\[1\]': 'x' is "
     r"not an integer"),
    ("", ["data.length_buckets=[64,[128]]"], r"key 'data\.length_buckets\[1\]': \[128\] is not"),
    ("", ["data.length_buckets=[64,null]"], r"key 'data\.length_buckets\[1\]': None is not"),
    ("", ["data.length_buckets=64"],
     r"key 'data\.length_buckets': a list \(\[a, b, \.\.\.\]\), not 64"),
    # An item of a list is not a key of its own: the whole list is given.
    ("", ["data.length_buckets.1=256"], r"key 'data\.length_buckets' is a list: give it whole"),
    ("", ["data.length_buckets[1]=256"], r"key 'data\.length_buckets' is a list: give it whole"),
])
def test_a_bad_list_item_names_the_key_and_index(tmp_path, text, override, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path, override)


def test_a_bad_list_item_of_the_pipeline_config_names_the_key_and_index(tmp_path):
    from cloud_jax.experiments.cloud_vs_classic.config import PipelineConfig

    with pytest.raises(ConfigError, match=r"key 'evaluation\.num_samples\[1\]': 'a' is not an "):
        load_config(None, ["evaluation.num_samples=[1,a]"], schema=PipelineConfig)
    path = tmp_path / "c.yaml"
    # A stage's overrides are key=value texts: a nested list was taken as one.
    path.write_text("stages:\n  cloud:\n    overrides: [loss.lm_coef=1.0, [seed=2]]\n")
    with pytest.raises(ConfigError, match=r"key 'stages\.cloud\.overrides\[1\]': \['seed=2'\] "
                                          r"is not a text"):
        load_config(path, schema=PipelineConfig)
    assert load_config(None, ["evaluation.num_samples=[1, '2']"], schema=PipelineConfig
                       ).evaluation.num_samples == (1, 2)


def test_a_plus_override_is_refused_with_the_key_to_give():
    """Hydra's +key=value adds a key: this schema's keys are fixed ("Key '+seed' not in 'Config'.
    Did you mean: 'seed'?" named a key '+seed')."""
    with pytest.raises(ConfigError, match=r"^override '\+seed=1': '\+' adds a key, and this "
                                          r"config's keys are fixed; seed is one: give seed=1$"):
        load_config(None, ["+seed=1"])
    with pytest.raises(ConfigError, match=r"override '\+\+model\.num_layers=2': .*give "
                                          r"model\.num_layers=2$"):
        load_config(None, ["++model.num_layers=2"])
    with pytest.raises(ConfigError, match=r"fixed; model\.new_key is not one of them$"):
        load_config(None, ["+model.new_key=1"])
    with pytest.raises(ConfigError, match=r"fixed; train\.learning_rate is not one of them; "
                                          r"learning_rate is a key of another section"):
        load_config(None, ["+train.learning_rate=1"])


def test_a_config_starting_from_another_run_names_the_config_that_makes_it():
    # configs/tiny_cpu_critique_sft.yaml said "Data first: ... Then: python -m cloud_jax.train
    # --config configs/tiny_cpu_critique_sft.yaml", which stops at once: its init_from is
    # lm_pretrain's final/ directory, which no step named made. A shipped config whose init_from
    # is another shipped config's output names that config in its header comment.
    import yaml

    configs = {path.name: (path.read_text(), yaml.safe_load(path.read_text()))
               for path in sorted((ROOT / "configs").glob("*.yaml"))}
    makers = {data.get("output_dir"): name for name, (_, data) in configs.items()}
    checked = 0
    for name, (text, data) in configs.items():
        init_from = str(data.get("init_from") or "")
        if not init_from.endswith("/final") or init_from[:-len("/final")] not in makers:
            continue
        header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
        maker = makers[init_from[:-len("/final")]]
        assert f"configs/{maker}" in header, (name, f"starts from {init_from}: name "
                                                    f"configs/{maker} in the header")
        checked += 1
    assert checked >= 5


def test_a_number_with_a_leading_zero_is_refused_not_read_as_octal(tmp_path):
    # YAML reads a plain 010 as octal 8: data.batch_pairs=010 trained with 8 pairs a batch.
    with pytest.raises(ConfigError, match=r"override 'data\.batch_pairs=010': 010 has a leading "
                                          r"0, and YAML reads such a number as octal \(010 is 8\)"):
        load_config(None, ["data.batch_pairs=010"])
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 2\ndata:\n  batch_pairs: 016\n")
    with pytest.raises(ConfigError, match=rf"{path}:4: 016 has a leading 0.*\(016 is 14\)"):
        load_config(path)
    # 0, a quoted text, 08 (no octal number: YAML's text, then the key's type error) and a
    # hexadecimal number are as before.
    assert load_config(None, ["train.eval_every=0", "data.batch_pairs=0x10"]).data.batch_pairs == 16
    path.write_text("model:\n  num_layers: 2\noutput_dir: '010'\n")
    assert load_config(path).output_dir == "010"
    assert load_config(None, ["output_dir=010"]).output_dir == "010"


def test_the_defaults_fit_together():
    """No config (every key at its default) is a run, not an error: the default tokenizer fits
    the default vocabulary, and the default lengths the default positions; the pipeline's too."""
    from cloud_jax.data.tokenizer import load_tokenizer
    from cloud_jax.experiments.cloud_vs_classic.config import load_pipeline_config

    for cfg in (load_config(None, []), load_pipeline_config(None, [])):
        assert len(load_tokenizer(cfg.data.tokenizer)) <= cfg.model.vocab_size
        assert cfg.data.max_length <= cfg.model.max_position_embeddings
    # Every stage's steps fit the epochs of the default benchmark's train rows (the classic
    # arm's 0: as many as cloud).
    batches = cfg.benchmark.num_train * cfg.data.num_epochs // cfg.data.batch_pairs
    for name in ("lm_pretrain", "critique_sft", "cloud"):
        assert 1 <= getattr(cfg.stages, name).total_steps <= batches, name
    assert cfg.stages.classic.total_steps == 0


def test_a_bad_interpolation_in_an_override_names_the_override_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: runs/x\n")
    for override, key, why in (("output_dir=${nope}", "output_dir", "Interpolation key 'nope'"),
                               ("train.total_steps=${data.nope}", "train.total_steps",
                                "Interpolation key 'data.nope'"),
                               ("model.num_layers=${output_dir}", "model.num_layers",
                                "runs/x")):
        with pytest.raises(ConfigError) as err:
            load_config(path, ["seed=1", override, "train.log_every=1"])
        message = str(err.value)
        assert message.startswith(f"override {override!r}: key '{key}': "), message
        assert why in message and str(path) not in message
    # One in the file names the file, whatever the command line overrides beside it.
    path.write_text("output_dir: runs/${nope}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: key 'output_dir': "
                                          r"Interpolation key 'nope'"):
        load_config(path, ["seed=1"])
    # An override that replaces the file's bad value leaves nothing to resolve there.
    assert load_config(path, ["output_dir=runs/${seed}", "seed=3"]).output_dir == "runs/3"
