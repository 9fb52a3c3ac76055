"""Preference rows: loading from JSONL / JSON / Parquet files or Hugging Face datasets, and
validation.

A row is one object with the columns

    id, prompt, chosen, rejected, chosen_feedback, rejected_feedback, subset (optional)

``*_feedback`` is a string or a one-element list of one string (the self-generated sets use lists);
it is required when ``require_feedback`` (stages critique_sft, cloud, lm_pretrain) and not read
otherwise. ``id`` is a string or an integer (RewardBench ids are integers) and is kept as a string.
Other columns (RewardBench's model names, for instance) are kept in ``PreferenceRow.extra`` unread.

A row source is a file (``.jsonl``, ``.json``, ``.parquet``), a directory holding a Hugging Face
dataset (what ``datasets.Dataset.save_to_disk`` writes, or a script-free dataset repository:
Parquet / Arrow / JSON files with a README card) or a hub id ``hf://owner/name`` (where the network
allows). A dataset with several splits needs the split named (``split``; training takes
``data.split`` / ``data.eval_split``); one with a single split uses it. Row files have no splits:
a split given for sources that are all files is an error (in a list that mixes datasets and
files, it is the datasets' split). ``columns`` maps a field
to the column that holds it (``{"prompt": "question"}``) for any source. Datasets need the optional
``datasets`` package (``pip install 'cloud-jax[datasets]'``).

Every problem is a :class:`RowError` naming the file (for a dataset: ``<dataset>:<split>``), the
place (1-based line for JSONL, 0-based row index for Parquet, JSON arrays and datasets) and the
field (with its column, where ``columns`` renames it). Strict mode raises the first one. Lenient
mode skips the row, counts it and writes it to a rejects JSONL file with file, line/row, field,
reason and the raw row. Duplicate ids and ``chosen == rejected`` are problems of the later row:
strict mode raises, lenient mode rejects that row and keeps the first. Problems found later, when
a row is tokenized (:func:`reject_loaded_row`), are handled the same way.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from cloud_jax import storage
from cloud_jax.errors import ConfigError

log = logging.getLogger(__name__)

TEXT_FIELDS = ("prompt", "chosen", "rejected")
FEEDBACK_FIELDS = ("chosen_feedback", "rejected_feedback")
KNOWN_FIELDS = ("id",) + TEXT_FIELDS + FEEDBACK_FIELDS + ("subset",)


class RowError(ValueError):
    """A bad row: where it is (file, line or row index), which field, and what is wrong."""

    def __init__(self, file: str, line: Optional[int], row: Optional[int], field: Optional[str],
                 reason: str, column: Optional[str] = None):
        self.file, self.line, self.row, self.field, self.reason = file, line, row, field, reason
        # The source's column holding the field, where a column mapping renames it.
        self.column = column
        super().__init__(f"{self.location}: {self._what}: {reason}")

    @property
    def location(self) -> str:
        return _location(self.file, self.line, self.row)

    @property
    def _what(self) -> str:
        if not self.field:
            return "row"
        return f"field '{self.field}'" + (f" (column '{self.column}')" if self.column else "")


def _location(file: str, line: Optional[int], row: Optional[int]) -> str:
    if line is None and row is None:  # the file as a whole
        return file
    return f"{file}:{line}" if line is not None else f"{file}[row {row}]"


class _FieldError(Exception):
    def __init__(self, field: Optional[str], reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
    id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_feedback: Optional[str]
    rejected_feedback: Optional[str]
    subset: Optional[str]
    # "file:line" or "file[row i]", for messages further down the pipeline.
    source: str
    # The other columns, as given; and a blank or null subset (``subset`` None), so that a row
    # written back (row_record) keeps the field as it was.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Where the row was read: its file, and the 1-based line (JSONL) or 0-based row index.
    file: str = ""
    line: Optional[int] = None
    index: Optional[int] = None


def row_record(row: PreferenceRow, **fields: Any) -> dict:
    """The row as a JSON object in the project's format (its ``extra`` keys included), with
    ``fields`` set on top, e.g. new critiques."""
    out = {"id": row.id, "prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected,
           "chosen_feedback": row.chosen_feedback, "rejected_feedback": row.rejected_feedback}
    out.update(fields)
    if row.subset is not None:
        out["subset"] = row.subset
    out.update({k: v for k, v in row.extra.items() if k not in out})
    return out


@dataclasses.dataclass(frozen=True)
class LoadResult:
    rows: List[PreferenceRow]
    num_rejected: int
    rejects_path: Optional[str]


HUB_PREFIX = "hf://"
# What a Hugging Face dataset needs: the optional extra, pinned like every dependency.
_DATASETS_HINT = "pip install 'cloud-jax[datasets]' (datasets==5.2.0)"


def is_dataset_source(path: str) -> bool:
    """Whether ``path`` names a Hugging Face dataset: a directory (local or in a bucket) or an
    ``hf://`` id."""
    return path.startswith(HUB_PREFIX) or storage.isdir(path)


