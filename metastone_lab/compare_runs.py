"""Comparison tables from MLflow runs: the compare-runs notebook's helper.

Metric names are the summary keys (``bon@8``); in MLflow they are stored with
``tracking.metric_key`` (``bon_at_8``), which :func:`compare` maps back.
"""
from __future__ import annotations

from typing import Sequence

from .errors import ConfigError

COLUMNS = ["group", "metric", "mean", "ci_low", "ci_high", "n"]


def varying_params(runs) -> list[str]:
    """The ``params.*`` columns whose value differs between runs (seed excluded)."""
    cols = [c for c in runs.columns if c.startswith("params.") and c != "params.seed"]
    return [c[len("params."):] for c in cols if runs[c].astype(str).nunique(dropna=False) > 1]


def compare(runs, metrics: Sequence[str], group_by: Sequence[str] | None = None,
            n_boot: int = 1000, seed: int = 0):
    """Mean and 95% bootstrap CI (over seeds/runs) of each metric per group.

    ``runs``: a ``tracking.runs_frame``. ``group_by``: parameter names (default:
    every parameter that varies). Returns a tidy DataFrame with columns
    ``group, metric, mean, ci_low, ci_high, n`` (one row per group x metric).
    """
    import numpy as np
    import pandas as pd

    from .metrics import bootstrap_ci
    from .tracking import metric_key

    group_by = list(group_by) if group_by is not None else varying_params(runs)
    missing = [g for g in group_by if f"params.{g}" not in runs.columns]
    if missing:
        valid = sorted(c[len("params."):] for c in runs.columns if c.startswith("params."))
        raise ConfigError(f"compare: unknown group_by parameter(s) {missing}; valid: {valid}")
    rows = []
    if len(runs) == 0:
        return pd.DataFrame(columns=COLUMNS)
    keys = [f"params.{g}" for g in group_by]
    groups = runs.groupby(keys, dropna=False, sort=True) if keys else [((), runs)]
    for gval, sub in groups:
        gval = gval if isinstance(gval, tuple) else (gval,)
        label = ", ".join(f"{g}={v}" for g, v in zip(group_by, gval)) or "all"
        for m in metrics:
            col = f"metrics.{metric_key(m)}"
            vals = sub[col].dropna().astype(float).tolist() if col in sub else []
            if not vals:
                continue
            lo, hi = bootstrap_ci(vals, n_boot=n_boot, seed=seed) if len(vals) > 1 else (
                float("nan"), float("nan"))
            rows.append({"group": label, "metric": m, "mean": float(np.mean(vals)),
                         "ci_low": lo, "ci_high": hi, "n": len(vals)})
    return pd.DataFrame(rows, columns=COLUMNS)


__all__ = ["compare", "varying_params"]
