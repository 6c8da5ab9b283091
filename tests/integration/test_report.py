"""The report renders what the specs declare: a declared variant without runs is
said so explicitly, the verdict prose follows from the CI of the difference
(excludes 0 vs contains 0), and the report package has no cycle with ablations.
(Validation of the ``report:`` section on load: tests/unit/test_report_spec.py.)

Pure and fast: synthetic runs frames, no MLflow server, no notebook.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd

from metastone_lab import ablation_specs, report, runner
from metastone_lab.report import claims
from metastone_lab.report_spec import ReportSpec
from metastone_lab.tracking import metric_key

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "metastone_lab"


def frame(spec: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """{variant: {metric: per-seed values}} as a runs frame (one run per seed)."""
    rows = []
    for v, mets in spec.items():
        for s in range(len(next(iter(mets.values())))):
            r = {"params.variant": v, "params.seed": str(s), "run_id": f"{v}-{s}",
                 "point": f"{v}_seed-{s}"}
            r.update({f"metrics.{metric_key(m)}": vals[s] for m, vals in mets.items()})
            rows.append(r)
    return pd.DataFrame(rows)


# ----------------------------------------------------------- measured verdicts
def _loss_family() -> ReportSpec:
    spec, _ = runner.load_spec(ablation_specs.spec_path("ablate_loss"))
    return ReportSpec.from_spec(spec)


def _outcome(fam: ReportSpec, runs, title: str) -> claims.Outcome:
    comp = next(c for c in fam.comparisons if c.title == title)
    return claims.evaluate(fam, comp, runs, "ablate_loss")


def test_prose_from_a_ci_that_excludes_zero_vs_one_that_contains_it():
    fam = _loss_family()
    sep = frame({"spr_reference": {"auroc": [0.90, 0.92, 0.91]},
                 "bce_all_steps": {"auroc": [0.70, 0.72, 0.69]}})
    o = _outcome(fam, sep, "SPR vs plain BCE")     # declared: expect higher
    assert o.verdict == "supported" and o.diff["how"] == "paired by seed"
    assert o.diff["lo"] > 0 and "excludes 0" in claims.sentence(o)
    wide = frame({"spr_reference": {"auroc": [0.90, 0.50, 0.95]},
                  "bce_all_steps": {"auroc": [0.70, 0.72, 0.69]}})
    o = _outcome(fam, wide, "SPR vs plain BCE")
    assert o.verdict == "inconclusive" and o.diff["lo"] < 0 < o.diff["hi"]
    text = claims.sentence(o)
    assert f"inconclusive (CI [{claims.num(o.diff['lo'])}, {claims.num(o.diff['hi'])}] " \
           f"contains 0)" in text
    opposite = frame({"spr_reference": {"auroc": [0.60, 0.61, 0.62]},
                      "bce_all_steps": {"auroc": [0.90, 0.91, 0.92]}})
    assert _outcome(fam, opposite, "SPR vs plain BCE").verdict == "not_supported"


def test_decide_covers_every_claim():
    assert claims.decide(0.1, 0.2, "higher")[0] == "supported"
    assert claims.decide(-0.2, -0.1, "lower")[0] == "supported"
    assert claims.decide(-0.1, 0.2, "equal")[0] == "supported"
    assert claims.decide(0.1, 0.2, "equal")[0] == "not_supported"
    assert claims.decide(0.1, 0.2, "none")[0] == "higher"
    assert claims.decide(-0.1, 0.2, "none")[0] == "inconclusive"
    assert claims.decide(float("nan"), float("nan"), "higher")[0] == "inconclusive"


def test_a_constant_side_and_its_notes():
    fam = _loss_family()
    runs = frame({"spr_reference": {"auroc": [0.30, 0.95, 0.60]}})
    o = _outcome(fam, runs, "The reference SPR head learns")   # vs chance 0.5, notes
    assert o.verdict == "inconclusive" and o.diff["how"] == "over seeds"
    assert fam.comparisons[2].notes["inconclusive"] in claims.sentence(o)


def test_a_renamed_variant_is_reported_explicitly_not_silently():
    """Runs logged under an old label: the comparison says which variant has no
    runs and which variants the store has, in the bullet and in the summary row."""
    fam = _loss_family()
    runs = frame({"spr_reference": {"auroc": [0.90, 0.92, 0.91]},
                  "bce": {"auroc": [0.70, 0.72, 0.69]}})
    o = _outcome(fam, runs, "SPR vs plain BCE")
    assert o.verdict == "not_measured"
    text = claims.sentence(o)
    assert "not measured: variant 'bce_all_steps' has no runs in experiment 'ablate_loss'" in text
    assert "its runs are spr_reference, bce" in text
    assert claims.summary_row(o).endswith("| not measured | not measured |")
    # a metric with no finite value is named too
    nan = frame({"spr_reference": {"auroc": [float("nan")] * 3},
                 "bce_all_steps": {"auroc": [0.7, 0.7, 0.7]}})
    assert "metric 'auroc' has no finite value in the 3 run(s) of variant 'spr_reference'" \
        in claims.sentence(_outcome(fam, nan, "SPR vs plain BCE"))


def test_the_scaling_fit_claim_reads_the_slope_ci():
    from metastone_lab.report import scaling

    spec, _ = runner.load_spec(ablation_specs.spec_path("ablate_scaling_law"))
    fam = ReportSpec.from_spec(spec)
    fit = {"b": 0.27, "b_lo": 0.07, "b_hi": 0.31, "r2": 0.53}
    verdict, text = scaling.fit_verdict(fam, fit)
    assert verdict == "supported" and "excludes 0" in text and "log-linearly" in text
    verdict, text = scaling.fit_verdict(fam, {**fit, "b_lo": -0.02})
    assert verdict == "inconclusive" and "CI [-0.020, +0.310] contains 0" in text
    assert scaling.fit_verdict(fam, None)[0] == "not_measured"


def test_build_report_renders_the_declarations(tmp_path, monkeypatch):
    from metastone_lab.report import build

    data = {"ablate_loss": frame({"spr_reference": {"auroc": [0.90, 0.92, 0.91]},
                                  "bce_all_steps": {"auroc": [0.70, 0.72, 0.69]}}),
            "ablate_aggregation": frame({"base": {
                "bon@8.geometric": [0.60, 0.61, 0.62], "bon@8.mean": [0.59, 0.60, 0.63],
                "acc.sprm_bon@1": [0.3, 0.3, 0.3], "acc.sprm_bon@4": [0.5, 0.5, 0.6]}})}
    monkeypatch.setattr(build, "load_runs", lambda e, uri=None, **k: data.get(e, pd.DataFrame()))
    text = report.build_report(f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "results.md")
    assert "## Loss" in text and "| spr_reference | 0.910" in text and "## Aggregation" in text
    assert "**SPR vs plain BCE** (paper, SPR beats plain BCE on all steps (a wider score gap), " \
           "no numbers; claims SPR (reference) > BCE on all steps): " in text
    assert "In the paper: the SPR loss vs plain BCE on all steps" in text
    assert "| Loss | SPR vs plain BCE | SPR (reference) > BCE on all steps | +0.207" in text
    assert "variant 'last_step_only' has no runs in experiment 'ablate_loss'" in text
    assert "(paper, DeepScaleR-1.5B, AIME24, k=8: 53.1 vs 52.9; claims geometric > mean)" in text
    assert "Not in this store (not run or no finished runs): ablate_scaling_law" in text
    assert (tmp_path / "figures" / "accuracy_vs_k_selectors.png").stat().st_size > 1000


# ----------------------------------------------------------------- structure
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names |= {f"{node.module or ''}.{a.name}" for a in node.names} | {node.module or ""}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_the_report_does_not_import_the_study_runner_and_is_split_small():
    """No ablations <-> report cycle: the report reads the spec list from the leaf
    module ablation_specs; each report module stays under 600 lines."""
    files = sorted((PKG / "report").glob("*.py")) + [PKG / "report_spec.py",
                                                      PKG / "compare_runs.py",
                                                      PKG / "ablation_specs.py"]
    for f in files:
        assert not any("ablations" in n.split(".") for n in _imports(f)), f
        assert len(f.read_text().splitlines()) < 600, f
    assert not (PKG / "report.py").exists()