def check_split(files: Sequence[str], split: str) -> None:
    """ConfigError where a split is given and none of ``files`` (expanded sources) is a dataset:
    row files have no splits, so the split would be read by nothing."""
    if not split or any(is_dataset_source(f) for f in files):
        return
    shown = ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")
    raise ConfigError(f"{shown}: split {split!r} given (--split, or data.split / "
                      "data.eval_split), but row files (JSONL, JSON, Parquet) have no splits; a "
                      "split picks one of a Hugging Face dataset's (a dataset directory or "
                      "hf://owner/name): leave it out, or name the split's own files")


# A shard of a set written by one run: ``critiques-00003-of-00020.jsonl`` (stage 2,
# cloud_jax.scoring.relabel), ``train-00000-of-00005.parquet`` (Hugging Face datasets).
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})(?P<ext>\.[^/]+)$")


def shard_name(stem: str, index: int, count: int, ext: str) -> str:
    """``shard_name("critiques", 3, 20, ".jsonl")`` -> ``critiques-00003-of-00020.jsonl``."""
    return f"{stem}-{index:05d}-of-{count:05d}{ext}"


def _check_shard_sets(pattern: str, matches: Sequence[str]) -> None:
    """A glob that matches shards ``X-SSSSS-of-NNNNN.ext`` of a set some of whose N shards do not
    exist at all is an error: the set is unfinished (a stage 2 that was stopped, or whose other
    hosts are still at work), and reading the shards present would pass for the whole data set.
    Shards that exist but that the glob leaves out are a choice, not a gap."""
    sets: Dict[Tuple[str, str, int, str], set] = {}
    for path in matches:
        head, sep, name = path.rpartition("/")
        found = _SHARD.match(name)
        if found:
            key = (head + sep, found["stem"], int(found["count"]), found["ext"])
            sets.setdefault(key, set()).add(int(found["index"]))
    for (head, stem, count, ext), indices in sets.items():
        if len(indices) == count:
            continue
        present = set(storage.listdir(head.rstrip("/") or "."))
        # Numbered from 0 (ours, datasets') or from 1 (as safetensors shards are): either whole.
        gaps = [[name for name in (shard_name(stem, i, count, ext)
                                   for i in range(first, first + count))
                 if name not in present] for first in (0, 1)]
        if all(gaps):
            missing = gaps[1] if count in indices else gaps[0]
            raise FileNotFoundError(
                f"data file {pattern!r}: {len(missing)} of the {count} shards "
                f"{stem}-*-of-{count:05d}{ext} do not exist (first: {head}{missing[0]}): the run "
                "that writes them has not finished (stage 2: run the same `python -m cloud_jax "
                "critique` again to finish it); name the shards present one by one to read just "
                "those")


