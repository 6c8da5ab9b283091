"""The report's numbers: the finished runs of an experiment and their per-variant
statistics (mean and 95% bootstrap CI over seeds), formatted for markdown.

Metric names are the summary keys (``bon@8``); in MLflow they are stored with
``tracking.metric_key`` (``bon_at_8``).
"""
from __future__ import annotations

import math
import re

CI_NOTE = ("mean over seeds [95% percentile-bootstrap CI over the per-seed values]; "
           "n = number of seeds (runs)")


def load_runs(experiment: str, tracking_uri: str | None = None, children_only: bool = True,
              dedupe: bool = True):
    """Finished child runs of ``experiment`` (empty frame if none / store missing),
    with ``params.variant`` filled, ordered by start time, the latest run per point."""
    import pandas as pd

    from .. import tracking
    from ..errors import TrackingError

    try:
        runs = tracking.runs_frame(experiment, tracking_uri, children_only=children_only)
    except TrackingError:
        return pd.DataFrame()
    if len(runs) == 0:
        return runs
    if "params.variant" not in runs:
        runs["params.variant"] = "base"
    runs["params.variant"] = runs["params.variant"].fillna("base").replace("", "base")
    if "start_time" in runs:
        runs = runs.sort_values("start_time")
    if dedupe and "point" in runs and runs["point"].notna().all():
        # a re-run spec (same point names) replaces its earlier runs: latest wins
        runs = runs.drop_duplicates(subset=["point"], keep="last")
    return runs.reset_index(drop=True)


def variants(runs) -> list[str]:
    """The variant labels of ``runs``, in run order."""
    return list(dict.fromkeys(runs["params.variant"].astype(str))) if len(runs) else []


def of_variant(runs, variant: str | None):
    """The runs of one variant (all runs for None)."""
    if variant is None or len(runs) == 0:
        return runs
    return runs[runs["params.variant"].astype(str) == variant]


def values_by_run(runs, metric: str, variant: str | None = None) -> list[tuple[str, float]]:
    """The finite values of a summary metric as (seed, value) pairs, in run order
    (the run id stands in for a missing seed)."""
    from ..tracking import metric_key

    sub = of_variant(runs, variant)
    col = f"metrics.{metric_key(metric)}"
    if len(sub) == 0 or col not in sub:
        return []
    out: list[tuple[str, float]] = []
    for i, (_, r) in enumerate(sub.iterrows()):
        v = r[col]
        if v is None or not math.isfinite(float(v)):
            continue
        seed = r.get("params.seed")
        out.append((str(seed) if seed is not None and seed == seed else
                    f"run {r.get('run_id', i)}", float(v)))
    return out


def summarise(vals: list[float]) -> dict | None:
    """{mean, lo, hi, n} of values (CI nan for a single value; None when empty)."""
    if not vals:
        return None
    from ..metrics import bootstrap_ci

    lo, hi = bootstrap_ci(vals, n_boot=2000, seed=0) if len(vals) > 1 else (math.nan, math.nan)
    return {"mean": sum(vals) / len(vals), "lo": lo, "hi": hi, "n": len(vals)}


def stat(runs, metric: str, variant: str | None = None) -> dict | None:
    """{mean, lo, hi, n} of a summary metric over the runs (of one variant)."""
    return summarise([v for _, v in values_by_run(runs, metric, variant)])


def fmt(s: dict | None, digits: int = 3) -> str:
    """``0.812 [0.790, 0.833]`` (``n/a`` for None; thousands without decimals)."""
    if s is None:
        return "n/a"
    m = s["mean"]
    if abs(m) >= 1000:
        core = f"{m:,.0f}"
        return core if not math.isfinite(s["lo"]) or s["lo"] == s["hi"] else \
            f"{core} [{s['lo']:,.0f}, {s['hi']:,.0f}]"
    core = f"{m:.{digits}f}"
    if not math.isfinite(s["lo"]):
        return f"{core} (n={s['n']})"
    return f"{core} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


def overlap(a: dict | None, b: dict | None) -> bool:
    """Whether two CIs overlap (True when either is missing)."""
    if a is None or b is None or not math.isfinite(a["lo"]) or not math.isfinite(b["lo"]):
        return True
    return not (a["hi"] < b["lo"] or b["hi"] < a["lo"])


def versus(name_a: str, a: dict | None, name_b: str, b: dict | None) -> str:
    """'A 0.81 [..] vs B 0.74 [..]: A higher, CIs separate' (or 'overlap')."""
    if a is None or b is None:
        return f"{name_a} vs {name_b}: not measured (runs missing)"
    rel = ("higher" if a["mean"] > b["mean"] else
           "lower" if a["mean"] < b["mean"] else f"equal to {name_b}")
    sep = "CIs overlap, not distinguishable at this n" if overlap(a, b) else "CIs separate"
    return f"{name_a} {fmt(a)} vs {name_b} {fmt(b)}: {name_a} {rel} ({sep})"


def md_table(runs, metrics: list[str], variants_: list[str] | None = None) -> str:
    """One row per variant, one column per metric (mean [CI]), and n."""
    rows = variants_ if variants_ is not None else variants(runs)
    head = "| variant | " + " | ".join(metrics) + " | n |\n|---|" + "---|" * (len(metrics) + 1)
    lines = [head]
    for v in rows:
        stats = [stat(runs, m, v) for m in metrics]
        cells = [fmt(s, 0 if m in ("wall_seconds",) else 3) for s, m in zip(stats, metrics)]
        n = max((s or {"n": 0})["n"] for s in stats) if stats else 0
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)


def series(runs, prefix: str) -> dict[str, dict[int, list[float]]]:
    """``metrics.<prefix>.<name>_at_<x>`` columns -> {name: {x: [values over runs]}}."""
    rx = re.compile(rf"^metrics\.{re.escape(prefix)}\.(.+)_at_(\d+)$")
    out: dict[str, dict[int, list[float]]] = {}
    for c in runs.columns:
        m = rx.match(c)
        if m:
            vals = [float(v) for v in runs[c].dropna()]
            if vals:
                out.setdefault(m.group(1), {})[int(m.group(2))] = vals
    return out


def mean_ci(vals: list[float]) -> tuple[float, float, float]:
    """(mean, lo, hi) of values; a single value is its own CI (for figure bands)."""
    import numpy as np

    from ..metrics import bootstrap_ci

    lo, hi = bootstrap_ci(vals, n_boot=1000, seed=0) if len(vals) > 1 else (vals[0], vals[0])
    return float(np.mean(vals)), lo, hi


def param(runs, name: str, default: str = "?") -> str:
    """The distinct values of ``params.<name>`` over the runs, comma-joined."""
    col = f"params.{name}"
    if len(runs) == 0 or col not in runs:
        return default
    vals = sorted({str(v) for v in runs[col].dropna()})
    return ", ".join(vals) if vals else default
