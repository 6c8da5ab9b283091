"""The sweep's closing table in the terminal: one row per point (a ``mean`` row
over several), values rounded for reading (:func:`format_value`)."""
from __future__ import annotations

import math
from typing import Any

from .layout import numeric_values
from .points import Point
from .spec import Spec


def format_value(key: str, v: Any) -> str:
    """One summary value for the terminal: 3 decimals, a CI as ``[lo, hi]``, seconds
    as ``5m 30s``, ``-`` when missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float))
                                                             for x in v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"
    if isinstance(v, (int, float)) and not isinstance(v, bool) and key.endswith("seconds"):
        m, sec = divmod(int(round(v)), 60)
        return f"{m}m {sec:02d}s" if m else f"{sec}s"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def terminal_table(df) -> str:
    """The sweep's closing table, rounded: one ``key value`` line per summary key for
    a single point (it reads better than one 150-column row), a table otherwise."""
    if not len(df):
        return "(no points run)"
    cols = [c for c in df.columns if c not in ("point", "status")]
    if len(df) == 1:
        row = df.iloc[0]
        width = max(len(c) for c in cols) if cols else 0
        lines = [f"point {row['point']} ({row['status']})"]
        lines += [f"  {c:<{width}}  {format_value(c, row[c])}" for c in cols]
        return "\n".join(lines)
    shown = df.copy()
    for c in cols:
        shown[c] = [format_value(c, v) for v in df[c]]
    return shown.to_string(index=False)


def summary_table(spec: Spec, points: list[Point], results: dict, summaries: dict, mean: dict):
    """One row per point run now (plus a ``mean`` row over the sweep when >1 point)."""
    import pandas as pd

    rows = []
    for p in points:
        r = results.get(p.name)
        if r is None:
            continue
        s = summaries.get(p.name) or {}
        keys = spec.summary_keys or sorted(numeric_values(s))
        row = {"point": p.name, "status": r["status"] + ("" if r.get("logged", True)
                                                          else " (unlogged)")}
        row.update({k: s.get(k) for k in keys})
        rows.append(row)
    if len(summaries) > 1 and rows:
        keys = [k for k in rows[0] if k not in ("point", "status")]
        rows.append({"point": "mean", "status": f"{len(summaries)} pts",
                     **{k: mean.get(k) for k in keys}})
    return pd.DataFrame(rows)