def expand_paths(spec: Union[str, Sequence[str]]) -> List[str]:
    """A file, a dataset directory, an ``hf://`` id, a comma-separated list of them or globs ->
    the sources they name (the matches of a glob sorted), each checked to exist. A glob over
    shards ``X-SSSSS-of-NNNNN.ext`` of which some do not exist is an error
    (:func:`_check_shard_sets`): an unfinished set never passes for a whole one."""
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    paths: List[str] = []
    for part in filter(None, parts):
        if part.startswith(HUB_PREFIX):
            paths.append(part)
            continue
        # A name that exists is that file, even where it holds glob characters (data[1].jsonl).
        if storage.is_url(part):
            storage.check_path(part, "data path")
            literal = not glob.has_magic(part) or storage.exists(part)
            matches = [part] if literal else storage.glob(part)
            if not matches or not all(storage.isfile(m) or storage.isdir(m) for m in matches):
                raise FileNotFoundError(
                    f"data file {part!r} does not exist (or the glob matches nothing)")
            if not literal:
                _check_shard_sets(part, matches)
            paths.extend(matches)
            continue
        literal = not glob.has_magic(part) or os.path.exists(part)
        matches = [part] if literal else storage.glob(part)
        if not matches or not all(os.path.exists(m) for m in matches):
            raise FileNotFoundError(
                f"data file {part!r} does not exist (or the glob matches nothing)")
        if not literal:
            _check_shard_sets(part, matches)
        paths.extend(matches)
    if not paths:
        raise FileNotFoundError(f"no data files given ({spec!r})")
    return paths


def source_digest(path: str, split: str = "") -> str:
    """What a dataset build depends on in one source: the bytes of a file, of every file of a
    dataset directory (with their names), or a hub dataset's fingerprint (its revision)."""
    digest = hashlib.sha256()
    if path.startswith(HUB_PREFIX):
        dataset, split = load_hf_dataset(path, split)
        digest.update(f"{split}:{dataset._fingerprint}".encode())
        return digest.hexdigest()
    if storage.is_url(path) and storage.isdir(path):
        # A dataset directory in a bucket: its objects' names, sizes and etags.
        digest.update(f"{storage.fingerprint(path)}:split:{split}".encode())
        return digest.hexdigest()
    if storage.is_url(path) or os.path.isfile(path):
        _hash_file(digest, path)
        return digest.hexdigest()
    for root, dirs, names in os.walk(path):
        # Hidden entries (.git, caches) are not the dataset.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            file = os.path.join(root, name)
            digest.update(os.path.relpath(file, path).encode() + b"\0")
            _hash_file(digest, file)
    digest.update(f"split:{split}".encode())
    return digest.hexdigest()


