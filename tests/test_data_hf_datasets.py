"""Hugging Face datasets as row sources: save_to_disk directories, script-free dataset repositories,
splits, column mappings, the same validation as files, and errors that name dataset, split, row
and field."""

import json
import sys

import pytest

datasets = pytest.importorskip("datasets")

from cloud_jax.data.config import Columns, DataConfig  # noqa: E402
from cloud_jax.data.schema import RowError, load_rows, read_records  # noqa: E402
from cloud_jax.data.tfds_builder import prepare_dataset  # noqa: E402
from cloud_jax.data.tokenizer import byte_tokenizer  # noqa: E402
from cloud_jax.errors import ConfigError  # noqa: E402


def _row(i, **over):
    row = {"id": f"r{i}", "prompt": f"What is {i}+1?", "chosen": f"{i + 1}.",
           "rejected": f"{i + 2}.", "chosen_feedback": "Correct.",
           "rejected_feedback": "Off by one.", "subset": "math"}
    row.update(over)
    return row


def _renamed(row):
    """The row as a dataset with other column names holds it."""
    names = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    return {names.get(k, k): v for k, v in row.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict saved with save_to_disk: train (3 rows) and test (2 rows)."""
    root = tmp_path_factory.mktemp("hf") / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([_row(i) for i in range(3)]),
        "test": datasets.Dataset.from_list([_row(i) for i in range(10, 12)]),
    }).save_to_disk(str(root))
    return str(root)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A script-free dataset repository: Parquet files under data/ and a README card naming the
    splits, with columns named question / good / bad."""
    root = tmp_path_factory.mktemp("hf") / "repo"
    (root / "data").mkdir(parents=True)
    for split, ids in (("train", range(4)), ("validation", range(20, 22))):
        datasets.Dataset.from_list([_renamed(_row(i)) for i in ids]).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train-*.parquet\n"
        "  - split: validation\n    path: data/validation-*.parquet\n---\n# Preference pairs\n")
    return str(root)


MAPPING = {"prompt": "question", "chosen": "good", "rejected": "bad"}


def test_a_save_to_disk_directory_reads_the_named_split(saved):
    train = load_rows(saved, require_feedback=True, split="train").rows
    test = load_rows(saved, require_feedback=True, split="test").rows
    assert [r.id for r in train] == ["r0", "r1", "r2"]
    assert [r.id for r in test] == ["r10", "r11"]
    assert train[1].prompt == "What is 1+1?" and train[1].rejected_feedback == "Off by one."
    assert train[1].source == f"{saved}:train[row 1]"


def test_several_splits_need_one_named_and_a_missing_split_lists_them(saved):
    with pytest.raises(ConfigError, match="several splits; name one .*its splits: train, test"):
        load_rows(saved, require_feedback=True)
    with pytest.raises(ConfigError, match="has no split 'dev' .*train, test"):
        load_rows(saved, require_feedback=True, split="dev")


def test_a_single_saved_dataset_is_its_own_split(tmp_path):
    path = str(tmp_path / "one")
    datasets.Dataset.from_list([_row(0), _row(1)]).save_to_disk(path)
    assert [r.id for r in load_rows(path, require_feedback=True).rows] == ["r0", "r1"]
    # Saved as the train split, it is not a test split too (an eval split of the train rows).
    named = str(tmp_path / "named")
    datasets.Dataset.from_list([_row(0)], split="train").save_to_disk(named)
    assert [r.id for r in load_rows(named, require_feedback=True, split="train").rows] == ["r0"]
    with pytest.raises(ConfigError, match="has no split 'test' \\(it holds one split, 'train'"):
        load_rows(named, require_feedback=True, split="test")


