"""What an ablation spec means: the typed ``report:`` section of ``experiments/ablate_*.yaml``.

The report (:mod:`metastone_lab.report`) knows no variant label, no paper number
and no interpretation: each spec declares them here, and they are validated
when the spec loads (``runner.Spec``), before anything runs::

    report:
      title: Loss                       # the section's heading
      about: "spr_reference = ..."      # the paragraph under it
      reference: spr_reference          # a variant some point declares
      metric: auroc                     # default metric of the comparisons
      table: [auroc, bon@8, pass@1]     # the table's columns (default: summary_keys)
      paper: "Table 3"                  # the paper's figure/table of this family, if any
      comparisons:
        - title: SPR vs plain BCE
          a: spr_reference              # a variant (metric: the comparison's) ...
          b: {variant: bce_all_steps, label: BCE on all steps}
          expect: higher                # what the paper claims for a vs b
          paper: {where: "Sec. 4.2, no numbers"}
        - title: Above chance
          a: spr_reference
          b: {value: 0.5, label: chance}  # ... or a constant
          expect: higher
          notes: {inconclusive: "The head does not learn on every seed."}

``expect``: ``higher`` / ``lower`` (the paper claims a > b / a < b), ``equal``
(the paper claims they match) or ``none`` (the paper makes no claim: exploratory).
``notes``: a sentence per measured verdict (``supported``, ``not_supported``,
``inconclusive``, ``higher``, ``lower``, ``not_measured``), so interpretation
lives in the spec and is chosen by the numbers.

``layout``: ``table`` (one row per variant), ``aggregators`` (one set of runs,
one row per aggregator in ``rows``; metrics ``<metric>.<aggregator>``; ``baselines``:
other metrics of the same runs, listed under the table) or
``scaling`` (accuracy vs compute, with the log-linear ``fit`` claim).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from .config import check, from_dict
from .errors import ConfigError

Expect = Literal["higher", "lower", "equal", "none"]
#: the verdicts a comparison can have (keys of ``notes``)
VERDICTS = ("supported", "not_supported", "inconclusive", "higher", "lower", "not_measured")


@dataclass
class PaperRef:
    """Where the paper makes the claim, and its numbers for the two sides if it gives any."""

    where: str
    a: float | None = None
    b: float | None = None

    def text(self) -> str:
        nums = (f": {self.a:g} vs {self.b:g}" if self.a is not None and self.b is not None
                else "")
        return f"paper, {self.where}{nums}"


@dataclass
class Side:
    """One side of a comparison: a metric over one variant's runs, or a constant."""

    variant: str | None = None    # default: the family's reference (ignored with value)
    metric: str | None = None     # default: the comparison's, then the family's metric
    value: float | None = None    # a constant (e.g. chance, 0.5) instead of runs
    label: str | None = None      # the name in the prose (default: variant or metric)

    def __post_init__(self) -> None:
        check(not (self.value is not None and (self.variant or self.metric)),
              f"a comparison side has value {self.value!r} and also variant/metric "
              f"{self.variant or self.metric!r}; a side is either a constant (value) or a "
              f"metric of a variant's runs: remove one")


def _side(raw: Any, where: str) -> Side:
    if isinstance(raw, Side):
        return raw
    if isinstance(raw, str):
        return Side(variant=raw)
    if isinstance(raw, Mapping):
        return from_dict(Side, raw, where=where)
    raise ConfigError(f"{where}: expected a variant name or a mapping (variant, metric, "
                      f"value, label), got {type(raw).__name__} {raw!r}")


@dataclass
class Comparison:
    """A claim the family tests: side ``a`` against side ``b``."""

    title: str
    a: Any
    b: Any
    metric: str | None = None
    expect: Expect = "none"
    paper: PaperRef | None = None
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.a = _side(self.a, f"comparison {self.title!r}.a")
        self.b = _side(self.b, f"comparison {self.title!r}.b")
        bad = sorted(set(self.notes) - set(VERDICTS))
        check(not bad, f"comparison {self.title!r}: notes {bad} are not verdicts; use "
                       f"{', '.join(VERDICTS)}")


