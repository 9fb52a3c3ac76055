"""Row loading and validation: every bad-row kind names file, line (or row) and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloud_jax.errors import ConfigError
from cloud_jax.data.schema import RowError, load_rows


def _row(i=0, **over):
    row = {"id": f"r{i}", "prompt": f"What is {i}+1?", "chosen": f"{i + 1}.",
           "rejected": f"{i + 2}.", "chosen_feedback": "Correct.",
           "rejected_feedback": ["Off by one."], "subset": "math"}
    row.update(over)
    return row


def _jsonl(path, lines):
    path.write_bytes(b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines))
    return str(path)


def test_good_rows_jsonl_json_parquet(tmp_path):
    rows = [_row(0), _row(1, extra_model="m", id=7)]
    a = _jsonl(tmp_path / "a.jsonl", rows)
    b = tmp_path / "b.json"
    b.write_text(json.dumps([_row(2)]))
    c = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([_row(3, chosen_feedback=["x"])]), c)
    result = load_rows(f"{a},{b},{c}", require_feedback=True)
    assert [r.id for r in result.rows] == ["r0", "7", "r2", "r3"]
    assert result.num_rejected == 0
    first, second = result.rows[:2]
    assert first.rejected_feedback == "Off by one." and first.subset == "math"
    assert first.source == f"{a}:1"
    assert second.extra == {"extra_model": "m"}
    assert result.rows[3].chosen_feedback == "x" and result.rows[3].source == f"{c}[row 0]"


def test_a_glob_over_an_unfinished_shard_set_is_refused_naming_a_missing_shard(tmp_path):
    """Stage 2 stopped after 2 of its 4 shards: `critiques-*.jsonl` must not pass for the whole
    data set (a training run would train on half the rows without a word)."""
    for i in (0, 2):
        _jsonl(tmp_path / f"critiques-0000{i}-of-00004.jsonl", [_row(i)])
    with pytest.raises(FileNotFoundError, match=r"2 of the 4 shards critiques-\*-of-00004.jsonl "
                       r"do not exist \(first: .*critiques-00001-of-00004.jsonl\)"):
        load_rows(str(tmp_path / "critiques-*.jsonl"), require_feedback=True)
    # Shards named one by one, or a glob that leaves out shards that exist: read as asked.
    assert len(load_rows(str(tmp_path / "critiques-00000-of-00004.jsonl"),
                         require_feedback=True).rows) == 1
    for i in (1, 3):
        _jsonl(tmp_path / f"critiques-0000{i}-of-00004.jsonl", [_row(i)])
    assert len(load_rows(str(tmp_path / "critiques-0000[01]-*.jsonl"),
                         require_feedback=True).rows) == 2
    assert len(load_rows(str(tmp_path / "critiques-*.jsonl"), require_feedback=True).rows) == 4
    # Numbered from 1, as some writers number them: whole.
    for i in (1, 2):
        _jsonl(tmp_path / f"part-0000{i}-of-00002.jsonl", [_row(10 + i)])
    assert len(load_rows(str(tmp_path / "part-*.jsonl"), require_feedback=True).rows) == 2


def test_glob_and_missing_file(tmp_path):
    _jsonl(tmp_path / "t-0.jsonl", [_row(0)])
    _jsonl(tmp_path / "t-1.jsonl", [_row(1)])
    assert len(load_rows(str(tmp_path / "t-*.jsonl"), require_feedback=True).rows) == 2
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"), require_feedback=True)
    # A name that exists is read as written, even with glob characters in it.
    _jsonl(tmp_path / "data[1].jsonl", [_row(id="literal")])
    _jsonl(tmp_path / "data1.jsonl", [_row(id="other")])
    assert [r.id for r in load_rows(str(tmp_path / "data[1].jsonl"),
                                    require_feedback=True).rows] == ["literal"]
    # ** matches at any depth, as it does in a bucket.
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    _jsonl(tmp_path / "sub" / "x.jsonl", [_row(id="x")])
    _jsonl(tmp_path / "sub" / "deep" / "y.jsonl", [_row(id="y")])
    assert sorted(r.id for r in load_rows(str(tmp_path / "sub" / "**" / "*.jsonl"),
                                          require_feedback=True).rows) == ["x", "y"]


BAD_ROWS = [
    # (line content, field named in the error, words in the reason)
    (b'{"id": "x", "prompt": ', None, "invalid JSON"),
    (b'["not", "an", "object"]', None, "expected a JSON object"),
    (b'{"id": "x", "prompt": "\xff\xfe"}', None, "invalid UTF-8"),
    (_row(prompt=None), "prompt", "null"),
    (_row(chosen=3), "chosen", "expected a string, got int"),
    (_row(rejected=""), "rejected", "empty"),
    (_row(prompt="  \n"), "prompt", "empty"),
    (_row(chosen="a\x00b"), "chosen", "NUL"),
    (b'{"id": "x", "prompt": "\\ud800", "chosen": "a", "rejected": "b", '
     b'"chosen_feedback": "c", "rejected_feedback": "d"}', "prompt", "lone surrogate"),
    (_row(chosen_feedback=["a", "b"]), "chosen_feedback", "list of 2 elements"),
    (_row(rejected_feedback=[]), "rejected_feedback", "list of 0 elements"),
    (_row(rejected_feedback=[None]), "rejected_feedback", "null"),
    (_row(chosen_feedback=None), "chosen_feedback", "null"),
    ({k: v for k, v in _row().items() if k != "rejected"}, "rejected", "missing"),
    ({k: v for k, v in _row().items() if k != "chosen_feedback"}, "chosen_feedback",
     "required for this stage"),
    (_row(id=True), "id", "expected a string, got bool"),
    (_row(subset=5), "subset", "expected a string"),
    (_row(rejected="1."), "rejected", "identical to chosen"),
]


@pytest.mark.parametrize("bad,field,reason", BAD_ROWS)
def test_bad_row_names_file_line_field(tmp_path, bad, field, reason):
    path = _jsonl(tmp_path / "rows.jsonl", [_row(1), _row(2), bad])
    with pytest.raises(RowError) as info:
        load_rows(path, require_feedback=True)
    err = info.value
    assert (err.file, err.line, err.field) == (path, 3, field)
    assert reason in err.reason
    assert str(err).startswith(f"{path}:3: ")
    if field:
        assert f"field '{field}'" in str(err)


def test_duplicate_id_strict_names_both_places(tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", [_row(1), _row(2), _row(3, id="r1")])
    with pytest.raises(RowError, match=rf"rows.jsonl:3: field 'id': duplicate id 'r1' \(first at "
                                       rf".*rows.jsonl:1\)"):
        load_rows(path, require_feedback=True)


def test_duplicate_id_across_files(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [_row(1)])
    b = _jsonl(tmp_path / "b.jsonl", [_row(2), _row(1)])
    with pytest.raises(RowError) as info:
        load_rows([a, b], require_feedback=True)
    assert (info.value.file, info.value.line, info.value.field) == (b, 2, "id")


def test_feedback_not_read_without_requirement(tmp_path):
    # RewardBench-style rows: no feedback, integer ids, extra model-name columns.
    path = _jsonl(tmp_path / "rb.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b", "subset": "chat", "id": 3,
         "chosen_model": "m1", "rejected_model": "m2"},
        _row(4, chosen_feedback=None)])
    rows = load_rows(path, require_feedback=False).rows
    assert [r.id for r in rows] == ["3", "r4"]
    assert rows[0].extra == {"chosen_model": "m1", "rejected_model": "m2"}
    assert rows[1].chosen_feedback is None


def test_lenient_writes_rejects_and_keeps_good_rows(tmp_path):
    lines = [_row(0), b"{oops", _row(1, prompt=""), _row(2), _row(3, id="r0"),
             _row(4, rejected="5."), b"\xffbad", _row(5)]
    path = _jsonl(tmp_path / "rows.jsonl", lines)
    rejects = tmp_path / "out" / "rejects.jsonl"
    result = load_rows(path, require_feedback=True, lenient=True, rejects_path=str(rejects))
    assert [r.id for r in result.rows] == ["r0", "r2", "r5"]
    assert result.num_rejected == 5 and result.rejects_path == str(rejects)
    records = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in records] == [
        (2, None), (3, "prompt"), (5, "id"), (6, "rejected"), (7, None)]
    assert all(r["file"] == path and r["reason"] for r in records)
    assert records[0]["raw"] == "{oops"
    assert "duplicate id 'r0'" in records[2]["reason"]
    assert "invalid UTF-8" in records[4]["reason"]


def test_parquet_errors_name_row_index(tmp_path):
    path = tmp_path / "rows.parquet"
    rows = [_row(0, chosen_feedback=["a"]), _row(1, chosen_feedback=["a"]),
            _row(2, chosen_feedback=["a", "b"])]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(RowError) as info:
        load_rows(str(path), require_feedback=True)
    err = info.value
    assert (err.line, err.row, err.field) == (None, 2, "chosen_feedback")
    assert str(err).startswith(f"{path}[row 2]: field 'chosen_feedback'")


def test_parquet_missing_column_and_lenient(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "p", "chosen": "c"}]), path)
    with pytest.raises(RowError, match=r"\[row 0\]: field 'rejected': missing"):
        load_rows(str(path), require_feedback=False)
    rejects = tmp_path / "rej.jsonl"
    result = load_rows(str(path), require_feedback=False, lenient=True,
                       rejects_path=str(rejects))
    assert result.rows == [] and result.num_rejected == 1
    assert json.loads(rejects.read_text())["row"] == 0


def test_parquet_invalid_utf8_names_row_and_column(tmp_path):
    good = pa.array([b"fine", b"\xff\xfe"], pa.binary()).view(pa.string())
    table = pa.table({"id": ["a", "b"], "prompt": good, "chosen": ["c", "c"],
                      "rejected": ["r", "r"]})
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path)
    with pytest.raises(RowError) as info:
        load_rows(str(path), require_feedback=False)
    assert (info.value.row, info.value.field) == (1, "prompt")
    assert "invalid UTF-8" in info.value.reason


def test_a_parquet_value_that_python_cannot_hold_is_named_with_its_own_error(tmp_path):
    """A value pyarrow cannot give as a Python object was reported as "invalid UTF-8" (a
    timestamp with an offset out of range, a ValueError), or stopped the load with a bare
    OverflowError even in lenient mode (a date past year 9999). Each is a bad row naming the row,
    the column and the actual error."""
    table = pa.table({"id": ["a", "b"], "prompt": ["p", "q"], "chosen": ["c", "c"],
                      "rejected": ["r", "r"],
                      "created": pa.array([0, 10**12], type=pa.timestamp("s")),
                      "zoned": pa.array([0, 0], type=pa.timestamp("s", tz="+99:00"))})
    path = tmp_path / "rows.parquet"
    pq.write_table(table.drop_columns(["zoned"]), path)
    with pytest.raises(RowError) as info:
        load_rows(str(path), require_feedback=False)
    assert (info.value.row, info.value.field) == (1, "created")
    assert "invalid UTF-8" not in info.value.reason
    assert "OverflowError: date value out of range" in info.value.reason
    rejects = tmp_path / "rej.jsonl"
    result = load_rows(str(path), require_feedback=False, lenient=True, rejects_path=str(rejects))
    assert [row.id for row in result.rows] == ["a"] and result.num_rejected == 1
    assert json.loads(rejects.read_text())["field"] == "created"
    pq.write_table(table.drop_columns(["created"]), path)
    with pytest.raises(RowError) as info:
        load_rows(str(path), require_feedback=False)
    assert (info.value.row, info.value.field) == (0, "zoned")
    assert "invalid UTF-8" not in info.value.reason and "cannot be read" in info.value.reason


def test_json_array_error_names_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([_row(0), _row(1, chosen=["x"])]))
    with pytest.raises(RowError) as info:
        load_rows(str(path), require_feedback=True)
    assert (info.value.row, info.value.field) == (1, "chosen")


def test_a_json_file_holding_one_object_over_several_lines_is_named_as_such(tmp_path):
    """A .json file that is not an array is read as one row object per line: one object
    written over several lines (indented, or rows under a key) was "invalid JSON" at line 1 of a
    file that is valid JSON, and in lenient mode every one of its lines a rejected row."""
    one = tmp_path / "one.json"
    one.write_text(json.dumps(_row(0), indent=2))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [_row(0), _row(1)]}, indent=2))
    for path in (one, wrapped):
        for lenient in (False, True):
            with pytest.raises(RowError) as info:
                load_rows(str(path), require_feedback=True, lenient=lenient,
                          rejects_path=str(tmp_path / "rejects.jsonl"))
            assert (info.value.file, info.value.line, info.value.row, info.value.field) == (
                str(path), None, None, None)
            assert str(info.value).startswith(f"{path}: row: holds one JSON object over ")
            assert "an array of row objects or one row object per line" in info.value.reason
    assert "'data' holds a list" in str(info.value)
    # One object on one line is a file of one row; rows one per line are rows.
    single = tmp_path / "single.json"
    single.write_text(json.dumps(_row(0)) + "\n\n")
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(_row(i)) + "\n" for i in range(3)))
    assert [r.id for r in load_rows(str(single), require_feedback=True).rows] == ["r0"]
    assert [r.id for r in load_rows(str(lines), require_feedback=True).rows] == ["r0", "r1", "r2"]


def test_a_key_given_twice_in_a_row_is_a_bad_row_not_its_last_value(tmp_path):
    # JSON parsers keep one of the values without a word: the row would train on it.
    twice = json.dumps(_row(2))[:-1].encode() + b', "prompt": "Another prompt?"}'
    path = _jsonl(tmp_path / "rows.jsonl", [_row(1), twice, _row(3)])
    with pytest.raises(RowError) as info:
        load_rows(path, require_feedback=True)
    assert (info.value.line, info.value.field) == (2, "prompt")
    assert str(info.value).startswith(f"{path}:2: field 'prompt': given twice in the row")
    loaded = load_rows(path, require_feedback=True, lenient=True,
                       rejects_path=str(tmp_path / "rejects.jsonl"))
    assert [r.id for r in loaded.rows] == ["r1", "r3"] and loaded.num_rejected == 1
    array = tmp_path / "rows.json"
    array.write_bytes(b"[" + json.dumps(_row(1)).encode() + b", " + twice + b"]")
    with pytest.raises(RowError) as info:
        load_rows(str(array), require_feedback=True)
    assert (info.value.row, info.value.field) == (1, "prompt")
    # Inside a column the project does not read, a repeated key is left alone.
    nested = _row(4, meta={"a": 1})
    path = _jsonl(tmp_path / "nested.jsonl", [json.dumps(nested).replace(
        '"a": 1}', '"a": 1, "a": 2}').encode()])
    assert load_rows(path, require_feedback=True).rows[0].extra == {"meta": {"a": 2}}


def test_unknown_extension(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,prompt\n")
    with pytest.raises(ConfigError, match="unknown row file type '.csv'"):
        load_rows(str(path), require_feedback=False)


def _trimming_byte_tokenizer():
    """The byte tokenizer with a template that trims message text, as Llama-3's does."""
    from cloud_jax.data.tokenizer import BYTE_CHAT_TEMPLATE, byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = BYTE_CHAT_TEMPLATE.replace("message['content']",
                                                   "message['content'] | trim")
    return tok