def _hash_file(digest, path: str) -> None:
    with storage.open_file(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


_DATA_FILE_TYPES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")


def _check_every_file_is_read(path: str, local: str, builder) -> None:
    """ConfigError where ``datasets`` would read only some of a directory's data files: it infers
    splits from file names (train, test, ...) and reads one file format, so a file named
    otherwise, or of another format, would be left out without a word."""
    from datasets.data_files import FILES_TO_IGNORE  # metadata, never rows (dataset_info.json)

    used = {os.path.realpath(str(f)) for files in (builder.config.data_files or {}).values()
            for f in files}
    present = []
    for root, dirs, names in os.walk(local):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        present += [os.path.join(root, n) for n in sorted(names)
                    if not n.startswith(".") and n.lower().endswith(_DATA_FILE_TYPES)
                    and n not in FILES_TO_IGNORE]
    left = [os.path.relpath(p, local) for p in present if os.path.realpath(p) not in used]
    if left:
        raise ConfigError(f"{path}: the datasets library would read only some of its data files, "
                          f"leaving out {', '.join(left[:5])}{' ...' if len(left) > 5 else ''} "
                          "(it infers splits from file names such as train / test, and reads "
                          "one file format); name the files instead (a comma-separated list or "
                          "a glob), or give the directory one format and split-named files")


def load_hf_dataset(path: str, split: str = ""):
    """A Hugging Face dataset source -> (``datasets.Dataset``, the split read).

    ``path``: a ``save_to_disk`` directory, a script-free dataset repository directory, or
    ``hf://owner/name`` (``hf://datasets/owner/name`` too). ``split``: which split of a dataset
    that has several; "" takes the only one."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{path}: reading a Hugging Face dataset needs the datasets package: "
                          f"{_DATASETS_HINT}") from None
    # A dataset directory in a bucket is read from its local copy (storage.local_copy).
    hub = path.startswith(HUB_PREFIX)
    local = storage.local_copy(path) if storage.is_url(path) and not hub else path
    try:
        if hub:
            repo = path[len(HUB_PREFIX):]
            repo = repo[len("datasets/"):] if repo.startswith("datasets/") else repo
            loaded = datasets.load_dataset(repo)
        elif os.path.isfile(os.path.join(local, "dataset_dict.json")) or os.path.isfile(
                os.path.join(local, "state.json")):
            loaded = datasets.load_from_disk(local)
        else:
            _check_every_file_is_read(path, local, datasets.load_dataset_builder(local))
            loaded = datasets.load_dataset(local)
    except ConfigError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetBuildError) as err:
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        raise ConfigError(f"{path}: not a Hugging Face dataset that can be read here (a "
                          f"save_to_disk directory, a directory of Parquet/Arrow/JSON files, or "
                          f"hf://owner/name): {err}{cause}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if not split and len(names) == 1:
            split = names[0]
        if split not in loaded:
            what = f"has no split {split!r}" if split else "has several splits; name one"
            raise ConfigError(f"{path} {what} (its splits: {', '.join(names)}; set data.split / "
                              f"data.eval_split, or --split)")
        return loaded[split], split
    # A single Dataset (save_to_disk of one split): the split it was saved as, if it says.
    if split and loaded.split is not None and str(loaded.split) != split:
        raise ConfigError(f"{path} has no split {split!r} (it holds one split, "
                          f"{str(loaded.split)!r}; set data.split / data.eval_split, or --split)")
    return loaded, split or str(loaded.split or "train")


# --- reading: (line, row, raw object or _FieldError, raw text for the rejects file) -------------

_Raw = Tuple[Optional[int], Optional[int], Union[Any, _FieldError], str]


class _Object(dict):
    """A JSON object as read, with the first key given in it more than once (None: none)."""

    twice: Optional[str] = None


def _object(pairs: List[Tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        obj.twice = next(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _parse_json(text: Union[str, bytes]) -> Any:
    """``json.loads``, noting in each object a key it gives twice (the parser keeps the last
    value of the two and drops the other without a word)."""
    return json.loads(text, object_pairs_hook=_object)


def _key_given_twice(obj: Any) -> Any:
    """A row object, or the _FieldError of a key it gives twice: which of the values is the
    row's is not known. (Inside a column's value, unread here, a repeated key is left be.)"""
    if isinstance(obj, _Object) and obj.twice is not None:
        return _FieldError(obj.twice, "given twice in the row object; a JSON reader would keep "
                                      "one of the values and drop the other")
    return obj


def _iter_jsonl(path: str) -> Iterator[_Raw]:
    with storage.open_file(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            text = raw.decode("utf-8", "backslashreplace").rstrip("\r\n")
            try:
                obj = _key_given_twice(_parse_json(raw.decode("utf-8")))
            except UnicodeDecodeError as err:
                obj = _FieldError(None, f"invalid UTF-8 at byte {err.start} of the line")
            except json.JSONDecodeError as err:
                obj = _FieldError(None, f"invalid JSON: {err.msg} (column {err.colno})")
            yield lineno, None, obj, text


def _iter_json_array(path: str) -> Iterator[_Raw]:
    with storage.open_file(path, "rb") as f:
        data = f.read()
    try:
        rows = _parse_json(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise RowError(path, None, None, None, f"invalid UTF-8 at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise RowError(path, err.lineno, None, None, f"invalid JSON: {err.msg}") from None
    if not isinstance(rows, list):
        raise RowError(path, None, None, None,
                       "a .json file must hold an array of row objects (or one object per line)")
    for i, obj in enumerate(rows):
        yield None, i, _key_given_twice(obj), json.dumps(obj, ensure_ascii=True, default=repr)


def _check_not_one_object(path: str) -> None:
    """RowError for a .json file (not an array) that holds one JSON object written over several
    lines (indented, or rows under a key): read as one row object per line, each of its lines
    would be invalid JSON, though the file is valid JSON."""
    with storage.open_file(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return  # named line by line
    lines = sum(1 for line in text.splitlines() if line.strip())
    if lines < 2:
        return
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return  # rows one per line (or bad JSON): named line by line
    if not isinstance(obj, dict):
        return
    lists = [k for k, v in obj.items() if isinstance(v, list)]
    hint = (f" (its {lists[0]!r} holds a list: write that list as the file, or its rows one per "
            "line)" if len(obj) == 1 and lists else
            " (write it on one line, or the rows as an array)")
    raise RowError(path, None, None, None,
                   f"holds one JSON object over {lines} lines; a .json file holds an array of row "
                   f"objects or one row object per line (JSON Lines){hint}")


def _unreadable(err: Exception) -> str:
    """Why a Parquet value cannot be read as a Python object (pyarrow's error)."""
    if isinstance(err, UnicodeDecodeError):
        return f"invalid UTF-8 at byte {err.start} of the value"
    return (f"the value cannot be read as a Python object ({type(err).__name__}: {err}); cast "
            "the column to a type that holds it, or drop the column")


def _iter_parquet(path: str) -> Iterator[_Raw]:
    import pyarrow.parquet as pq

    offset = 0
    handle = storage.open_file(path, "rb") if storage.is_url(path) else path
    for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024):
        try:
            objs: List[Any] = batch.to_pylist()
        except Exception:  # a value Python cannot hold: found and named value by value
            objs = []
            for i in range(batch.num_rows):
                obj = {}
                for name in batch.schema.names:
                    try:
                        obj[name] = batch.column(name)[i].as_py()
                    except Exception as err:  # noqa: BLE001 - named in the row's error
                        obj = _FieldError(name, _unreadable(err))
                        break
                objs.append(obj)
        for i, obj in enumerate(objs):
            raw = obj.reason if isinstance(obj, _FieldError) else json.dumps(
                obj, ensure_ascii=True, default=repr)
            yield None, offset + i, obj, raw
        offset += batch.num_rows


