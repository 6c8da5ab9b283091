"""The declared comparisons of a family, measured: each side's numbers, the CI of
the difference and the verdict, as one sentence of prose.

Nothing here knows a variant label: the sides, the direction the paper claims and
the notes come from the spec's ``report:`` section (:mod:`metastone_lab.report_spec`).
The verdict follows from the 95% CI of ``a - b`` (paired by seed when both sides
have the same seeds, else an unpaired bootstrap)::

    expect higher: CI > 0 supported | CI < 0 not supported | CI contains 0 inconclusive
    expect equal:  CI contains 0 supported (consistent) | else not supported
    expect none:   CI > 0 higher | CI < 0 lower | CI contains 0 inconclusive

A side whose variant has no runs, or whose metric has no finite value, is
reported as not measured, with the reason (never a silent gap).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..report_spec import Comparison, ReportSpec, Side
from .stats import fmt, summarise, values_by_run, variants

SYMBOL = {"higher": ">", "lower": "<", "equal": "="}


@dataclass
class Measure:
    """One side, measured: its label, statistics and per-seed values (or a constant)."""

    label: str
    stat: dict | None = None
    pairs: list[tuple[str, float]] = field(default_factory=list)
    constant: float | None = None
    missing: str | None = None          # why it is not measured


@dataclass
class Outcome:
    """A comparison, measured: both sides, the difference a - b and its verdict."""

    family: str
    comparison: Comparison
    a: Measure
    b: Measure
    diff: dict | None = None            # {mean, lo, hi, n, how}
    verdict: str = "not_measured"       # one of report_spec.VERDICTS
    phrase: str = ""                    # the verdict in words, with the CI

    @property
    def title(self) -> str:
        return self.comparison.title


def measure(fam: ReportSpec, comp: Comparison, side: Side, runs, experiment: str) -> Measure:
    """A side's numbers from the family's runs, or the reason they are missing."""
    metric = fam.metric_of(comp, side)
    variant = fam.variant_of(side)
    if side.value is not None:
        label = side.label or f"{side.value:g}"
        return Measure(label, {"mean": side.value, "lo": side.value, "hi": side.value, "n": 0},
                       constant=side.value)
    label = side.label or (variant if side.variant else metric)
    if len(runs) == 0:
        return Measure(label, missing=f"experiment {experiment!r} has no finished runs")
    present = variants(runs)
    if variant not in present:
        return Measure(label, missing=(
            f"variant {variant!r} has no runs in experiment {experiment!r} (its runs are "
            f"{', '.join(present)}; was a variant renamed after these runs?)"))
    pairs = values_by_run(runs, metric, variant)
    if not pairs:
        n = int((runs["params.variant"].astype(str) == variant).sum())
        return Measure(label, missing=(f"metric {metric!r} has no finite value in the {n} "
                                       f"run(s) of variant {variant!r}"))
    return Measure(label, summarise([v for _, v in pairs]), pairs)


def _unpaired(va: list[float], vb: list[float], n_boot: int = 2000, seed: int = 0) -> dict:
    import numpy as np

    d = float(np.mean(va) - np.mean(vb))
    if len(va) < 2 or len(vb) < 2:
        return {"mean": d, "lo": math.nan, "hi": math.nan, "n": min(len(va), len(vb))}
    rng = np.random.default_rng(seed)
    a, b = np.asarray(va), np.asarray(vb)
    boots = [rng.choice(a, len(a)).mean() - rng.choice(b, len(b)).mean() for _ in range(n_boot)]
    return {"mean": d, "lo": float(np.percentile(boots, 2.5)),
            "hi": float(np.percentile(boots, 97.5)), "n": min(len(va), len(vb))}


def difference(a: Measure, b: Measure) -> dict | None:
    """Mean and 95% CI of ``a - b`` and how it was computed (None if a side is missing)."""
    if a.missing or b.missing:
        return None
    if a.constant is not None and b.constant is not None:
        d = a.constant - b.constant
        return {"mean": d, "lo": d, "hi": d, "n": 0, "how": "constants"}
    if a.constant is not None or b.constant is not None:
        side, c, sign = (a, b.constant, 1.0) if b.constant is not None else (b, a.constant, -1.0)
        s = summarise([sign * (v - c) for _, v in side.pairs])
        return {**s, "how": "over seeds"}
    da, db = dict(a.pairs), dict(b.pairs)
    unique = len(da) == len(a.pairs) and len(db) == len(b.pairs)
    if unique and set(da) == set(db) and len(da) > 1:
        s = summarise([da[k] - db[k] for k in sorted(da)])
        return {**s, "how": "paired by seed"}
    return {**_unpaired([v for _, v in a.pairs], [v for _, v in b.pairs]), "how": "unpaired"}


def num(x: float) -> str:
    """A difference for prose: signed, 3 decimals (thousands without decimals)."""
    return f"{x:+,.0f}" if abs(x) >= 1000 else f"{x:+.3f}"


def decide(lo: float, hi: float, expect: str, name_a: str = "a", name_b: str = "b"
           ) -> tuple[str, str]:
    """(verdict, phrase) from the CI ``[lo, hi]`` of ``a - b`` and the claimed direction."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive", "inconclusive (no CI: fewer than 2 runs on a side)"
    ci = f"CI [{num(lo)}, {num(hi)}]"
    sign = "higher" if lo > 0 else "lower" if hi < 0 else None
    if expect in ("higher", "lower"):
        if sign is None:
            return "inconclusive", f"inconclusive ({ci} contains 0)"
        if sign == expect:
            return "supported", f"supported ({ci} excludes 0)"
        return "not_supported", f"not supported: {name_a} is {sign} ({ci} excludes 0)"
    if expect == "equal":
        if sign is None:
            return "supported", (f"consistent with no difference ({ci} contains 0; not a "
                                 f"proof of equality at this n)")
        return "not_supported", f"not supported: {name_a} is {sign} ({ci} excludes 0)"
    if sign is None:
        return "inconclusive", f"no difference resolved ({ci} contains 0)"
    return sign, f"{name_a} {sign} than {name_b} ({ci} excludes 0)"