@pytest.mark.parametrize("policy", ["drop", "truncate_prompt"])
def test_pair_identical_after_tokenization_is_a_bad_row(tmp_path, policy):
    from cloud_jax.data.config import DataConfig
    from cloud_jax.data.tfds_builder import open_split, prepare_dataset
    from cloud_jax.data.tokenizer import byte_tokenizer

    # Row 2's responses differ as text but not once the template trims them; its prompt is over
    # max_length, so the over-length policy would drop it or cut its prompt: neither may hide it.
    rows = [_row(0), _row(1, prompt="q" * 200, chosen="2.", rejected=" 2.\n"), _row(2)]
    path = _jsonl(tmp_path / "rows.jsonl", rows)

    def build(tok, lenient):
        cfg = DataConfig(train_path=path, max_length=96, critique_prefix="C: ", lenient=lenient,
                         overlength_policy=policy, tfds_dir=str(tmp_path / "tfds"),
                         rejects_path=str(tmp_path / f"rejects-{lenient}.jsonl"))
        return prepare_dataset(cfg, tok, "critique")

    with pytest.raises(RowError) as info:
        build(_trimming_byte_tokenizer(), lenient=False)
    assert (info.value.file, info.value.line, info.value.field) == (path, 2, "rejected")
    assert str(info.value).startswith(f"{path}:2: field 'rejected': the same tokens as chosen")

    dataset = build(_trimming_byte_tokenizer(), lenient=True)
    stats = dataset.stats["train"]
    assert (stats["rows"], stats["rejected_rows"], stats["pairs"], stats["dropped_overlength"],
            stats["prompt_truncated"]) == (3, 1, 2, 0, 0)
    [reject] = [json.loads(line) for line in open(stats["rejects_path"])]
    assert (reject["file"], reject["line"], reject["field"]) == (path, 2, "rejected")
    assert json.loads(reject["raw"])["rejected"] == " 2.\n"
    assert [r["id"] for r in open_split(dataset, "train")] == [b"r0", b"r2"]

    # Where the template keeps the whitespace the two responses are different tokens: a pair.
    kept = build(byte_tokenizer(), lenient=False).stats["train"]
    assert kept["rejected_rows"] == 0 and kept["pairs"] == (3 if policy == "truncate_prompt"
                                                            else 2)


