"""The report's figures, drawn from runs frames: accuracy vs k per selector
(:func:`metastone_lab.plots.accuracy_vs_k`), the aha moment and the scaling law."""
from __future__ import annotations

from .stats import mean_ci, series, stat, variants


def selector_table(runs):
    """The ``metrics.acc.<selector>_at_<k>`` columns as the tidy table
    :func:`metastone_lab.plots.accuracy_vs_k` draws (mean and CI over runs)."""
    import pandas as pd

    rows = []
    for sel, pts in sorted(series(runs, "acc").items()):
        for k in sorted(pts):
            m, lo, hi = mean_ci(pts[k])
            rows.append({"metric": "accuracy", "selector": sel.replace("_at_", "@"), "k": k,
                         "value": m, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=["metric", "selector", "k", "value", "ci_low", "ci_high"])


def fig_selectors(runs, title: str):
    """Accuracy vs k per selector, mean and CI band over the runs (seeds)."""
    from ..plots import accuracy_vs_k

    fig = accuracy_vs_k(selector_table(runs), title=title)
    fig.axes[0].set_ylabel("accuracy (held-out)")
    return fig


def _band(ax, pts: dict[int, list[float]], **style) -> None:
    xs = sorted(pts)
    ms = [mean_ci(pts[x]) for x in xs]
    colour = style.pop("color", None)
    ax.plot(xs, [m[0] for m in ms], color=colour, **style)
    ax.fill_between(xs, [m[1] for m in ms], [m[2] for m in ms], color=colour, alpha=0.12)


def fig_aha(base_runs, curve_runs=None):
    """Left: mean trajectory score of correct vs incorrect training rollouts (base
    runs, mean and CI over seeds). Right: held-out AUROC during training, per
    variant of ``curve_runs`` (the family that declares ``training_curves``)."""
    from ..plots import _plt

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.9))
    curves = series(base_runs, "curve")
    for key, label, colour in (("score_correct", "correct rollouts", "tab:green"),
                               ("score_incorrect", "incorrect rollouts", "tab:red")):
        _band(a, curves.get(key, {}), color=colour, label=label)
    a.set_xlabel("training step")
    a.set_ylabel("mean trajectory score (geometric)")
    a.set_title("base config: correct vs incorrect rollouts")
    groups = {"base": base_runs}
    if curve_runs is not None and len(curve_runs):
        groups = {v: curve_runs[curve_runs["params.variant"] == v] for v in variants(curve_runs)}
    for name, runs in groups.items():
        pts = series(runs, "curve").get("eval_auroc", {})
        if pts:
            _band(b, pts, marker="o", ms=3, label=name)
    b.axhline(0.8, color="grey", ls=":", lw=1, label="aha threshold 0.8")
    b.axhline(0.5, color="black", ls="-", lw=0.5)
    b.set_ylim(0, 1.02)
    b.set_xlabel("training step")
    b.set_ylabel("held-out AUROC")
    b.set_title("held-out AUROC during training")
    onset = stat(base_runs, "aha_onset_step")
    for ax in (a, b):
        if onset is not None:
            ax.axvline(onset["mean"], color="tab:purple", ls="--", lw=1.2,
                       label=f"aha onset (mean step {onset['mean']:.1f})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_scaling(rows, fit):
    """Accuracy vs compute per backbone size (mean and CI over seeds), with the fit."""
    import numpy as np

    from ..plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.3))
    for v in dict.fromkeys(r["variant"] for r in rows):
        sub = [r for r in rows if r["variant"] == v]
        ks = sorted({r["k"] for r in sub})
        cs = [np.mean([r["compute"] for r in sub if r["k"] == k]) for k in ks]
        ms = [mean_ci([r["acc"] for r in sub if r["k"] == k]) for k in ks]
        ax.errorbar(cs, [m[0] for m in ms],
                    yerr=[[m[0] - m[1] for m in ms], [m[2] - m[0] for m in ms]],
                    marker="o", ms=4, capsize=2, label=v)
    if fit is not None:
        logc = np.log10([r["compute"] for r in rows])
        xs = np.linspace(min(logc), max(logc), 50)
        band = np.array([fit["boot_a"][i] + fit["boot_b"][i] * xs
                         for i in range(len(fit["boot_b"]))])
        ax.plot(10 ** xs, fit["a"] + fit["b"] * xs, "k--", lw=1.2,
                label=f"fit: {fit['a']:.2f} + {fit['b']:.3f} log10 C")
        ax.fill_between(10 ** xs, np.percentile(band, 2.5, axis=0),
                        np.percentile(band, 97.5, axis=0), color="grey", alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("thinking compute C = (policy + head params) x generated tokens (per problem)")
    ax.set_ylabel("SPRM best-of-k accuracy")
    ax.set_title("Scaling law: accuracy vs thinking compute (k = 1..32)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
