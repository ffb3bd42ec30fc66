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
        return [{k: v for k, v in self.to_dict().items() if not isinstance(v, (list, dict))}]

    def to_frame(self):
        import pandas as pd
        return pd.DataFrame(self.rows())

    def summary(self) -> dict[str, Any]:
        """Scalar headline fields shown above the table in Jupyter."""
        return {k: v for k, v in self.to_dict().items() if not isinstance(v, (list, dict))}

    def _repr_html_(self) -> str:
        head = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                       f"<td>{html.escape(str(v))}</td></tr>" for k, v in self.summary().items())
        frame = self.to_frame()
        body = frame.head(30).to_html(index=False, border=0) if len(frame) > 1 else ""
        more = f"<p>… {len(frame) - 30} more rows: use <code>.to_frame()</code></p>" if len(frame) > 30 else ""
        return (f"<div><strong>{type(self).__name__}</strong><table>{head}</table>{body}{more}</div>")