@pytest.mark.parametrize("trimmed_role,version,same", [
    ("user", 2, True), ("user", 3, False), ("assistant", 2, False), ("assistant", 3, True)])
def test_same_response_tokens_are_judged_under_the_configured_layout_version(
        tmp_path, trimmed_role, version, same):
    from cloud_jax.data.config import DataConfig
    from cloud_jax.data.tfds_builder import prepare_dataset
    from cloud_jax.data.tokenizer import BYTE_CHAT_TEMPLATE, byte_tokenizer

    # A template that trims one role's text only. Version 2 trims every text as the user's is,
    # version 3 the response as the assistant's is: "2." and " 2.\n" are the same tokens under
    # one and not the other, and the check follows data.layout_version.
    tok = byte_tokenizer()
    tok.chat_template = BYTE_CHAT_TEMPLATE.replace(
        "message['content']",
        f"(message['content'] | trim if message['role'] == '{trimmed_role}' "
        "else message['content'])")
    path = _jsonl(tmp_path / "rows.jsonl", [_row(0), _row(1, chosen="2.", rejected=" 2.\n")])
    cfg = DataConfig(train_path=path, max_length=256, critique_prefix="C: ", lenient=True,
                     layout_version=version, tfds_dir=str(tmp_path / "tfds"))
    stats = prepare_dataset(cfg, tok, "critique").stats["train"]
    assert (stats["rejected_rows"], stats["pairs"]) == ((1, 1) if same else (0, 2))