@dataclass
class FitClaim:
    """The scaling layout's claim: the slope of acc = a + b log10(compute)."""

    selector: str = "sprm_bon"
    expect: Literal["higher", "lower", "none"] = "higher"   # the slope vs 0
    paper: PaperRef | None = None
    selectors: list[str] = field(default_factory=list)      # the same fit, other selectors


@dataclass
class ReportSpec:
    """The ``report:`` section of one ablation spec (see the module docstring)."""

    title: str
    about: str = ""
    layout: Literal["table", "aggregators", "scaling"] = "table"
    reference: str | None = None
    metric: str = "auroc"
    table: list[str] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)   # other metrics of the same runs
    paper: str = ""
    comparisons: list[Comparison] = field(default_factory=list)
    fit: FitClaim | None = None
    training_curves: bool = False    # its held-out AUROC curves go in the aha figure

    def __post_init__(self) -> None:
        check(self.layout != "aggregators" or bool(self.rows),
              f"report {self.title!r}: layout aggregators needs rows: [the aggregators]")
        check(self.fit is None or self.layout == "scaling",
              f"report {self.title!r}: fit is the scaling layout's claim; set layout: scaling "
              f"or remove fit")
        titles = [c.title for c in self.comparisons]
        dup = sorted({t for t in titles if titles.count(t) > 1})
        check(not dup, f"report {self.title!r}: comparison titles {dup} repeat; make them unique")

    # ---------------------------------------------------------------- binding
    def metric_of(self, comp: Comparison, side: Side) -> str:
        """The metric a side reads: its own, else the comparison's, else the family's."""
        return side.metric or comp.metric or self.metric

    def variant_of(self, side: Side) -> str | None:
        """The variant a side reads (None for a constant)."""
        return None if side.value is not None else (side.variant or self.reference)

    def check_variants(self, spec_name: str, variants: list[str]) -> None:
        """Every variant the declarations name must be one a point declares."""
        def fail(what: str, name: str | None) -> None:
            raise ConfigError(
                f"spec {spec_name!r}: report.{what} names variant {name!r}, which no point "
                f"declares (the variants are: {', '.join(variants) or 'none'}); rename it "
                f"to one of them, or set `variant: {name}` on the point it means")

        if self.reference is not None and self.reference not in variants:
            fail("reference", self.reference)
        for c in self.comparisons:
            for key, side in (("a", c.a), ("b", c.b)):
                if side.value is None and side.variant is None and self.reference is None:
                    raise ConfigError(
                        f"spec {spec_name!r}: report comparison {c.title!r}.{key} names no "
                        f"variant and the family declares no reference; set {key}.variant "
                        f"or report.reference")
                v = self.variant_of(side)
                if v is not None and v not in variants:
                    fail(f"comparisons[{c.title!r}].{key}", v)

    @classmethod
    def from_spec(cls, spec) -> "ReportSpec | None":
        """The validated declarations of a loaded ``runner.Spec`` (None if it has none)."""
        if not getattr(spec, "report", None):
            return None
        rs = from_dict(cls, spec.report, where=f"spec {spec.name!r}: report")
        rs.check_variants(spec.name, declared_variants(spec))
        if not rs.table:
            rs.table = [k for k in spec.summary_keys]
        return rs


def declared_variants(spec) -> list[str]:
    """The ``variant`` labels a spec's points carry (base parameters, grid, points)."""
    out: list[str] = []
    base = spec.parameters.get("variant")
    grid = spec.grid.get("variant", [])
    if spec.points:
        out += [str(p.get("variant", base)) for p in spec.points if p.get("variant", base)]
    elif grid:
        out += [str(v) for v in grid]
    elif base is not None:
        out.append(str(base))
    return list(dict.fromkeys(out))


__all__ = ["Comparison", "FitClaim", "PaperRef", "ReportSpec", "Side", "VERDICTS",
           "declared_variants"]
