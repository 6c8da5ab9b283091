"""The ablation report (``metastone-lab report``). The compare-runs helper is
:mod:`metastone_lab.compare_runs`.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


# ============================================================ ablation report
# ``metastone-lab report`` (= ``make report``): docs/results.md + docs/figures/*.png,
# generated from the MLflow store only. Every number in the text is read from the
# runs; nothing is typed by hand.

AGGREGATORS_ORDER = ["geometric", "mean", "min", "last", "product"]
CI_NOTE = ("mean over seeds [95% percentile-bootstrap CI over the per-seed values]; "
           "n = number of seeds (runs)")


@dataclass
class Family:
    """One ablation family: its MLflow experiment and the metrics of its table."""

    experiment: str
    title: str
    metrics: list[str]
    what: str = ""
    extra: list[str] = field(default_factory=list)


FAMILIES = [
    Family("ablate_segmentation", "Step segmentation",
           ["auroc", "auroc_within", "step_f1", "bon@2", "bon@8", "weighted@8", "majority@8",
            "pass@1", "wall_seconds"],
           "Which positions the head reads (trained and evaluated with the same rule)."),
    Family("ablate_segmentation_smollm2", "Step segmentation on SmolLM2-135M",
           ["auroc", "auroc_within", "step_f1", "bon@2", "pass@1", "wall_seconds"],
           "A real small LLM whose BPE splits '.\\n\\n', so the reference rule misfires on "
           "every '.'; its chat template with 2 worked examples, two-operation problems; "
           "tiny scale (16 test problems x k=4, 4 head steps; optional spec, "
           "`--with-smollm2`)."),
    Family("ablate_loss", "Loss",
           ["auroc", "auroc_within", "step_f1", "bon@2", "bon@8", "weighted@8", "pass@1",
            "wall_seconds"],
           "spr_reference = pseudo-label filter + class balance + x1.5 positives (the reference)."),
    Family("ablate_representation", "Representation",
           ["auroc", "auroc_within", "step_f1", "bon@2", "bon@8", "weighted@8", "pass@1",
            "wall_seconds"],
           "What the head reads (inputs_confidence / inputs_hidden vs both), then, on the "
           "hidden+confidence head, feature layer and head width with a frozen policy "
           "(head_only) and the backbone gradient scale in joint training (GRPO on LoRA + "
           "SPR head)."),
    Family("ablate_shared_vs_separate", "Shared vs separate PRM",
           ["auroc", "auroc_within", "step_f1", "bon@8", "weighted@8", "pass@1", "params_policy",
            "params_scorer", "wall_seconds"],
           "Joint training of the shared model vs GRPO + a separate frozen-backbone PRM, "
           "equal training rollouts."),
    Family("ablate_ood", "Out of domain",
           ["pass@1", "auroc", "auroc_within", "step_f1", "bon@8", "weighted@8", "majority@8",
            "wall_seconds"],
           "The head trained on arith (2-4 operations), evaluated on the held-out ood "
           "family (5-6 operations) without retraining."),
]


# ------------------------------------------------------------------ data
def load_runs(experiment: str, tracking_uri: str | None = None, children_only: bool = True,
              dedupe: bool = True):
    """Finished child runs of ``experiment`` (empty frame if none / store missing),
    with ``params.variant`` filled, ordered by start time, the latest run per point."""
    import pandas as pd

    from . import tracking
    from .errors import TrackingError

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


def _variants(runs) -> list[str]:
    return list(dict.fromkeys(runs["params.variant"].astype(str))) if len(runs) else []


def stat(runs, metric: str, variant: str | None = None) -> dict | None:
    """{mean, lo, hi, n} of a summary metric over the runs (of one variant)."""
    from .tracking import metric_key

    if len(runs) == 0:
        return None
    sub = runs if variant is None else runs[runs["params.variant"].astype(str) == variant]
    col = f"metrics.{metric_key(metric)}"
    if col not in sub:
        return None
    vals = [float(v) for v in sub[col].dropna() if math.isfinite(float(v))]
    if not vals:
        return None
    from .metrics import bootstrap_ci

    lo, hi = bootstrap_ci(vals, n_boot=2000, seed=0) if len(vals) > 1 else (math.nan, math.nan)
    return {"mean": sum(vals) / len(vals), "lo": lo, "hi": hi, "n": len(vals)}


def fmt(s: dict | None, digits: int = 3) -> str:
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


def md_table(runs, metrics: list[str], variants: list[str] | None = None) -> str:
    variants = variants if variants is not None else _variants(runs)
    head = "| variant | " + " | ".join(metrics) + " | n |\n|---|" + "---|" * (len(metrics) + 1)
    lines = [head]
    for v in variants:
        cells = [fmt(stat(runs, m, v), 0 if m in ("wall_seconds",) else 3) for m in metrics]
        n = max((stat(runs, m, v) or {"n": 0})["n"] for m in metrics)
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)


def _series(runs, prefix: str) -> dict[str, dict[int, list[float]]]:
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


# --------------------------------------------------------------- figures
def _mean_ci(vals):
    import numpy as np

    from .metrics import bootstrap_ci

    lo, hi = bootstrap_ci(vals, n_boot=1000, seed=0) if len(vals) > 1 else (vals[0], vals[0])
    return float(np.mean(vals)), lo, hi


def fig_selectors(runs, title: str):
    from .plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.3))
    for sel, pts in sorted(_series(runs, "acc").items()):
        ks = sorted(pts)
        ms = [_mean_ci(pts[k]) for k in ks]
        style = "--" if sel in ("pass_at_k", "oracle") else "-"
        ax.plot(ks, [m[0] for m in ms], style, marker="o", ms=3, label=sel.replace("_at_", "@"))
        ax.fill_between(ks, [m[1] for m in ms], [m[2] for m in ms], alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("accuracy (held-out)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_aha(base_runs, loss_runs=None):
    """Left: mean trajectory score of correct vs incorrect training rollouts (base
    runs, mean and CI over seeds). Right: held-out AUROC during training, per
    loss variant when the loss ablation exists."""
    from .plots import _plt

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.9))
    curves = _series(base_runs, "curve")
    for key, label, colour in (("score_correct", "correct rollouts", "tab:green"),
                               ("score_incorrect", "incorrect rollouts", "tab:red")):
        pts = curves.get(key, {})
        xs = sorted(pts)
        ms = [_mean_ci(pts[x]) for x in xs]
        a.plot(xs, [m[0] for m in ms], color=colour, label=label)
        a.fill_between(xs, [m[1] for m in ms], [m[2] for m in ms], color=colour, alpha=0.15)
    a.set_xlabel("training step")
    a.set_ylabel("mean trajectory score (geometric)")
    a.set_title("base config: correct vs incorrect rollouts")
    groups = {"base (spr_no_filter)": base_runs}
    if loss_runs is not None and len(loss_runs):
        groups = {v: loss_runs[loss_runs["params.variant"] == v] for v in _variants(loss_runs)}
    for name, runs in groups.items():
        pts = _series(runs, "curve").get("eval_auroc", {})
        xs = sorted(pts)
        if not xs:
            continue
        ms = [_mean_ci(pts[x]) for x in xs]
        b.plot(xs, [m[0] for m in ms], marker="o", ms=3, label=name)
        b.fill_between(xs, [m[1] for m in ms], [m[2] for m in ms], alpha=0.1)
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


def scaling_points(runs, selector: str = "sprm_bon"):
    """Rows (variant, run_id, k, compute, accuracy) of the scaling-law runs."""
    from .tracking import metric_key

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


def fig_scaling(rows, fit):
    import numpy as np

    from .plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.3))
    for v in dict.fromkeys(r["variant"] for r in rows):
        sub = [r for r in rows if r["variant"] == v]
        ks = sorted({r["k"] for r in sub})
        cs = [np.mean([r["compute"] for r in sub if r["k"] == k]) for k in ks]
        ms = [_mean_ci([r["acc"] for r in sub if r["k"] == k]) for k in ks]
        ax.errorbar(cs, [m[0] for m in ms],
                    yerr=[[m[0] - m[1] for m in ms], [m[2] - m[0] for m in ms]],
                    marker="o", ms=4, capsize=2, label=v)
    if fit is not None:
        xs = np.linspace(min(np.log10([r["compute"] for r in rows])),
                         max(np.log10([r["compute"] for r in rows])), 50)
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


# ------------------------------------------------------------------ text
def _p(runs, name: str, default: str = "?") -> str:
    col = f"params.{name}"
    if len(runs) == 0 or col not in runs:
        return default
    vals = sorted({str(v) for v in runs[col].dropna()})
    return ", ".join(vals) if vals else default


def _timing_section(uri: str | None, fam_runs: dict) -> list[str]:
    import pandas as pd

    from .ablation_specs import OPTIONAL_SPECS, PROBE_STEP, SPECS, TIMING_EXPERIMENT

    out = ["## Wall time", ""]
    t = load_runs(TIMING_EXPERIMENT, uri, children_only=False)
    full = t[t["run_name"] == "full"] if len(t) and "run_name" in t else t
    full = full if len(full) else t  # no full run: the latest micro one, labelled
    if len(full):
        r = full.iloc[-1]
        tot = r.get("metrics.total_wall_s")
        out.append(f"Last `make ablations` ({r.get('run_name', '?')}, measured, run "
                   f"{r['run_id'][:8]}): "
                   f"**{tot / 60:.1f} min wall** for the specs it ran, "
                   f"{r.get('metrics.total_cpu_s', float('nan')) / 60:.1f} CPU-min; CPU share "
                   f"{r.get('metrics.cpu_share', float('nan')):.2f} of "
                   f"{_p(full.tail(1), 'cores')} cores (1.0 = the study had the machine to itself; "
                   f"lower = contention from other work); 1-min load average "
                   f"{r.get('metrics.loadavg_start', float('nan')):.1f} at start, "
                   f"{r.get('metrics.loadavg_end', float('nan')):.1f} at the end.")
        out.append("")
        out.append("| spec | points | wall (s) |\n|---|---|---|")
        for s in SPECS + [PROBE_STEP] + OPTIONAL_SPECS:
            w = r.get(f"metrics.wall_s.{s}")
            if w is not None and math.isfinite(w):
                out.append(f"| {s} | {r.get(f'metrics.points.{s}', float('nan')):.0f} | {w:.0f} |")
        # optional specs timed in a separate (partial) run after it
        later = t[(t["run_name"] == "partial") & (t["start_time"] > r["start_time"])] \
            if "run_name" in t and "start_time" in t else t.iloc[0:0]
        extra_s = 0.0
        for s in OPTIONAL_SPECS:
            if pd.notna(r.get(f"metrics.wall_s.{s}", float("nan"))):
                continue
            for _, pr in later.iloc[::-1].iterrows():
                w = pr.get(f"metrics.wall_s.{s}")
                if w is not None and math.isfinite(w):
                    out.append(f"| {s} (optional; separate run {pr['run_id'][:8]}, not in the "
                               f"total above) | {pr.get(f'metrics.points.{s}', float('nan')):.0f} "
                               f"| {w:.0f} |")
                    extra_s += float(w)
                    break
        out.append("")
        if extra_s:
            out += [f"With the optional spec(s) timed separately: **{(tot + extra_s) / 60:.1f} min "
                    f"wall** for the whole set ({tot / 60:.1f} + {extra_s / 60:.1f}).", ""]
    else:
        out += ["No timing run of `make ablations` in this store.", ""]
    rows, total, extra = [], 0.0, 0
    for name, latest in fam_runs.items():
        runs = load_runs(name, uri, dedupe=False)
        if len(runs):
            hits = int((runs["tags.metastone.rollout_cache"] == "hit").sum()) \
                if "tags.metastone.rollout_cache" in runs else 0
            ws = runs["metrics.wall_seconds"].sum() if "metrics.wall_seconds" in runs else 0.0
            total += float(ws)
            extra += len(runs) - len(latest)
            rows.append(f"| {name} | {len(latest)} | {len(runs)} | {hits} | {ws:.0f} |")
    if rows:
        out += ["All finished runs in the store, per experiment: points reported (the latest run "
                "of each), all finished runs (a point run again, e.g. a re-run or a parallel "
                "sweep, counts twice), rollout-cache hits among them (runs that reused scored "
                "trajectories instead of training and sampling) and the summed notebook wall "
                "time of all runs (excludes kernel start-up and logging, ~20-30 s per point "
                "here).", "",
                "| experiment | points reported | finished runs | cache hits | notebook wall (s) |",
                "|---|---|---|---|---|", *rows, "",
                f"Summed notebook wall time of all finished runs: {total / 60:.1f} min."
                + (f" {extra} runs are repeats of a point, so the `make ablations` time above "
                   f"does not contain all the compute behind this report: points computed by "
                   f"another sweep appear as cache hits in it." if extra else ""), ""]
    return out


def build_report(tracking_uri: str | None = None, out: str | Path = "docs/results.md",
                 fig_dir: str | Path | None = None) -> str:
    """Write the ablation report (markdown + figures) from the MLflow store; return the text."""
    import time as _time

    from . import tracking
    from .io_utils import atomic_write_text

    out = Path(out)
    fig_dir = Path(fig_dir) if fig_dir is not None else out.parent / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or tracking.resolve_tracking_uri()
    names = ["ablate_aggregation", "ablate_scaling_law"] + [f.experiment for f in FAMILIES]
    runs = {n: load_runs(n, uri) for n in names}
    figs: dict[str, str] = {}

    def save(fig, name):
        path = fig_dir / name
        fig.savefig(path, dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        figs[name] = os.path.relpath(path, out.parent)

    L: list[str] = []
    L += ["# Results: ablations of the reflective SPRM at CPU scale", "",
          f"Generated by `metastone-lab report` from the MLflow store `{uri}` on "
          f"{_time.strftime('%Y-%m-%d %H:%M UTC', _time.gmtime())} (code "
          f"{tracking.git_commit() or 'unknown'}). **Do not edit by hand**: `make ablations` "
          f"re-runs the specs `experiments/ablate_*.yaml` and regenerates this file; `make report` "
          f"regenerates it from the existing store.", "",
          f"Every table cell is {CI_NOTE}. All metrics are on held-out problems "
          f"(test split, or the ood family); step-error thresholds are chosen on the "
          f"validation split.", "",
          "Metrics: `auroc` = trajectory AUROC (correct vs incorrect) pooled over all test "
          "problems; `auroc_within` = the same AUROC computed among the k samples of one "
          "problem, averaged over problems with both outcomes (what best-of-N depends on); "
          "`step_f1` = first-wrong-step F1 (ProcessBench style); `bon@k` = SPRM best-of-k "
          "accuracy; `weighted@k` = SPRM-weighted vote; `majority@k`; `pass@k` = unbiased "
          "oracle; `wall_seconds` = the notebook's wall time for the point.", ""]
    base = runs["ablate_aggregation"]
    if len(base):
        L += ["## Setup (read from the runs)", "",
              f"- backbone `{_p(base, 'backbone')}` (the tiny default Llama), policy frozen "
              f"(`train_mode` {_p(base, 'train_mode')}) unless a row says joint;",
              f"- SPRM head trained {_p(base, 'train_steps')} steps on the model's own rollouts, "
              f"loss `{_p(base, 'train.loss')}`, head lr {_p(base, 'train.head_lr')};",
              f"- evaluation: {_p(base, 'n_test')} held-out test problems x k_max "
              f"{_p(base, 'k_max')} samples (T={_p(base, 'temperature')}), accuracy at every "
              f"k <= k_max from that one run (reference grouping); the other families use "
              f"k_max {_p(runs['ablate_loss'], 'k_max')};",
              f"- seeds: {_p(base, 'seed')} (each seed = its own head training and sampling).",
              ""]
    L += _timing_section(uri, runs)

    # ---- aggregation + selectors + aha
    L += ["## Aggregation (one set of runs, every aggregator on the same scored trajectories)",
          ""]
    if len(base):
        ks = [k for k in (2, 8, 32) if stat(base, f"bon@{k}.geometric") is not None]
        mets = (["auroc", "auroc_within"] + [f"bon@{k}" for k in ks] + [f"weighted@{ks[-1]}"]
                if ks else ["auroc", "auroc_within"])
        L.append("| aggregator | " + " | ".join(mets) + " |")
        L.append("|---|" + "---|" * len(mets))
        for agg in AGGREGATORS_ORDER:
            L.append(f"| {agg} | " + " | ".join(fmt(stat(base, f"{m}.{agg}")) for m in mets) + " |")
        L += ["", "Reference points on the same runs: "
              + "; ".join(f"{m} {fmt(stat(base, m))}" for m in
                          ("pass@1", "majority@8", "majority@32", "pass@32")
                          if stat(base, m) is not None) + ".", ""]
        save(fig_selectors(base, "Accuracy vs k per selector (base config, mean over seeds)"),
             "accuracy_vs_k_selectors.png")
        L += [f"![accuracy vs k]({figs['accuracy_vs_k_selectors.png']})", "",
              "Selectors: `sprm_bon` (highest SPRM score), `sprm_weighted_vote`, `majority`, "
              "`last_step`, `random` (= pass@1 in expectation), `oracle`/`pass@k` (upper bound). "
              "Bands: CI over seeds.", ""]
        save(fig_aha(base, runs["ablate_loss"]), "aha_moment.png")
        onset = stat(base, "aha_onset_step")
        L += ["### Aha moment", "",
              f"![aha moment]({figs['aha_moment.png']})", "",
              "Onset = first training evaluation with held-out AUROC >= 0.8 that stays there "
              "for the next evaluation. Base config: "
              + (f"onset at step {fmt(onset, 1)} (over the {onset['n']} seeds that reached it)"
                 if onset else "no seed reached the onset criterion within its training steps")
              + f"; first evaluated AUROC {fmt(stat(base, 'curve.eval_auroc@0'))}.", ""]
    else:
        L += ["Not run (experiment `ablate_aggregation` has no finished runs).", ""]

    # ---- the tabular families
    for fam in FAMILIES:
        r = runs[fam.experiment]
        L += [f"## {fam.title}", "", fam.what, ""]
        if len(r):
            L += [md_table(r, fam.metrics), ""]
        else:
            L += [f"Not run (experiment `{fam.experiment}` has no finished runs).", ""]

    # ---- scaling law
    sr = runs["ablate_scaling_law"]
    L += ["## Scaling law: accuracy vs total thinking compute", "",
          "Compute per problem at effort k: **C = (policy params + scorer params) x generated "
          "tokens per trajectory x k**. Policy params = backbone + LoRA adapters (the adapters "
          "start at zero and only change in joint runs); "
          "scorer = the SPRM head (for a separate PRM: its backbone + head). Generated tokens "
          "= the mean response length of that run's trajectories (prompt/prefill tokens not "
          "counted; the head runs only at step positions but is counted at every token, an "
          "upper bound). Accuracy = SPRM best-of-k. Fit: acc = a + b log10 C by least squares "
          "over all (size, k, seed) points; CIs by resampling runs.", ""]
    fit = None
    if len(sr):
        rows = scaling_points(sr)
        fit = fit_loglinear(rows)
        L += [md_table(sr, ["params_policy", "params_scorer", "gen_tokens_mean", "pass@1",
                            "bon@2", "bon@8", "bon@32", "pass@32", "compute@32"]), ""]
        if fit is not None:
            L += [f"Fit over {fit['n_points']} points from {fit['n_runs']} runs: "
                  f"**b = {fit['b']:.4f} [{fit['b_lo']:.4f}, {fit['b_hi']:.4f}] accuracy per "
                  f"10x compute**, a = {fit['a']:.3f} [{fit['a_lo']:.3f}, {fit['a_hi']:.3f}], "
                  f"R^2 = {fit['r2']:.2f}.", ""]
            L += ["Within each size (compute grows only through k): " + "; ".join(
                f"{v}: " + versus("k=1", stat(sr, "acc.sprm_bon@1", v), "k=32",
                                  stat(sr, "acc.sprm_bon@32", v)) for v in _variants(sr)) + ".",
                  ""]
            L += ["The same fit with other selectors on the same runs and compute (a selector "
                  "changes accuracy, not compute):", "",
                  "| selector | slope b per 10x compute [CI] | a [CI] | R^2 | points |",
                  "|---|---|---|---|---|"]
            for sel in ("sprm_bon", "sprm_weighted_vote", "majority", "random", "pass@k"):
                f2 = fit_loglinear(scaling_points(sr, sel))
                if f2 is not None:
                    L.append(f"| {sel} | {f2['b']:.4f} [{f2['b_lo']:.4f}, {f2['b_hi']:.4f}] | "
                             f"{f2['a']:.3f} [{f2['a_lo']:.3f}, {f2['a_hi']:.3f}] | "
                             f"{f2['r2']:.2f} | {f2['n_points']} |")
            L.append("")
        save(fig_scaling(rows, fit), "scaling_law.png")
        L += [f"![scaling law]({figs['scaling_law.png']})", ""]
    else:
        L += ["Not run (experiment `ablate_scaling_law` has no finished runs).", ""]

    probe_lines, probe = probe_section(uri)
    L += probe_lines
    L += discussion(runs, fit, probe)
    text = "\n".join(L) + "\n"
    atomic_write_text(out, text)
    return text


def load_probe(uri: str | None) -> dict | None:
    """The latest finished ``metastone-lab probe`` run as {"rows": [...], "attrs": {...},
    "run_id", "params"}, rebuilt from its flat metrics; None when the store has none."""
    from .probe import COLUMNS, PROBE_EXPERIMENT

    t = load_runs(PROBE_EXPERIMENT, uri, children_only=False, dedupe=False)
    if not len(t):
        return None
    r = t.iloc[-1]
    rows: dict[tuple[str, str], dict] = {}
    attrs = {}
    for col, v in r.items():
        if not str(col).startswith("metrics.") or v is None or v != v:
            continue
        parts = str(col)[len("metrics."):].split(".")
        if len(parts) == 3 and parts[2] in COLUMNS:
            rows.setdefault((parts[0], parts[1]), {"feature": parts[0], "labels": parts[1]})[
                parts[2]] = float(v)
        elif len(parts) == 1:
            attrs[parts[0]] = float(v)
    params = {str(c)[len("params."):]: v for c, v in r.items() if str(c).startswith("params.")}
    def order(row):  # embeddings, layer_1..N, then the log-prob baseline
        f = row["feature"]
        depth = 0 if f == "embeddings" else int(f[6:]) if re.fullmatch(r"layer_\d+", f) \
            else 10 ** 6
        return depth, row["labels"]

    return {"rows": sorted(rows.values(), key=order), "attrs": attrs, "run_id": r["run_id"],
            "params": params}


def _probe_ci(row: dict, key: str, lo: str, hi: str) -> str:
    v = row.get(key)
    if v is None:
        return "n/a"
    if row.get(lo) is None or row.get(hi) is None:
        return f"{v:.3f}"
    return f"{v:.3f} [{row[lo]:.3f}, {row[hi]:.3f}]"


def probe_section(uri: str | None) -> tuple[list[str], dict | None]:
    """The representation-probe table (markdown lines) and the parsed run."""
    pr = load_probe(uri)
    L = ["## Representation probe: what the step-position features encode", "",
         "Can *any* head on these features rank a problem's samples? `metastone-lab probe` "
         "samples k trajectories per problem from the frozen policy, reads every hidden layer "
         "at the reference step positions, and fits a logistic-regression probe per layer on "
         "train-split rollouts, with the **oracle step labels** (correct = before the task's "
         "first wrong step, which no self-supervised head sees) or with the outcome label on "
         "every step (what the SPR loss sees). Held-out test trajectories are scored by the "
         "geometric mean of the probe's step probabilities. `policy_logprob` ranks the same "
         "samples by the policy's own mean token log-prob (no training). Within-problem AUROC "
         "and best-of-k carry 95 % bootstrap CIs over test problems (one probe run).", ""]
    if pr is None:
        return L + ["Not run (experiment `probe` has no finished runs; `metastone-lab probe`).",
                    ""], None
    a, p = pr["attrs"], pr["params"]
    L += [f"Run {pr['run_id'][:8]}: backbone `{p.get('backbone', '?')}`, "
          f"{p.get('n_train', '?')} train / {a.get('n_test_problems', float('nan')):.0f} test "
          f"problems x k={a.get('k', float('nan')):.0f} (T={p.get('temperature', '?')}), "
          f"{a.get('n_train_steps', float('nan')):.0f} train steps / "
          f"{a.get('n_test_steps', float('nan')):.0f} test steps; test pass@1 "
          f"{a.get('pass_at_1', float('nan')):.3f}, pass@k {a.get('pass_at_k', float('nan')):.3f}; "
          f"{a.get('seconds', float('nan')):.0f} s.", "",
          "| feature | labels | step AUROC | trajectory AUROC (pooled) | within-problem AUROC "
          "| best-of-k |", "|---|---|---|---|---|---|"]
    for row in pr["rows"]:
        step = row.get("step_auroc")
        traj = row.get("traj_auroc")
        L.append(f"| {row['feature']} | {row['labels']} | "
                 f"{'n/a' if step is None else f'{step:.3f}'} | "
                 f"{'n/a' if traj is None else f'{traj:.3f}'} | "
                 f"{_probe_ci(row, 'within_auroc', 'within_lo', 'within_hi')} | "
                 f"{_probe_ci(row, 'bon_at_k', 'bon_lo', 'bon_hi')} |")
    return L + [""], pr


def _probe_bullet(pr: dict, base) -> str | None:
    rows = [r for r in pr["rows"] if r.get("within_auroc") is not None]
    oracle = [r for r in rows if r["labels"] == "oracle_step"]
    lp = next((r for r in rows if r["feature"] == "policy_logprob"), None)
    if not oracle or lp is None:
        return None
    nan = float("nan")

    def ci(r):
        return {"mean": r["within_auroc"], "lo": r.get("within_lo", nan),
                "hi": r.get("within_hi", nan), "n": 1}

    hidden = [r for r in oracle if "confidence" not in r["feature"]]
    conf = [r for r in oracle if "confidence" in r["feature"]]
    lpw = ci(lp)
    k = pr["attrs"].get("k", float("nan"))
    text = "**What the step-position features encode (representation probe)**: "
    if hidden:
        bh = max(hidden, key=lambda r: r["within_auroc"])
        text += (f"the best oracle-label probe on a hidden state ({bh['feature']}) ranks a "
                 f"problem's samples at within-problem AUROC {fmt(ci(bh))}, best-of-{k:.0f} "
                 f"{_probe_ci(bh, 'bon_at_k', 'bon_lo', 'bon_hi')}; ")
    if conf:
        bc = max(conf, key=lambda r: r["within_auroc"])
        text += (f"on the policy-confidence features ({bc['feature']}) {fmt(ci(bc))}, "
                 f"best-of-{k:.0f} {_probe_ci(bc, 'bon_at_k', 'bon_lo', 'bon_hi')}; ")
    text += (f"the policy's own mean token log-prob {fmt(lpw)}, best-of-k "
             f"{_probe_ci(lp, 'bon_at_k', 'bon_lo', 'bon_hi')} "
             f"(pass@1 {pr['attrs'].get('pass_at_1', float('nan')):.3f}). ")
    if hidden and ci(bh)["hi"] < lpw["lo"]:  # False when a CI is missing (nan)
        text += ("The hidden states at the step positions do not expose which of a problem's "
                 "samples are right, not even to a probe trained with the true step labels; the "
                 "policy's confidence in the step's tokens does, which is why the default head "
                 "reads it (`head_inputs: confidence`, a named deviation).")
    else:
        text += "The hidden-state features are not clearly worse than the policy's log-prob."
    sprm = stat(base, "auroc_within.geometric") if len(base) else None
    if sprm is not None:
        text += f" The trained SPRM head: {fmt(sprm)}."
    return text


def discussion(runs: dict, fit: dict | None, probe: dict | None = None) -> list[str]:
    """The discussion, every number read from the runs (comparisons with the paper's
    reported numbers, which are constants of the paper, are labelled as such)."""
    L = ["## Discussion (generated from the numbers above)", ""]
    base, loss = runs["ablate_aggregation"], runs["ablate_loss"]
    seg, rep = runs["ablate_segmentation"], runs["ablate_representation"]
    sep, ood = runs["ablate_shared_vs_separate"], runs["ablate_ood"]

    def bullet(s):
        L.append(f"- {s}")

    if len(base):
        k = 8 if stat(base, "bon@8.geometric") else 2
        g, m, p = (stat(base, f"bon@{k}.{a}") for a in ("geometric", "mean", "product"))
        order = sorted([("geometric", g), ("mean", m), ("product", p)],
                       key=lambda t: -(t[1]["mean"] if t[1] else -1))
        paper = ["geometric", "mean", "product"]
        bullet(f"**Aggregation** (paper, AIME24 k=8: geometric 53.1 > mean 52.9 > product 44.2). "
               f"Here at k={k}: order {' > '.join(n for n, _ in order)} "
               f"({'same order as the paper' if [n for n, _ in order] == paper else 'not the paper order'}); "
               + versus("geometric", g, "mean", m) + "; " + versus("geometric", g, "product", p)
               + ".")
        la = stat(base, f"bon@{k}.last")
        bullet("**Step-level vs last-step scoring** (paper 53.1 vs 48.5): "
               + versus("geometric (all steps)", g, "last step", la) + ".")
        pooled, within = stat(base, "auroc.geometric"), stat(base, "auroc_within.geometric")
        if within is not None:
            bullet("**Pooled vs within-problem ranking**: trajectory AUROC pooled over problems "
                   f"{fmt(pooled)}, but among the samples of one problem {fmt(within)} "
                   f"(0.5 = chance). "
                   + ("The head mostly recognises which problems are easy, not which of a "
                      "problem's samples is right, so best-of-N cannot exploit it. "
                      if within["mean"] < 0.6 <= (pooled or within)["mean"] else "")
                   + f"pass@1 {fmt(stat(base, 'pass@1'))} vs SPRM bon@8 "
                     f"{fmt(stat(base, 'bon@8'))}.")
        bon, maj, pk = stat(base, "bon@32"), stat(base, "majority@32"), stat(base, "pass@32")
        if bon is not None:
            bullet("**Best-of-N vs majority at k=32**: " + versus("SPRM BoN", bon, "majority", maj)
                   + "; " + versus("SPRM BoN", bon, "random pick", stat(base, "acc.random@32"))
                   + "; " + versus("SPRM-weighted vote", stat(base, "weighted@32"), "majority",
                                   maj)
                   + f"; pass@32 (oracle) {fmt(pk)}, pass@1 {fmt(stat(base, 'pass@1'))}.")
    if len(loss):
        s, nf, bce = (stat(loss, "auroc", v) for v in ("spr_reference", "spr_no_filter",
                                                       "bce_all_steps"))
        bullet("**SPR vs plain BCE** (the paper reports SPR > BCE, no numbers): "
               + versus("SPR (reference)", s, "BCE on all steps", bce) + " (trajectory AUROC).")
        collapsed = s is not None and s["mean"] < 0.6
        warm = [v for v in _variants(loss) if re.fullmatch(r"spr_filter_warmup_\d+", v)]
        bullet("**The pseudo-label filter** at this scale: "
               + versus("SPR with filter", s, "SPR without filter", nf) + ". "
               + ("The reference SPR head stays near chance here (mean AUROC below 0.6). A likely "
                  "mechanism: starting from a random head, the filter keeps only the steps the "
                  "head already agrees with, so the loss can fall to zero without learning. "
                  if collapsed else
                  "The reference SPR head learns on some seeds and not on others (mean AUROC at "
                  "least 0.6, but its CI over seeds reaches below 0.6): the filter from a cold "
                  "start is fragile. "
                  if s is not None and s["lo"] < 0.6 else
                  "The reference SPR head learns at this scale (mean AUROC at least 0.6). ")
               + "; ".join(versus(f"SPR with {v.rsplit('_', 1)[1]} filter-free warm-up steps",
                                  stat(loss, "auroc", v), "SPR (reference)", s) for v in warm)
               + ".")
        ls = stat(loss, "auroc", "last_step_only")
        bullet("**Outcome RM (last step only)**: " + versus("last_step_only", ls,
                                                            "spr_no_filter", nf) + " (AUROC).")
    if len(seg):
        vals = [(v, stat(seg, "auroc", v)) for v in _variants(seg)]
        vals = [(v, s) for v, s in vals if s is not None]
        if vals:
            best = max(vals, key=lambda t: t[1]["mean"])
            worst = min(vals, key=lambda t: t[1]["mean"])
            ref = dict(vals).get("reference")
            ref_vals = {m: stat(seg, m, "reference") for m in ("auroc", "step_f1", "bon@8")}
            same = [v for v, _ in vals if v != "reference" and ref_vals["auroc"] is not None
                    and all(stat(seg, m, v) is not None and ref_vals[m] is not None
                            and stat(seg, m, v)["mean"] == ref_vals[m]["mean"] for m in ref_vals)]
            if same:
                bullet(f"**Segmentation rules that coincide**: {', '.join(same)} give exactly the "
                       f"reference's AUROC, step F1 and bon@8 (identical numbers: on this "
                       f"tokenizer, where '.\\n\\n' is one token, the rules mark the same steps, "
                       f"and a confidence step spans through its step token whichever side of it "
                       f"the step is read).")
            bullet(f"**Segmentation** (not ablated in the paper): best AUROC {best[0]} "
                   f"{fmt(best[1])}, worst {worst[0]} {fmt(worst[1])}; reference {fmt(ref)}. "
                   + versus("reference", ref, "reference read at the step token",
                            dict(vals).get("reference_at_step_token")) + ".")
    sm = runs.get("ablate_segmentation_smollm2")
    p1 = stat(sm, "pass@1") if sm is not None and len(sm) else None
    if p1 is not None and p1["mean"] == 0:
        bullet(f"**Segmentation on SmolLM2-135M**: every sampled trajectory is wrong (pass@1 "
               f"{fmt(p1)} over {_p(sm, 'n_test')} test problems), so AUROC is undefined and "
               f"this spec says nothing about segmentation yet: SmolLM2 does not follow the "
               f"raw arith prompt (it needs a prompt format it follows).")
    elif sm is not None and len(sm):
        bullet("**Segmentation on SmolLM2-135M** (where '.\\n\\n' is not one token): "
               + versus("reference", stat(sm, "auroc", "reference"), "paragraph",
                        stat(sm, "auroc", "paragraph"))
               + f" (AUROC; pass@1 {fmt(stat(sm, 'pass@1'))}, "
                 f"{_p(sm, 'n_test')} test problems, so CIs are wide)."
               + (" Both CIs include 0.5 (chance): the head did not learn at this scale, so "
                  "the spec shows the pipeline runs on a real LLM with a misfiring rule but "
                  "does not separate the rules." if all(
                      a is not None and a["lo"] <= 0.5 <= a["hi"]
                      for a in (stat(sm, "auroc", "reference"), stat(sm, "auroc", "paragraph")))
                  else ""))
    if len(rep):
        pen, last, mid = (stat(rep, "auroc", v) for v in ("layer_penultimate_width_x1",
                                                          "layer_last", "layer_middle"))
        conf = stat(rep, "auroc_within", "inputs_confidence")
        hid = stat(rep, "auroc_within", "inputs_hidden")
        if conf is not None or hid is not None:
            both = stat(rep, "auroc_within", "layer_penultimate_width_x1")
            bullet("**What the head reads** (within-problem AUROC; the reference reads the "
                   "hidden state only): " + versus("confidence only", conf, "hidden only", hid)
                   + "; " + versus("hidden+confidence", both, "confidence only", conf)
                   + f"; bon@8 confidence only {fmt(stat(rep, 'bon@8', 'inputs_confidence'))}, "
                     f"hidden only {fmt(stat(rep, 'bon@8', 'inputs_hidden'))}, both "
                     f"{fmt(stat(rep, 'bon@8', 'layer_penultimate_width_x1'))}.")
        bullet("**Feature layer** (the paper argues for the penultimate layer): "
               + versus("penultimate", pen, "last", last) + "; "
               + versus("penultimate", pen, "middle", mid) + ".")
        g0, g4, g1 = (stat(rep, "auroc", v) for v in ("joint_grad_0", "joint_grad_1e-4",
                                                      "joint_grad_1"))
        bullet("**Backbone gradient scale** (joint training): "
               + versus("1e-4 (reference)", g4, "0", g0) + "; " + versus("1e-4", g4, "1", g1)
               + f"; pass@1 under grad 1: {fmt(stat(rep, 'pass@1', 'joint_grad_1'))} vs 1e-4: "
                 f"{fmt(stat(rep, 'pass@1', 'joint_grad_1e-4'))}.")
    if len(sep):
        sh, sp = stat(sep, "auroc", "shared"), stat(sep, "auroc", "separate_prm")
        pp, ps = stat(sep, "params_scorer", "shared"), stat(sep, "params_scorer", "separate_prm")
        bullet("**Shared vs separate PRM** (paper: the shared 53M-parameter head matches a 72B "
               "PRM): " + versus("shared head", sh, "separate PRM", sp)
               + f" (AUROC); scorer parameters {fmt(pp, 0)} vs {fmt(ps, 0)}; bon@8 "
                 f"{fmt(stat(sep, 'bon@8', 'shared'))} vs {fmt(stat(sep, 'bon@8', 'separate_prm'))}.")
    if fit is not None:
        pos = fit["b_lo"] > 0
        bullet(f"**Scaling law** (paper v1: performance grows log-linearly with total thinking "
               f"compute): slope {fit['b']:.4f} [{fit['b_lo']:.4f}, {fit['b_hi']:.4f}] per 10x "
               f"compute, R^2 {fit['r2']:.2f}: "
               + ("positive with a CI excluding 0, consistent with the claim at this scale"
                  if pos else "the CI includes 0 or is negative, so not supported at this scale")
               + ".")
    if len(ood):
        bullet("**Out of domain** (paper: math -> code transfer): "
               + versus("in-domain AUROC", stat(ood, "auroc", "in_domain"), "ood AUROC",
                        stat(ood, "auroc", "ood"))
               + f"; pass@1 {fmt(stat(ood, 'pass@1', 'in_domain'))} -> "
                 f"{fmt(stat(ood, 'pass@1', 'ood'))}; bon@8 "
                 f"{fmt(stat(ood, 'bon@8', 'in_domain'))} -> {fmt(stat(ood, 'bon@8', 'ood'))}.")
    if probe is not None:
        b = _probe_bullet(probe, base)
        if b:
            bullet(b)
    missing = [n for n, r in runs.items() if len(r) == 0]
    L += ["", "### Limits", "",
          f"- CPU scale: a {fmt(stat(base, 'params_policy'), 0)}-parameter policy, a head "
          f"trained {_p(base, 'train_steps')} steps, {_p(base, 'n_test')} test problems, seeds "
          f"{_p(base, 'seed')}. CIs over so few seeds are wide; 'CIs overlap' means the "
          "difference is not resolved at this n.",
          "- Numbers from the paper are quoted constants for orientation, not reproduced "
          "measurements."]
    if missing:
        L.append(f"- Not in this store (not run or no finished runs): {', '.join(missing)}.")
    return L


def cli_main(argv: list[str] | None = None) -> int:
    """``metastone-lab report``: regenerate docs/results.md and docs/figures/ from MLflow."""
    import argparse

    from . import cli_help

    ap = cli_help.parser("metastone-lab report",
                         "Regenerate docs/results.md and docs/figures/ from the MLflow store.")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow URI (default: $MLFLOW_TRACKING_URI or the repo's sqlite store)")
    ap.add_argument("--out", default=None, help="markdown file (default: docs/results.md)")
    ap.add_argument("--figures", default=None, help="figure folder (default: <out dir>/figures)")
    a = ap.parse_args(argv)
    from .ablation_specs import repo_root

    out = Path(a.out) if a.out else repo_root() / "docs" / "results.md"
    build_report(a.tracking_uri, out, a.figures)
    print(f"wrote {out} and figures in {Path(a.figures) if a.figures else out.parent / 'figures'}")
    return 0
