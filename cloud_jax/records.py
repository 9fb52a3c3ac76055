"""Recorded settings compared with the current ones: a checkpoint's config, a critique run's
provenance, a pipeline's saved config. Each caller decides which differences are fatal and says
so in its own words; what counts as a difference is defined once, here.

Nested dicts compare leaf by leaf under dotted keys (``model.hidden_size``), so a message can name
the setting that changed rather than its whole section.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``. An empty dict stays a leaf, so that adding the
    first entry to it is a change."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def changes(old: Mapping[str, Any], new: Mapping[str, Any],
            ignore: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every leaf that differs, sorted by key; a key
    on one side only pairs with None. ``ignore`` names keys or whole sections (``"evaluation"``
    covers ``evaluation.seed``) whose differences do not count."""
    a, b = flatten(old), flatten(new)

    def ignored(key: str) -> bool:
        return any(key == name or key.startswith(f"{name}.") for name in ignore)

    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not ignored(k)}
