"""The ``report:`` section of every ablation spec is validated when the spec loads:
an unknown key, a bad claim, or a reference / comparison variant that no point
declares (a renamed variant) is a ConfigError naming the fix.

Pure and fast: specs are loaded, nothing runs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metastone_lab import ablation_specs, runner
from metastone_lab.errors import ConfigError
from metastone_lab.report_spec import ReportSpec

REPO = Path(__file__).resolve().parents[2]


def write_spec(tmp_path: Path, report_section: dict, points=None) -> Path:
    """A copy of the loss spec with another ``report:`` section (and points)."""
    data = yaml.safe_load(ablation_specs.spec_path("ablate_loss").read_text())
    data["notebook"] = str(REPO / data["notebook"])
    data["report"] = report_section
    if points is not None:
        data["points"] = points
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


# ------------------------------------------------------------ validation on load
@pytest.mark.parametrize("name", ablation_specs.SPECS + ablation_specs.OPTIONAL_SPECS)
def test_every_ablation_spec_declares_its_meaning(name):
    spec, _ = runner.load_spec(ablation_specs.spec_path(name))
    rs = ReportSpec.from_spec(spec)
    assert rs is not None and rs.title and rs.reference, name
    assert rs.comparisons or rs.fit is not None, f"{name}: declares nothing to test"


def test_unknown_key_in_report_section_is_a_clear_error(tmp_path):
    p = write_spec(tmp_path, {"title": "Loss", "reference": "spr_reference", "refrence": "x"})
    with pytest.raises(ConfigError, match=r"report: unknown key 'refrence'.*Did you mean "
                                          r"'reference'.*Valid keys"):
        runner.load_spec(p)
    p = write_spec(tmp_path, {"title": "Loss", "reference": "spr_reference", "comparisons": [
        {"title": "t", "a": {"variant": "spr_reference", "metrc": "auroc"}, "b": "spr_no_filter"}]})
    with pytest.raises(ConfigError, match=r"unknown key 'metrc'.*Did you mean 'metric'"):
        runner.load_spec(p)


def test_reference_or_comparison_variant_no_point_declares_is_an_error(tmp_path):
    p = write_spec(tmp_path, {"title": "Loss", "reference": "spr"})
    with pytest.raises(ConfigError, match=r"report.reference names variant 'spr', which no "
                                          r"point declares.*spr_reference.*rename it"):
        runner.load_spec(p)
    # renaming a point's variant without its comparison fails when the spec loads
    p = write_spec(tmp_path, {"title": "Loss", "reference": "spr_reference", "comparisons": [
        {"title": "SPR vs BCE", "a": "spr_reference", "b": "bce_all_steps", "expect": "higher"}]},
        points=[{"variant": "spr_reference"}, {"variant": "bce"}])
    with pytest.raises(ConfigError, match=r"comparisons\['SPR vs BCE'\].b names variant "
                                          r"'bce_all_steps'.*spr_reference, bce"):
        runner.load_spec(p)


def test_bad_expect_and_side_are_errors(tmp_path):
    p = write_spec(tmp_path, {"title": "Loss", "reference": "spr_reference", "comparisons": [
        {"title": "t", "a": "spr_reference", "b": "spr_no_filter", "expect": "better"}]})
    with pytest.raises(ConfigError, match="'better' is not allowed; choose one of"):
        runner.load_spec(p)
    p = write_spec(tmp_path, {"title": "Loss", "reference": "spr_reference", "comparisons": [
        {"title": "t", "a": "spr_reference", "b": {"variant": "spr_no_filter", "value": 0.5}}]})
    with pytest.raises(ConfigError, match="either a constant"):
        runner.load_spec(p)
