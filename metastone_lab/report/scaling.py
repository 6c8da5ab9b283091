"""The scaling-law family: accuracy against total thinking compute, the log-linear
fit acc = a + b log10(C) with CIs by resampling runs, and its section of the report.
The claim tested (the slope's sign) is the spec's ``report.fit``."""
from __future__ import annotations

import math
import re

from ..report_spec import ReportSpec
from .claims import decide
from .figures import fig_scaling
from .sections import intro
from .stats import md_table, stat, variants, versus


def scaling_points(runs, selector: str = "sprm_bon"):
    """Rows (variant, run_id, k, compute, accuracy) of the scaling-law runs."""
    from ..tracking import metric_key

    rows = []
    for _, r in runs.iterrows():
        for c in runs.columns:
            m = re.match(r"^metrics\.compute_at_(\d+)$", c)
            if not m:
                continue
            k = int(m.group(1))
            acc = r.get(f"metrics.{metric_key(f'acc.{selector}@{k}')}")
            comp = r[c]
            if acc is None or comp is None or not (math.isfinite(acc) and math.isfinite(comp)):
                continue
            if comp > 0:
                rows.append({"variant": r["params.variant"], "run": r["run_id"], "k": k,
                             "compute": float(comp), "acc": float(acc),
                             "params": r.get("metrics.params_policy")})
    return rows


def fit_loglinear(rows, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """OLS acc = a + b log10(compute); 95% CIs by resampling runs (seeds x sizes)."""
    import numpy as np

    if len(rows) < 3:
        return None
    x = np.log10([r["compute"] for r in rows])
    y = np.array([r["acc"] for r in rows])
    if np.ptp(x) == 0:
        return None
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
    by_run: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_run.setdefault(r["run"], []).append(i)
    keys = list(by_run)
    rng = np.random.default_rng(seed)
    bs, as_ = [], []
    for _ in range(n_boot):
        idx = [i for k in rng.choice(len(keys), len(keys)) for i in by_run[keys[k]]]
        xx, yy = x[idx], y[idx]
        if np.ptp(xx) == 0:
            continue
        bb, aa = np.polyfit(xx, yy, 1)
        bs.append(bb)
        as_.append(aa)
    return {"a": float(a), "b": float(b), "r2": float(r2), "n_points": len(rows),
            "n_runs": len(keys), "b_lo": float(np.percentile(bs, 2.5)),
            "b_hi": float(np.percentile(bs, 97.5)), "a_lo": float(np.percentile(as_, 2.5)),
            "a_hi": float(np.percentile(as_, 97.5)), "boot_a": as_, "boot_b": bs}


def fit_line(fit: dict) -> str:
    """``b = 0.27 [0.07, 0.31] per 10x compute, a = ..., R^2 = ...``."""
    return (f"**b = {fit['b']:.4f} [{fit['b_lo']:.4f}, {fit['b_hi']:.4f}] accuracy per "
            f"10x compute**, a = {fit['a']:.3f} [{fit['a_lo']:.3f}, {fit['a_hi']:.3f}], "
            f"R^2 = {fit['r2']:.2f}")


def fit_verdict(fam: ReportSpec, fit: dict | None) -> tuple[str, str]:
    """(verdict, bullet text) of the declared slope claim on the measured fit."""
    claim = fam.fit
    paper = f" ({claim.paper.text()})" if claim.paper is not None else ""
    head = f"**{fam.title}**{paper}"
    if fit is None:
        return "not_measured", f"{head}: not measured: fewer than 3 (compute, accuracy) points."
    verdict, phrase = decide(fit["b_lo"], fit["b_hi"], claim.expect, "the slope", "0")
    return verdict, (f"{head}: slope {fit['b']:.4f} [{fit['b_lo']:.4f}, {fit['b_hi']:.4f}] "
                     f"per 10x compute ({claim.selector}), R^2 {fit['r2']:.2f}; expected "
                     f"{'positive' if claim.expect == 'higher' else claim.expect}: {phrase}.")


def section(fam: ReportSpec, runs, experiment: str, save) -> tuple[list[str], dict | None]:
    """The scaling-law section's lines and the fit (None when not measurable)."""
    L = intro(fam)
    if not len(runs):
        return L + [f"Not run (experiment `{experiment}` has no finished runs).", ""], None
    claim = fam.fit
    selector = claim.selector if claim is not None else "sprm_bon"
    rows = scaling_points(runs, selector)
    fit = fit_loglinear(rows)
    L += [md_table(runs, fam.table), ""]
    if fit is not None:
        L += [f"Fit over {fit['n_points']} points from {fit['n_runs']} runs ({selector}): "
              f"{fit_line(fit)}.", ""]
        kmax = max(r["k"] for r in rows)
        L += ["Within each size (compute grows only through k): " + "; ".join(
            f"{v}: " + versus("k=1", stat(runs, f"acc.{selector}@1", v), f"k={kmax}",
                              stat(runs, f"acc.{selector}@{kmax}", v))
            for v in variants(runs)) + ".", ""]
        others = claim.selectors if claim is not None else []
        if others:
            L += ["The same fit with other selectors on the same runs and compute (a selector "
                  "changes accuracy, not compute):", "",
                  "| selector | slope b per 10x compute [CI] | a [CI] | R^2 | points |",
                  "|---|---|---|---|---|"]
            for sel in others:
                f2 = fit_loglinear(scaling_points(runs, sel))
                if f2 is not None:
                    L.append(f"| {sel} | {f2['b']:.4f} [{f2['b_lo']:.4f}, {f2['b_hi']:.4f}] | "
                             f"{f2['a']:.3f} [{f2['a_lo']:.3f}, {f2['a_hi']:.3f}] | "
                             f"{f2['r2']:.2f} | {f2['n_points']} |")
            L.append("")
    name = save(fig_scaling(rows, fit), "scaling_law.png")
    L += [f"![scaling law]({name})", ""]
    return L, fit
