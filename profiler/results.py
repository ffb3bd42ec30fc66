"""Small result dataclasses share one behaviour: JSON, pandas and Jupyter views.

Every result class (Profile, HeadFit, ProfileDiff, WeightDiff, Verdict, AdapterCheck...) derives
from `Result`: `.to_dict()` gives plain JSON-ready data, `.to_json()` a deterministic string
(sorted keys, floats rounded to 6 significant digits, so the same inputs give byte-identical
files), `.to_frame()` a pandas DataFrame of the natural rows, `_repr_html_` a compact table.
"""
from __future__ import annotations

import dataclasses
import html
import json
import math
from typing import Any

import numpy as np

SIGNIFICANT_DIGITS = 6
NOT_JSON = {"json": False}


def plain(value: Any) -> Any:
    """Convert dataclasses, numpy scalars/arrays and tuples into JSON-ready Python values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return value.to_dict()
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        x = float(value)
        if math.isnan(x) or math.isinf(x):
            return None
        return float(f"{x:.{SIGNIFICANT_DIGITS}g}")
    return value


def dumps(data: Any) -> str:
    """Deterministic JSON text for plain data (sorted keys, two-space indent, final newline)."""
    return json.dumps(plain(data), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def from_json(cls: type, data: dict[str, Any]) -> Any:
    """Build a result dataclass from its JSON dict: lists back to tuples where the field is a
    tuple, and null back to NaN where the field is a plain float (JSON has no NaN; fields typed
    `float | None` keep None, which means "does not apply")."""
    values = dict(data)
    for f in dataclasses.fields(cls):
        kind, value = str(f.type), values.get(f.name)
        if kind == "float" and value is None and f.name in values:
            values[f.name] = math.nan
        elif kind.startswith("tuple[") and isinstance(value, list):
            values[f.name] = tuple(math.nan if v is None and "float" in kind else v for v in value)
    return cls(**values)


def head_index(key: Any, num_layers: int, num_heads: int) -> int:
    """The position of head [layer, head] in a layer-major list; negative indices count from the
    end, as in Python, and each axis is checked on its own."""
    if not (isinstance(key, tuple) and len(key) == 2):
        raise TypeError(f"index with [layer, head], got {key!r}")
    position = []
    for axis, index, size in (("layer", key[0], num_layers), ("head", key[1], num_heads)):
        index = int(index)
        if not -size <= index < size:
            raise IndexError(f"{axis} {index} out of range for {size} {axis}s")
        position.append(index % size)
    return position[0] * num_heads + position[1]


def _shown(key: str, value: Any) -> dict[str, Any]:
    """A field as table cells: scalars as they are, an interval `x_ci` as `x_lo`/`x_hi`, a list
    of scalars joined, a list of findings by their codes; other lists and dicts are left out."""
    if not isinstance(value, (list, dict)):
        return {key: value}
    if isinstance(value, list) and key.endswith("_ci") and len(value) == 2:
        return {f"{key[:-3]}_lo": value[0], f"{key[:-3]}_hi": value[1]}
    if isinstance(value, list) and value and all(not isinstance(v, (list, dict)) for v in value):
        return {key: "; ".join(str(v) for v in value)}
    if isinstance(value, list) and value and all(isinstance(v, dict) and "code" in v for v in value):
        return {key: ", ".join(str(v["code"]) for v in value)}
    return {}


class Result:
    """Mixin for result dataclasses. Subclasses may override `rows()` for `.to_frame()`.

    Fields declared with `field(metadata=NOT_JSON)` (large arrays) are kept out of the JSON.
    """

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.metadata.get("json", True)}

    def to_json(self) -> str:
        return dumps(self.to_dict())

    def rows(self) -> list[dict[str, Any]]:
        """The natural table of this result: one row per head, tensor, finding... Default: one row."""
        return [Result.summary(self)]

    def to_frame(self):
        import pandas as pd
        return pd.DataFrame(self.rows())

    def summary(self) -> dict[str, Any]:
        """Headline fields shown above the table in Jupyter (intervals split, lists joined)."""
        shown: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            shown.update(_shown(key, value))
        return shown

    def _repr_html_(self) -> str:
        head = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                       f"<td>{html.escape(str(v))}</td></tr>" for k, v in self.summary().items())
        frame = self.to_frame()
        has_table = type(self).rows is not Result.rows      # a class with rows of its own shows even one
        body = frame.head(30).to_html(index=False, border=0) if has_table and len(frame) else ""
        more = f"<p>… {len(frame) - 30} more rows: use <code>.to_frame()</code></p>" if len(frame) > 30 else ""
        return (f"<div><strong>{type(self).__name__}</strong><table>{head}</table>{body}{more}</div>")