def test_a_directory_is_read_whole_or_refused(tmp_path):
    """datasets infers splits from file names and reads one format: a directory it would read
    in part is an error naming what it would leave out; a malformed file names itself."""
    names = tmp_path / "names"
    names.mkdir()
    for name, i in (("train.jsonl", 0), ("more_rows.jsonl", 1)):
        (names / name).write_text(json.dumps(_row(i)) + "\n")
    with pytest.raises(ConfigError, match="leaving out more_rows.jsonl"):
        load_rows(str(names), require_feedback=True)
    formats = tmp_path / "formats"
    formats.mkdir()
    (formats / "part-0.jsonl").write_text(json.dumps(_row(0)) + "\n")
    datasets.Dataset.from_list([_row(1)]).to_parquet(str(formats / "part-1.parquet"))
    with pytest.raises(ConfigError, match="leaving out part-1.parquet|leaving out part-0.jsonl"):
        load_rows(str(formats), require_feedback=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text(json.dumps(_row(0)) + '\n{"id": "b", "prompt": \n')
    with pytest.raises(ConfigError, match="not a Hugging Face dataset that can be read here"):
        load_rows(str(bad), require_feedback=True)


def test_a_mapped_field_is_read_from_its_column_only(tmp_path):
    """With prompt mapped to question, a row without question lacks its prompt (an error), even
    where it has a prompt column: a misspelt mapping never trains on the other column."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(_renamed(_row(0))) + "\n" + json.dumps(_row(1)) + "\n")
    with pytest.raises(RowError, match="rows.jsonl:2.*prompt"):
        load_rows(str(path), require_feedback=True,
                  columns={"prompt": "question", "chosen": "good", "rejected": "bad"})


def test_a_script_free_repository_with_a_column_mapping(repo):
    rows = load_rows(repo, require_feedback=True, split="validation", columns=MAPPING).rows
    assert [r.id for r in rows] == ["r20", "r21"]
    assert rows[0].prompt == "What is 20+1?" and rows[0].chosen == "21."
    assert rows[0].extra == {}
    # Without the mapping the renamed fields are missing, and the error says so.
    with pytest.raises(RowError, match=r"repo:train\[row 0\]: field 'prompt': missing"):
        load_rows(repo, require_feedback=True, split="train")


def test_bad_rows_name_dataset_split_row_field_and_column(tmp_path):
    path = str(tmp_path / "bad")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(
        [_renamed(_row(0)), _renamed(_row(1, prompt="  ")), _renamed(_row(2))])}).save_to_disk(path)
    with pytest.raises(RowError) as err:
        load_rows(path, require_feedback=True, columns=MAPPING)
    assert str(err.value) == f"{path}:train[row 1]: field 'prompt' (column 'question'): is empty"
    assert (err.value.row, err.value.field, err.value.column) == (1, "prompt", "question")
    # Lenient mode skips it like a bad line of a file and writes it to the rejects file.
    rejects = tmp_path / "rejects.jsonl"
    result = load_rows(path, require_feedback=True, columns=MAPPING, lenient=True,
                       rejects_path=str(rejects))
    assert [r.id for r in result.rows] == ["r0", "r2"] and result.num_rejected == 1
    record = json.loads(rejects.read_text())
    assert (record["file"], record["row"], record["field"]) == (f"{path}:train", 1, "prompt")


def test_files_and_datasets_mix_and_duplicate_ids_across_them_are_caught(saved, tmp_path):
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps(_row(0)) + "\n")
    with pytest.raises(RowError, match=r"more.jsonl:1: field 'id': duplicate id 'r0' "
                                       r"\(first at .*saved:train\[row 0\]\)"):
        load_rows(f"{saved},{jsonl}", require_feedback=True, split="train")


def test_read_records_renames_for_commands_of_their_own_shape(repo):
    records = read_records(repo, "train", {"prompt": "question", "response": "good"})
    where, obj = records[2]
    assert where == f"{repo}:train[row 2]"
    assert obj["prompt"] == "What is 2+1?" and obj["response"] == "3." and "good" not in obj


def test_columns_config_is_checked():
    assert Columns(prompt="question", chosen="chosen").mapping() == {"prompt": "question"}
    with pytest.raises(ConfigError, match="column\\(s\\) q mapped to more than one field"):
        DataConfig(columns=Columns(prompt="q", chosen="q")).validate()
    with pytest.raises(ConfigError, match="'answer' is not a row field"):
        Columns.check_field("answer", "--column answer=a")


def test_training_config_takes_the_split_and_columns_as_overrides():
    from cloud_jax.training.config import load_config

    cfg = load_config(None, ["data.split=train", "data.eval_split=validation",
                             "data.columns.prompt=question"])
    assert (cfg.data.split, cfg.data.eval_split) == ("train", "validation")
    assert cfg.data.columns.mapping() == {"prompt": "question"}
    with pytest.raises(ConfigError, match="answer"):
        load_config(None, ["data.columns.answer=x"])


def test_prepare_dataset_reads_train_and_eval_splits_and_keys_the_cache_on_them(repo, tmp_path):
    cfg = DataConfig(train_path=repo, eval_path=repo, split="train", eval_split="validation",
                     columns=Columns(**MAPPING), max_length=256, tfds_dir=str(tmp_path / "tfds"))
    tok = byte_tokenizer()
    dataset = prepare_dataset(cfg, tok, "critique")
    assert dataset.stats["train"]["pairs"] == 4 and dataset.stats["eval"]["pairs"] == 2
    # Same sources, same settings: reused; another split or mapping is another dataset.
    assert prepare_dataset(cfg, tok, "critique").config_name == dataset.config_name
    swapped = DataConfig(**{**cfg.__dict__, "split": "validation", "eval_split": "train"})
    assert prepare_dataset(swapped, tok, "critique").config_name != dataset.config_name


def test_a_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ConfigError, match="hf://nobody/no-such-dataset: .*Hugging Face dataset"):
        load_rows("hf://nobody/no-such-dataset", require_feedback=False)


def test_without_the_datasets_package_the_error_says_what_to_install(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match=r"needs the datasets package: pip install "
                                          r"'cloud-jax\[datasets\]'"):
        load_rows(saved, require_feedback=True, split="train")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model_helpers import tiny_reward_model

    return str(tiny_reward_model(0).save_pretrained(tmp_path_factory.mktemp("hf") / "model"))


def test_score_and_critique_commands_read_a_dataset_split_with_columns(repo, checkpoint, tmp_path):
    from cloud_jax.cli import critique, score
    from cloud_jax.cli.common import run_command

    common = ["--checkpoint", checkpoint, "--input", repo, "--split", "validation",
              "--column", "prompt=question", "--max-critique-tokens", "3", "--batch-size", "4"]
    out = tmp_path / "scored.jsonl"
    assert run_command(score.main, [*common, "--column", "chosen=good", "--column",
                                    "rejected=bad", "--output", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in scored] == ["r20", "r21"]
    assert all(isinstance(r["chosen_reward"], float) and r["prompt"] for r in scored)

    shards = tmp_path / "critiques"
    assert run_command(critique.main, [*common, "--column", "chosen=good", "--column",
                                       "rejected=bad", "--output", str(shards)]) == 0
    rows = load_rows(str(shards / "critiques-*.jsonl"), require_feedback=True).rows
    assert [r.id for r in rows] == ["r20", "r21"] and rows[0].chosen == "21."
    prov = json.loads((shards / "provenance.json").read_text())
    assert prov["input"] == [repo] and prov["input_split"] == "validation"
    assert prov["columns"] == MAPPING


def test_a_bad_column_option_is_a_usage_error(repo, checkpoint, capsys):
    from cloud_jax.cli import score
    from cloud_jax.cli.common import run_command

    assert run_command(score.main, ["--checkpoint", checkpoint, "--input", repo, "--column",
                                    "answer=good", "--output", "x.jsonl"]) == 2
    assert "--column 'answer=good': 'answer' is not a row field" in capsys.readouterr().err


def test_a_split_in_a_list_mixing_a_dataset_and_files_is_the_datasets(saved, tmp_path):
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps(_row(30)) + "\n")
    rows = load_rows(f"{saved},{extra}", require_feedback=True, split="test").rows
    assert [r.id for r in rows] == ["r10", "r11", "r30"]
    with pytest.raises(ConfigError, match="extra.jsonl: split 'test' given"):
        load_rows(str(extra), require_feedback=True, split="test")


@pytest.mark.parametrize("kind", ["numpy", "torch", "pandas", "arrow"])
def test_a_dataset_saved_with_an_output_format_is_read_as_python_rows(tmp_path, kind):
    """A dataset saved after set_format("numpy" / "torch" / ...) comes back in that format: its
    integer ids were numpy or torch scalars, its list feedback arrays, its rows whole tables, and
    every row was refused as of the wrong type. It is read as the Python objects it stores."""
    if kind == "torch":
        pytest.importorskip("torch").set_num_threads(1)
    rows = [_row(i, id=i, chosen_feedback=["Correct."]) for i in range(3)]
    dataset = datasets.Dataset.from_list(rows)
    dataset.set_format(kind)
    dataset.save_to_disk(str(tmp_path / kind))
    assert datasets.load_from_disk(str(tmp_path / kind)).format["type"] == kind
    result = load_rows(str(tmp_path / kind), require_feedback=True)
    assert [(r.id, r.prompt, r.chosen_feedback, r.rejected_feedback) for r in result.rows] == \
        [(str(i), f"What is {i}+1?", "Correct.", "Off by one.") for i in range(3)]