def evaluate(fam: ReportSpec, comp: Comparison, runs, experiment: str) -> Outcome:
    """Measure one declared comparison on the family's runs."""
    a = measure(fam, comp, comp.a, runs, experiment)
    b = measure(fam, comp, comp.b, runs, experiment)
    out = Outcome(fam.title, comp, a, b, difference(a, b))
    if out.diff is None:
        why = "; ".join(m.missing for m in (a, b) if m.missing)
        out.phrase = f"not measured: {why}"
        return out
    out.verdict, out.phrase = decide(out.diff["lo"], out.diff["hi"], comp.expect,
                                     a.label, b.label)
    return out


def evaluate_family(fam: ReportSpec, runs, experiment: str) -> list[Outcome]:
    """Every declared comparison of a family, in declaration order."""
    return [evaluate(fam, c, runs, experiment) for c in fam.comparisons]


def claim_text(o: Outcome) -> str:
    """What the paper claims for the comparison ('' when it makes no claim)."""
    c = o.comparison
    parts = [c.paper.text()] if c.paper is not None else []
    if c.expect != "none":
        parts.append(f"claims {o.a.label} {SYMBOL[c.expect]} {o.b.label}")
    return "; ".join(parts)


def _show(m: Measure) -> str:
    return f"{m.constant:g}" if m.constant is not None else fmt(m.stat)


def sentence(o: Outcome) -> str:
    """The comparison as one markdown bullet's text."""
    claim = claim_text(o)
    head = f"**{o.title}**" + (f" ({claim})" if claim else "")
    note = o.comparison.notes.get(o.verdict, "")
    if o.diff is None:
        return f"{head}: {o.phrase}." + (f" {note}" if note else "")
    d = o.diff
    diff = f"{o.a.label} - {o.b.label} = {num(d['mean'])}"
    return (f"{head}: {o.a.label} {_show(o.a)} vs {o.b.label} {_show(o.b)}; {diff} "
            f"({d['how']}, n={d['n']}): {o.phrase}." + (f" {note}" if note else ""))


def summary_row(o: Outcome) -> str:
    """One row of the discussion's table of every declared comparison."""
    exp = (f"{o.a.label} {SYMBOL[o.comparison.expect]} {o.b.label}"
           if o.comparison.expect != "none" else "no claim")
    if o.diff is None:
        diff = "not measured"
    elif math.isfinite(o.diff["lo"]):
        diff = f"{num(o.diff['mean'])} [{num(o.diff['lo'])}, {num(o.diff['hi'])}]"
    else:
        diff = f"{num(o.diff['mean'])} (no CI)"
    return f"| {o.family} | {o.title} | {exp} | {diff} | {o.verdict.replace('_', ' ')} |"


SUMMARY_HEAD = ["| family | comparison | the paper claims | a - b [95% CI] | verdict |",
                "|---|---|---|---|---|"]
