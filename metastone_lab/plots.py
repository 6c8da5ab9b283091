"""Figures shared by the notebooks and the report. Each function returns a
matplotlib Figure (log it with ``tracker.log_figure(fig, name)``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline",):
        try:
            import IPython  # noqa: F401

            if IPython.get_ipython() is None:
                matplotlib.use("Agg")
        except ImportError:
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl training log (blank/partial last line ignored)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def training_curves(rows: Sequence[dict[str, Any]], aha_onset_step: int | None = None,
                    title: str = "Reflective training"):
    """The aha-moment figure: mean trajectory score of correct vs incorrect
    rollouts per step (left) and held-out AUROC per evaluation (right), with
    the detected onset marked."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    steps = [r["step"] for r in rows if r.get("score_correct") is not None]
    for key, label, colour in (("score_correct", "correct rollouts", "tab:green"),
                               ("score_incorrect", "incorrect rollouts", "tab:red")):
        xs = [r["step"] for r in rows if r.get(key) is not None]
        a.plot(xs, [r[key] for r in rows if r.get(key) is not None], label=label, color=colour)
    a.set_xlabel("training step")
    a.set_ylabel("mean trajectory score")
    a.set_title("score of correct vs incorrect rollouts")
    ev = [r for r in rows if r.get("eval_auroc") is not None]
    b.plot([r["step"] for r in ev], [r["eval_auroc"] for r in ev], marker="o", label="AUROC")
    if any(r.get("eval_step_f1") is not None for r in ev):
        b.plot([r["step"] for r in ev], [r.get("eval_step_f1") for r in ev], marker="s",
               label="step-error F1")
    b.axhline(0.8, color="grey", ls=":", lw=1)
    b.set_ylim(0, 1.02)
    b.set_xlabel("training step")
    b.set_title("held-out AUROC / step F1")
    for ax in (a, b):
        if aha_onset_step is not None:
            ax.axvline(aha_onset_step, color="tab:purple", ls="--", lw=1.2,
                       label=f"aha onset (step {aha_onset_step})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if not steps and not ev:
        a.text(0.5, 0.5, "no training steps logged", ha="center", transform=a.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def accuracy_vs_k(table, title: str = "Accuracy vs k (held-out)"):
    """Accuracy of every selector against k (log2 axis) with bootstrap CI bands; the
    legend uses the summary's names (``bon``, ``weighted``: :mod:`metastone_lab.names`)."""
    from .names import display

    plt = _plt()
    acc = table[table.metric == "accuracy"].sort_values("k")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for sel, rows in acc.groupby("selector", sort=True):
        style = "--" if sel in ("pass@k", "oracle") else "-"
        k = rows.k.astype(float).to_numpy()
        ax.plot(k, rows.value.astype(float), style, marker="o", ms=3, label=display(sel))
        ax.fill_between(k, rows.ci_low.astype(float).to_numpy(),
                        rows.ci_high.astype(float).to_numpy(), alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def score_histogram(samples, aggregator: str = "geometric", bins: int = 30,
                    title: str = "Trajectory scores"):
    """Histogram of trajectory scores of correct vs incorrect samples."""
    plt = _plt()
    good, bad = [], []
    for ps in samples:
        for t in ps.trajectories:
            (good if t.correct else bad).append(t.scores.get(aggregator, float("nan")))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.hist(good, bins=bins, range=(0, 1), alpha=0.6, color="tab:green",
            label=f"correct (n={len(good)})")
    ax.hist(bad, bins=bins, range=(0, 1), alpha=0.6, color="tab:red",
            label=f"incorrect (n={len(bad)})")
    ax.set_xlabel(f"trajectory score ({aggregator})")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def line(xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str, title: str = ""):
    """A plain line plot (e.g. the SFT loss curve)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, ys)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def bar_with_ci(frame, x: str, y: str, lo: str | None = None, hi: str | None = None,
                title: str = ""):
    """Bars of ``frame[y]`` by ``frame[x]`` with optional CI whiskers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(frame)), 3.8))
    err = None
    if lo and hi:
        err = [(frame[y] - frame[lo]).clip(lower=0), (frame[hi] - frame[y]).clip(lower=0)]
    ax.bar(frame[x].astype(str), frame[y], yerr=err, capsize=3, color="tab:blue", alpha=0.8)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
