"""Ablation study infrastructure: every spec is valid (full and micro), the
rollout cache round-trips and keys on what produced the trajectories, and a
micro version of two specs runs end to end through the runner (papermill +
MLflow) and feeds the generated report.

Cost: one micro backbone build (~20-40 s) + 3 micro notebook points (~15-25 s
each on 2 cores) + the report.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from metastone_lab import ablations, report, runner
from metastone_lab.config import from_dict, load_yaml
from metastone_lab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ALL_SPECS = ablations.SPECS + ablations.OPTIONAL_SPECS


@pytest.mark.parametrize("name", ALL_SPECS)
def test_spec_valid_full_and_micro(name, tmp_path):
    path = ablations.spec_path(name)
    rep = runner.run_spec(path, dry_run=True, root=REPO)      # validates vs the notebook
    pts = rep["points"]
    data = load_yaml(path)
    assert len(data["seeds"]) >= 3, f"{name}: the study needs >= 3 seeds per point"
    assert len(pts) == len(data["seeds"]) * max(1, len(data.get("points", [])))
    variants = {p.params.get("variant") for p in pts.values()}
    assert None not in variants, f"{name}: every point needs a variant label for the report"
    micro = ablations.micro_spec(data, cache_dir=str(tmp_path / "c"))
    assert micro["parameters"]["backbone"] == "micro"
    assert micro["parameters"]["train_steps"] <= 2 and micro["parameters"]["k_max"] <= 4
    assert len(micro["seeds"]) == 2 and len(micro["points"]) == len(data.get("points", []))
    for p in micro["points"]:
        assert p.get("cache_dir", str(tmp_path / "c")) == str(tmp_path / "c")
    mp = tmp_path / f"{name}.yaml"
    mp.write_text(yaml.safe_dump(micro))
    mrep = runner.run_spec(mp, dry_run=True, root=REPO)
    assert len(mrep["points"]) == 2 * max(1, len(data.get("points", [])))


def test_families_cover_the_issue():
    names = set(ablations.SPECS)
    assert {"ablate_segmentation", "ablate_aggregation", "ablate_loss", "ablate_representation",
            "ablate_shared_vs_separate", "ablate_scaling_law", "ablate_ood"} <= names
    seg = [p.get("segmenter") for p in load_yaml(ablations.spec_path("ablate_segmentation"))["points"]]
    assert {"reference", "paragraph", "sentence", "fixed", "regex"} <= set(seg)
    losses = {p["train"]["loss"] for p in load_yaml(ablations.spec_path("ablate_loss"))["points"]}
    assert losses == {"spr", "spr_no_filter", "spr_no_balance", "spr_no_boost", "bce_all_steps",
                      "last_step_only"}
    sizes = load_yaml(ablations.spec_path("ablate_scaling_law"))["points"]
    assert len(sizes) >= 3


def test_micro_backbone_options_keep_size_order():
    small = ablations._micro_backbone_options({"hidden_size": 48})
    big = ablations._micro_backbone_options({"hidden_size": 128})
    assert small["hidden_size"] < big["hidden_size"]
    assert small["hidden_size"] % small["num_heads"] == 0


def test_unknown_spec_is_a_clear_error():
    with pytest.raises(ConfigError, match="ablate_loss"):
        ablations.cli_main(["--only", "ablate_los", "--dry-run"])


# ------------------------------------------------------------ rollout cache
def _samples():
    from metastone_lab.generate import ProblemSamples, Trajectory
    from metastone_lab.tasks.base import Problem

    t = Trajectory(text="1 + 2 = 3.\n\n</think> The answer is 3.", token_ids=[5, 6, 7],
                   step_positions=[9], step_scores=[0.7], scores={"geometric": 0.7, "min": 0.7},
                   answer="3", correct=True, first_wrong_step=-1, n_steps=1,
                   hit_max_tokens=False, prompt_len=8)
    p = Problem(id="p0", question="q", answer="3", prompt="Start with 1. <think>",
                solution="s", meta={"ops": 1})
    return [ProblemSamples(p, [t, t], gen_seconds=0.5)]


def test_rollout_cache_roundtrip_and_damage(tmp_path):
    from metastone_lab.rollout_cache import RolloutCache, content_key

    cache = RolloutCache(tmp_path / "c")
    key = content_key({"a": 1})
    assert cache.load(key) is None
    cache.store(key, {"a": 1}, _samples(), [], {"aha_onset_step": 3, "evals": [],
                                                "param_counts": {"head": 5}, "log_rows": []})
    test, val, rec = cache.load(key)
    assert test[0].trajectories[1].scores == {"geometric": 0.7, "min": 0.7}
    assert test[0].problem.meta == {"ops": 1} and val == [] and rec["aha_onset_step"] == 3
    # nothing but JSON on disk
    assert {f.suffix for f in cache.entry(key).iterdir()} <= {".json", ""}
    (cache.entry(key) / "samples.json").write_text("{broken")
    assert cache.load(key) is None  # a damaged entry is recomputed, never trusted
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        RolloutCache(tmp_path / "f")


def test_cache_key_ignores_aggregator_but_not_what_produces_rollouts():
    from metastone_lab.rollout_cache import content_key
    from metastone_lab.study import StudyConfig, cache_content

    def key(**kw):
        return content_key(cache_content(from_dict(StudyConfig, {"backbone": "micro", **kw})))

    base = key()
    assert key(aggregator="min") == base == key(output_dir="elsewhere", cache_dir="x")
    for change in ({"seed": 1}, {"segmenter": "sentence"}, {"train": {"loss": "bce_all_steps"}},
                   {"eval_split": "ood"}, {"k_max": 8}, {"backbone_options": {"hidden_size": 16}},
                   {"prompt_format": {"style": "chat", "shots": 2}},
                   {"train": {"head_lr": 0.1}}, {"train": {"feature_layer": -1}}):
        assert key(**change) != base, change
    # a training override of a field the study shares with training (what is evaluated)
    # is refused when the config loads, so no cached result can hide one
    for change in ({"train": {"read_at": "step_token"}},
                   {"train": {"segmenter_options": {"n": 3}}},
                   {"train": {"prompt_format": {"shots": 1}}}):
        with pytest.raises(ConfigError, match="set .* at the top level"):
            key(**change)
    # where the checkpoints go / how a call treats them: not part of what was produced
    assert key(train={"output_dir": "x", "resume": False, "fresh": True}) == base


def test_within_problem_auroc_ranks_inside_each_problem():
    import copy

    from metastone_lab.study import within_problem_auroc

    ps = _samples()[0]
    good, bad = ps.trajectories[0], copy.deepcopy(ps.trajectories[0])
    bad.correct, bad.scores = False, {"geometric": 0.9}
    one = copy.deepcopy(ps)
    one.trajectories = [good, bad]                     # the wrong sample scores higher: 0.0
    tie = copy.deepcopy(one)
    tie.trajectories[1].scores = {"geometric": 0.7}    # a tie counts 1/2
    easy = copy.deepcopy(ps)                           # all correct: no within-problem pair
    assert within_problem_auroc([one], "geometric") == (0.0, 1)
    assert within_problem_auroc([one, tie, easy], "geometric") == (0.25, 2)
    assert within_problem_auroc([easy], "geometric") == (None, 0)


# ------------------------------------------------------ micro, end to end
def test_micro_ablations_and_report(tmp_path, monkeypatch):
    from metastone_lab.backbones import TinyBackboneConfig, build_tiny_backbone

    monkeypatch.setenv("METASTONE_LAB_CACHE", str(tmp_path / "cache"))
    # the micro backbone trained long enough to solve some problems (1500 steps, ~20 s;
    # pass@1 0.41 in its build check): with the 120-step default (~1 right in 50
    # samples) whether the 16 test samples hold a right one, i.e. whether any AUROC
    # below is defined, was luck
    trained = tmp_path / "micro-1500"
    build_tiny_backbone(TinyBackboneConfig.micro(steps=1500), trained, log=lambda *_: None)
    monkeypatch.setitem(ablations.MICRO_PARAMS, "backbone", str(trained))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = ablations.run_all(["ablate_aggregation", "ablate_ood", ablations.PROBE_STEP], micro=True,
                            runs_dir=tmp_path / "runs", tracking_uri=uri, progress=False,
                            max_seeds=1, log=lambda *_: None)
    assert res["exit_code"] == 0, res
    assert res["specs"]["ablate_aggregation"]["points"] == 1
    assert res["total_wall_s"] > 0 and 0 < res["cpu_share"] <= 1.5
    timing = json.loads((tmp_path / "runs" / "ablations_timing_micro.json").read_text())
    assert set(timing["specs"]) == {"ablate_aggregation", "ablate_ood", "probe"}
    # the in-domain ood point has the aggregation point's config (micro): a cache hit
    ood = report.load_runs("ablate_ood", uri)
    tags = dict(zip(ood["params.variant"], ood["tags.metastone.rollout_cache"]))
    assert tags == {"in_domain": "hit", "ood": "miss"}
    agg = report.load_runs("ablate_aggregation", uri)
    cols = set(agg.columns)
    for a in ("geometric", "mean", "min", "last", "product"):
        assert f"metrics.auroc.{a}" in cols and f"metrics.bon_at_2.{a}" in cols
    assert {"metrics.compute_at_4", "metrics.gen_tokens_mean", "metrics.auroc_within.geometric",
            "metrics.acc.sprm_bon_at_4"} <= cols
    assert any(c.startswith("metrics.curve.score_incorrect_at_") for c in cols)  # training curves
    # the hit replays the training curves and reproduces the same scored trajectories
    same = [c for c in ("metrics.auroc.geometric", "metrics.pass_at_1")]
    ind = ood[ood["params.variant"] == "in_domain"].iloc[0]
    for c in same:
        if c in ood and agg[c].notna().all():
            assert ind[c] == pytest.approx(agg[c].iloc[0])
    out = tmp_path / "docs" / "results.md"
    text = report.build_report(uri, out)
    assert out.read_text() == text
    for f in ("accuracy_vs_k_selectors.png", "aha_moment.png"):
        assert (tmp_path / "docs" / "figures" / f).stat().st_size > 1000
    assert "## Aggregation" in text and "| geometric |" in text and "## Out of domain" in text
    assert "| in_domain |" in text and "| ood |" in text
    # the representation probe ran (micro) and its table is read back from the store
    assert "## Representation probe" in text and "| policy_logprob | none |" in text
    assert "Last `make ablations`" in text  # timing read back from the store
    assert "Not in this store" in text and "ablate_loss" in text  # missing families said so
    # the ood family's declared comparisons are measured and listed (report: in its spec)
    assert "## Discussion (generated from the declared comparisons)" in text
    assert "| Out of domain | The head transfers out of domain | ood AUROC > chance |" in text


def test_timing_section_keeps_the_full_run_and_lists_a_later_optional_spec(tmp_path):
    """A later ``--only`` run (named "partial") must not replace the full study's
    time; an optional spec timed in it is listed apart, outside the total."""
    from metastone_lab import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = tracking.Tracker(uri)
    with t.run(ablations.TIMING_EXPERIMENT, run_name="full", params={"cores": 2}):
        t.log_metrics({"total_wall_s": 3000.0, "total_cpu_s": 5400.0, "cpu_share": 0.9,
                       "loadavg_start": 0.1, "loadavg_end": 2.0, "wall_s.ablate_loss": 700.0,
                       "points.ablate_loss": 21}, step=0)
    with t.run(ablations.TIMING_EXPERIMENT, run_name="partial", params={"cores": 2}):
        t.log_metrics({"total_wall_s": 1500.0, "total_cpu_s": 2800.0, "cpu_share": 0.9,
                       "loadavg_start": 0.1, "loadavg_end": 2.0,
                       "wall_s.ablate_segmentation_smollm2": 1490.0,
                       "points.ablate_segmentation_smollm2": 9}, step=0)
    text = "\n".join(report.timing_section(uri, {}))
    assert "**50.0 min wall**" in text and "| ablate_loss | 21 | 700 |" in text
    assert "| ablate_segmentation_smollm2 (optional; separate run" in text and "| 9 | 1490 |" in text
    assert "**74.8 min wall** for the whole set (50.0 + 24.8)" in text


def test_segmentation_options_and_read_at_reach_training():
    """The head must be trained on the positions it is evaluated on: a fixed/regex
    rule's options and read_at go into the TrainConfig (they failed / mismatched before)."""
    from metastone_lab.study import StudyConfig

    cfg = from_dict(StudyConfig, {"segmenter": "fixed", "segmenter_options": {"n": 4},
                                  "read_at": "step_token"})
    t = cfg.train_config()
    assert (t.segmenter, t.segmenter_options, t.read_at) == ("fixed", {"n": 4}, "step_token")