def _iter_dataset(dataset) -> Iterator[_Raw]:
    # A dataset saved after set_format("numpy" / "torch" / "pandas" / ...) comes back in that
    # format (ids as numpy or torch scalars, lists as arrays, rows as tables): read the Python
    # objects it stores, every column.
    if hasattr(dataset, "with_format"):
        dataset = dataset.with_format(None)
    for i, obj in enumerate(dataset):
        yield None, i, obj, json.dumps(obj, ensure_ascii=True, default=repr)


def _iter_source(path: str, split: str = "") -> Tuple[str, Iterator[_Raw]]:
    """(the source's name for messages: the file, or ``<dataset>:<split>``; its raw rows)."""
    if is_dataset_source(path):
        dataset, split = load_hf_dataset(path, split)
        return f"{path}:{split}", _iter_dataset(dataset)
    return path, _iter_raw(path)


def apply_columns(obj: Any, columns: Optional[Mapping[str, str]]) -> Any:
    """The row with each mapped column under its field's name (``{"prompt": "question"}``
    moves ``question`` to ``prompt``). A mapped field is read from its column only: a row
    without that column lacks the field (an error naming it), even where it has a column of the
    field's own name, which the mapping replaces."""
    if not columns or not isinstance(obj, dict):
        return obj
    out = {k: v for k, v in obj.items() if k not in columns.values() and k not in columns}
    for field, column in columns.items():
        if column in obj:
            out[field] = obj[column]
    return out


def _iter_raw(path: str) -> Iterator[_Raw]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        return _iter_parquet(path)
    if ext == ".jsonl":
        return _iter_jsonl(path)
    if ext == ".json":
        with storage.open_file(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):
            return _iter_json_array(path)
        _check_not_one_object(path)
        return _iter_jsonl(path)
    # The user's to fix (a .csv, or a README a glob picked up): a ConfigError, one `error:` line.
    raise ConfigError(f"{path}: unknown row file type {ext!r}; expected .jsonl, .json or .parquet "
                      "files (or a Hugging Face dataset directory): convert it, or leave it out "
                      "of the list or glob")


# --- validation -----------------------------------------------------------------------------------

