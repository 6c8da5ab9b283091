"""How long the study took, read back from the store: the timing runs that
``make ablations`` logs (experiment ``ablations``) and every finished run's wall time."""
from __future__ import annotations

import math

from ..ablation_specs import OPTIONAL_SPECS, PROBE_STEP, SPECS, TIMING_EXPERIMENT
from .stats import load_runs, param


def timing_section(uri: str | None, fam_runs: dict) -> list[str]:
    """The wall-time section: the last full ``make ablations`` timing run (optional
    specs timed later listed apart) and the finished runs per experiment.
    ``fam_runs``: {experiment: its latest runs per point}."""
    import pandas as pd

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
                   f"{param(full.tail(1), 'cores')} cores (1.0 = the study had the machine to itself; "
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
