"""JSON Lines in and out: rows with their ``file:line``, and files written whole or not at all."""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence, Tuple

from cloud_jax import storage
from cloud_jax.data.schema import expand_paths


def read_jsonl(paths: str) -> list[tuple[str, dict]]:
    """(``file:line``, row object) for every non-blank line of the comma-separated files."""
    rows = []
    for path in expand_paths(paths):
        with storage.open_file(path, "r") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: invalid JSON: {err.msg}") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: a row must be a JSON object")
                rows.append((f"{path}:{lineno}", obj))
    return rows


def write_jsonl_atomic(path: str, objs: Sequence[dict]) -> None:
    """One JSON object a line, through a temporary file so that ``path`` is whole or absent (on an
    object store: one object write, atomic by itself). NaN and infinities are refused: they are
    not JSON, and other readers would reject the file."""
    lines = [json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n" for obj in objs]
    storage.write_text_atomic(path, "".join(lines))


def unwritable(obj: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """(field, why) for the first value of a row that :func:`write_jsonl_atomic` cannot write: NaN
    or an infinity (pandas writes a missing number as NaN, and Python's JSON reader takes one),
    or a value JSON has no type for (a Parquet timestamp, bytes); None if every value is fine.
    The why ends in what to do, for an error naming the row."""
    for field, value in obj.items():
        try:
            json.dumps(value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as err:
            kind = ("NaN or an infinity, which JSON has no number for"
                    if isinstance(err, ValueError) else
                    f"a {type(value).__name__}, which JSON has no type for")
            return field, (f"{value!r} is {kind}, so the row cannot be written out with its "
                           "results; drop the column, or fill or convert its values (in pandas: "
                           "df.drop(columns=[...]), df.fillna(...), df[col].astype(str))")
    return None