def test_overlength_warning_counts_only_the_pairs_tokenized(tmp_path, caplog):
    from cloud_jax.data.config import DataConfig
    from cloud_jax.data.tfds_builder import prepare_dataset

    # Row 0's responses are the same tokens once trimmed (rejected before measuring); row 1 is
    # over max_length; row 2 fits: one of the two pairs measured is too long.
    rows = [_row(0, chosen="2.", rejected=" 2.\n"), _row(1, prompt="q" * 200), _row(2)]
    cfg = DataConfig(train_path=_jsonl(tmp_path / "rows.jsonl", rows), max_length=96,
                     critique_prefix="C: ", lenient=True, tfds_dir=str(tmp_path / "tfds"))
    with caplog.at_level("WARNING", logger="cloud_jax.data.tfds_builder"):
        stats = prepare_dataset(cfg, _trimming_byte_tokenizer(), "critique").stats["train"]
    assert (stats["rejected_rows"], stats["dropped_overlength"], stats["pairs"]) == (1, 1, 1)
    assert "1 of 2 pairs are longer than data.max_length=96" in caplog.text


def test_a_split_given_for_row_files_is_refused_naming_the_files(tmp_path):
    """A split picks one of a Hugging Face dataset's splits: row files have none, so a split
    given for them alone is an error naming them, not dropped without a word."""
    from cloud_jax.data.schema import read_records

    a = _jsonl(tmp_path / "a.jsonl", [_row(0)])
    b = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([_row(1)]), b)
    for spec in (a, f"{a},{b}"):
        with pytest.raises(ConfigError, match=f"{a}.*split 'test' .*--split.*no splits"):
            load_rows(spec, require_feedback=True, split="test")
        with pytest.raises(ConfigError, match=f"{a}.*split 'test' .*--split.*no splits"):
            read_records(spec, split="test")
    assert [r.id for r in load_rows(a, require_feedback=True).rows] == ["r0"]


def test_a_blank_subset_is_no_subset_as_an_empty_one_is(tmp_path):
    """An empty subset was read as no subset, but one of spaces only (a padded table export)
    rejected the row as "is empty"; both are no subset now, and a subset of another type is
    still refused."""
    rows = [_row(0, subset=""), _row(1, subset="  \t\n"), _row(2, subset=None),
            {k: v for k, v in _row(3).items() if k != "subset"}, _row(4, subset=" math ")]
    result = load_rows(_jsonl(tmp_path / "rows.jsonl", rows), require_feedback=True)
    assert [row.subset for row in result.rows] == [None, None, None, None, " math "]
    # Written back (the critique command's output) each keeps its subset field as given: a blank
    # or null one was left out of the row.
    from cloud_jax.data.schema import row_record

    for given, row in zip(rows, result.rows):
        written = row_record(row, chosen_feedback="new")
        assert ("subset" in written) == ("subset" in given)
        if "subset" in given:
            assert written["subset"] == given["subset"]
        assert written["chosen_feedback"] == "new"