def _check_text(field: str, value: Any) -> str:
    if value is None:
        raise _FieldError(field, "is null; expected a non-empty string")
    if not isinstance(value, str):
        raise _FieldError(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _FieldError(field, "is empty")
    if "\x00" in value:
        raise _FieldError(field, f"contains a NUL character at offset {value.index(chr(0))}")
    bad = lone_surrogate(value)
    if bad is not None:
        raise _FieldError(field, bad)
    return value


def lone_surrogate(text: str) -> Optional[str]:
    """Why ``text`` is not Unicode text a tokenizer can take, or None when it is: a JSON
    ``\\ud800`` escape (or bytes decoded with "surrogateescape") leaves a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"contains a lone surrogate (\\u{ord(text[err.start]):04x}) at offset {err.start}; "
                "the text is not valid Unicode")
    return None


class ContentError(ValueError):
    """A chat message's content that is neither a string nor a list of text parts: ``field``
    names the place (``<where>[k]`` for a part), ``reason`` what is wrong with it."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def content_text(content: Any, where: str) -> str:
    """A chat message's ``content`` (at ``where``) as text: a string as is, or a list of text
    parts (``{"type": "text", "text": str}``, the form of OpenAI's API and of newer TRL) joined in
    order with nothing between, as chat templates that take parts write them, so that parts and
    their joined string are the same tokens. A part of another type (an image, audio) is a
    :class:`ContentError` naming it: the model reads text only. A part's key other than type and
    text is refused unless it holds None (``datasets`` fills the keys one part lacks with None
    where another part of the column has them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ContentError(where, "expected a string or a list of text parts "
                                  f"([{{\"type\": \"text\", \"text\": str}}]), got "
                                  f"{type(content).__name__}")
    texts = []
    for k, part in enumerate(content):
        field = f"{where}[{k}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ContentError(field, "expected a part ({\"type\": \"text\", \"text\": str}), "
                                      f"got {part!r:.60}")
        if part["type"] != "text":
            raise ContentError(field, f"a part of type {part['type']!r}; only text parts can be "
                                      "scored (a CLoud model reads text): leave it out, or score "
                                      "the message's text alone")
        if not isinstance(part.get("text"), str):
            raise ContentError(f"{field}.text", "expected a string, got "
                                                f"{type(part.get('text')).__name__}")
        unknown = [key for key, v in part.items() if key not in ("type", "text") and v is not None]
        if unknown:
            raise ContentError(f"{field}.{unknown[0]}", "unknown key (a text part holds type "
                                                        "and text; a key the model does not read "
                                                        "is refused, not dropped: remove it)")
        texts.append(part["text"])
    return "".join(texts)


def _check_feedback(field: str, value: Any) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise _FieldError(field, f"expected a string or a one-element list, got a list of "
                                     f"{len(value)} elements")
        value = value[0]
    return _check_text(field, value)


def validate_row(obj: Any, require_feedback: bool, file: str, line: Optional[int] = None,
                 index: Optional[int] = None) -> PreferenceRow:
    """One raw row object -> a PreferenceRow, or _FieldError naming the first bad field."""
    if not isinstance(obj, dict):
        raise _FieldError(None, f"expected a JSON object, got {type(obj).__name__}")
    required = ("id",) + TEXT_FIELDS + (FEEDBACK_FIELDS if require_feedback else ())
    for field in required:
        if field not in obj:
            hint = " (feedback is required for this stage)" if field in FEEDBACK_FIELDS else ""
            raise _FieldError(field, f"missing{hint}")
    row_id = obj["id"]
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        row_id = str(row_id)
    else:
        row_id = _check_text("id", row_id)
    texts = {f: _check_text(f, obj[f]) for f in TEXT_FIELDS}
    feedback = {f: _check_feedback(f, obj[f]) if require_feedback else None
                for f in FEEDBACK_FIELDS}
    subset = obj.get("subset")
    if isinstance(subset, str) and not subset.strip():
        subset = None  # a blank subset (a table export's empty cell) is none
    if subset is not None:
        subset = _check_text("subset", subset)
    if texts["chosen"] == texts["rejected"]:
        raise _FieldError("rejected", "identical to chosen; the pair carries no preference")
    extra = {k: v for k, v in obj.items() if k not in KNOWN_FIELDS}
    if subset is None and "subset" in obj:
        extra["subset"] = obj["subset"]  # blank or null: read as none, written back as given
    return PreferenceRow(id=row_id, **texts, **feedback, subset=subset,
                         source=_location(file, line, index), extra=extra, file=file, line=line,
                         index=index)


def _reject_record(file: str, line: Optional[int], index: Optional[int], field: Optional[str],
                   reason: str, raw: str) -> str:
    return json.dumps({"file": file, "line": line, "row": index, "field": field,
                       "reason": reason, "raw": raw}, ensure_ascii=True) + "\n"


def reject_loaded_row(row: PreferenceRow, field: str, reason: str, *, lenient: bool,
                      rejects_path: Optional[str]) -> None:
    """A problem found after loading (when the row is tokenized, say), handled like one found
    while loading: strict mode raises RowError naming the row's file, line and field; lenient mode
    appends the row to ``rejects_path`` (the file :func:`load_rows` wrote, if any) and returns.
    The row is written as loaded (``raw``: its fields as JSON), the original text being gone."""
    if not lenient:
        raise RowError(row.file, row.line, row.index, field, reason)
    if rejects_path:
        fields = {"id": row.id, "prompt": row.prompt, "chosen": row.chosen,
                  "rejected": row.rejected, "chosen_feedback": row.chosen_feedback,
                  "rejected_feedback": row.rejected_feedback, "subset": row.subset, **row.extra}
        f = storage.AppendText(rejects_path)
        f.write(_reject_record(row.file, row.line, row.index, field, reason,
                               json.dumps(fields, ensure_ascii=True, default=repr)))
        f.close()


def load_rows(paths: Union[str, Sequence[str]], *, require_feedback: bool, lenient: bool = False,
              rejects_path: Optional[str] = None, split: str = "",
              columns: Optional[Mapping[str, str]] = None,
              rejects_shown_as: Optional[str] = None) -> LoadResult:
    """Loads and validates every row of ``paths`` (see the module docstring for the rules; ``split``
    and ``columns`` as there).

    Raises RowError on the first bad row unless ``lenient``; then bad rows are skipped, counted
    and, when ``rejects_path`` is given, written there one JSON object per line.
    ``rejects_shown_as``: the path the warning about skipped rows names (default
    ``rejects_path``), for a caller that writes the rejects to a staging file and copies them
    there afterwards.
    """
    columns = dict(columns or {})
    files = expand_paths(paths)
    check_split(files, split)
    rows: List[PreferenceRow] = []
    first_seen: dict = {}
    num_rejected = 0
    rejects = None
    names = []
    if lenient and rejects_path:
        rejects = storage.AppendText(rejects_path, fresh=True)
    try:
        for path in files:
            name, raw_rows = _iter_source(path, split)
            names.append(name)
            for line, index, obj, raw in raw_rows:
                try:
                    if isinstance(obj, _FieldError):
                        raise obj
                    row = validate_row(apply_columns(obj, columns), require_feedback, name, line,
                                       index)
                    if row.id in first_seen:
                        raise _FieldError("id", f"duplicate id {row.id!r} (first at "
                                                f"{first_seen[row.id]})")
                except _FieldError as bad:
                    error = RowError(name, line, index, bad.field, bad.reason,
                                     columns.get(bad.field or ""))
                    if not lenient:
                        raise error from None
                    num_rejected += 1
                    if rejects is not None:
                        rejects.write(_reject_record(name, line, index, bad.field, bad.reason,
                                                     raw))
                    continue
                first_seen[row.id] = row.source
                rows.append(row)
    finally:
        if rejects is not None:
            rejects.close()
    if num_rejected:
        log.warning("%d bad rows skipped in %s%s", num_rejected, ", ".join(names),
                    f" (details in {rejects_shown_as or rejects_path})" if rejects is not None
                    else "")
    return LoadResult(rows=rows, num_rejected=num_rejected,
                      rejects_path=rejects_path if rejects is not None else None)


def read_records(paths: Union[str, Sequence[str]], split: str = "",
                 columns: Optional[Mapping[str, str]] = None) -> List[Tuple[str, Dict[str, Any]]]:
    """(where, row object) for every row of the sources, unvalidated: ``file:line`` for JSONL,
    ``file[row i]`` for the others (``<dataset>:<split>[row i]`` for a dataset); ``columns``
    renames as in :func:`load_rows`. For commands that read rows of their own shape (``score``)."""
    out = []
    files = expand_paths(paths)
    check_split(files, split)
    for path in files:
        name, raw_rows = _iter_source(path, split)
        for line, index, obj, _ in raw_rows:
            if isinstance(obj, _FieldError):
                raise RowError(name, line, index, obj.field, obj.reason)
            if not isinstance(obj, dict):
                raise RowError(name, line, index, None,
                               f"expected a JSON object, got {type(obj).__name__}")
            out.append((_location(name, line, index), apply_columns(obj, columns)))
    return out
