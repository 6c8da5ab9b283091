"""The study pipeline behind the notebooks (metastone_lab.study), on a random micro Llama."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _accel_worker import make_micro  # noqa: E402

from metastone_lab import study  # noqa: E402
from metastone_lab.errors import ConfigError, UnknownNameError  # noqa: E402


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> str:
    return str(make_micro(tmp_path_factory.mktemp("micro")))


def _cfg(micro, tmp_path, **kw):
    base = dict(backbone=micro, train_steps=1, k_max=4, n_test=3, n_val=3, val_k=2,
                max_new_tokens=24, output_dir=str(tmp_path),
                train={"n": 2, "prompts_per_step": 1, "eval_every": 0})
    base.update(kw)
    return study.load_study_config(base)


def test_config_validation():
    with pytest.raises(ConfigError, match="Did you mean 'k_max'"):
        study.load_study_config({"kmax": 3})
    with pytest.raises(UnknownNameError, match="unknown step segmenter .lines.; choose one of"):
        study.load_study_config({"segmenter": "lines"})
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        study.load_study_config({"temperature": 0.0})
    # the runner's reserved names are ignored, not refused
    assert study.load_study_config({"mlflow_run_id": "x", "k_max": 4}).k_max == 4
    with pytest.raises(ConfigError, match="StudyConfig.train"):
        study.load_study_config({"train": {"lr": 1.0}}).train_config()


def test_summary_never_invents_missing_k(micro, tmp_path):
    cfg = _cfg(micro, tmp_path, train_mode="none")
    model, tok = study.prepare_backbone(cfg)
    trained = study.train_reflective(cfg, model, tok)
    ev = study.evaluate_tts(cfg, trained, tok, log=False)
    s = study.summarize(ev, trained, wall_seconds=1.0)
    assert set(study.SUMMARY_KEYS) <= set(s)
    assert s["bon@8"] is None and s["pass@32"] is None and s["majority@32"] is None
    assert s["bon@2"] is not None and 0.0 <= s["pass@1"] <= 1.0
    assert s["aha_onset_step"] is None and s["n_test"] == 3
    assert len(ev.test) == 3 and all(len(p.trajectories) == 4 for p in ev.test)


def test_bfloat16_study_trains_and_scores_with_a_float32_head(micro, tmp_path):
    import math

    import torch

    cfg = _cfg(micro, tmp_path, dtype="bfloat16")
    model, tok = study.prepare_backbone(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    trained = study.train_reflective(cfg, model, tok)
    assert next(trained.model.backbone.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in trained.model.head.parameters()} == {torch.float32}
    ev = study.evaluate_tts(cfg, trained, tok, log=False)
    assert sum(len(p.trajectories) for p in ev.test) == 12
    steps = [x for p in ev.test for t in p.trajectories for x in t.step_scores]
    assert steps and all(math.isfinite(x) and 0 < x < 1 for x in steps)
    # a float32 run is another training identity and another rollout-cache key
    f32 = _cfg(micro, tmp_path)
    assert "dtype" in cfg.train_identity() and "dtype" not in f32.train_identity()
    assert study.cache_content(cfg) != study.cache_content(f32)
    assert "dtype" not in study.cache_content(f32)["study"]


def test_half_precision_refuses_a_mode_that_trains_the_policy():
    with pytest.raises(ConfigError, match=r"trains the policy.*dtype: null"):
        study.load_study_config({"dtype": "bfloat16", "train_mode": "joint"})
    with pytest.raises(ConfigError, match="StudyConfig.dtype must be"):
        study.load_study_config({"dtype": "fp8"})
    assert study.load_study_config({"dtype": "float32", "train_mode": "joint"}).dtype == "float32"


def test_separate_prm_scores_come_from_the_external_prm(micro, tmp_path):
    """separate_prm: the policy's own head is untrained; trajectory scores must be
    the external PRM's (re-forward scores), not the policy head's."""
    import torch

    from metastone_lab.generate import encode_prompt, reforward_scores

    cfg = _cfg(micro, tmp_path, train_mode="separate_prm")
    model, tok = study.prepare_backbone(cfg)
    trained = study.train_reflective(cfg, model, tok)
    assert trained.scorer is not None and trained.result.steps_done == 1
    ev = study.evaluate_tts(cfg, trained, tok, log=False)
    ps = ev.test[0]
    prompt = encode_prompt(tok, ps.problem.prompt)
    seqs = [prompt + t.token_ids for t in ps.trajectories]
    want = reforward_scores(trained.scorer, tok, seqs, prompt_lens=[len(prompt)] * len(seqs))
    mine = reforward_scores(trained.model, tok, seqs, prompt_lens=[len(prompt)] * len(seqs))
    for t, w, m in zip(ps.trajectories, want, mine):
        # the same function (reforward_scores) on the same batch: bit-identical
        assert t.step_scores == w["scores"]
        if w["scores"]:
            assert not torch.allclose(torch.tensor(w["scores"]), torch.tensor(m["scores"]))


def test_train_then_reload_from_checkpoint(micro, tmp_path):
    cfg = _cfg(micro, tmp_path, train_mode="head_only")
    model, tok = study.prepare_backbone(cfg)
    trained = study.train_reflective(cfg, model, tok)
    again = study.load_trained(trained.result.checkpoint, model, tok)
    for a, b in zip(trained.model.head.state_dict().values(), again.model.head.state_dict().values()):
        assert a.equal(b)
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        study.load_trained(tmp_path, model, tok)


# ------------------------------------------- re-running a point (runner + quickstart) --
def test_rerun_with_changed_train_key_trains_afresh_and_keeps_the_earlier_run(micro, tmp_path):
    """The quickstart re-run with one training key changed (filter_warmup_steps, as in
    the user report) must train (not resume the other config's checkpoint), log the
    train.* params of the checkpoint it reports and its curves, and leave the first
    run's executed notebook and summary where they were."""
    import json

    import yaml
    from mlflow.tracking import MlflowClient

    from metastone_lab import runner, tracking
    from metastone_lab.config import flatten

    repo = Path(__file__).resolve().parents[2]
    params = {"backbone": micro, "train_mode": "head_only", "train_steps": 2,
              "filter_warmup_steps": 2, "k_max": 2, "n_test": 2, "n_val": 2, "val_k": 2,
              "max_new_tokens": 16, "train": {"n": 2, "prompts_per_step": 1, "eval_every": 0}}
    spec = tmp_path / "rerun.yaml"
    spec.write_text(yaml.safe_dump({"name": "rerun", "notebook": "notebooks/quickstart.ipynb",
                                    "parameters": params}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = tmp_path / "runs"

    def run(*overrides):
        rep = runner.run_spec(spec, root=repo, runs_dir=runs, tracking_uri=uri, progress=False,
                              overrides=list(overrides))
        assert rep["exit_code"] == 0, {k: r.get("error") for k, r in rep["points"].items()}
        return runner.latest_dir(runs / "rerun" / "default")

    first = run()
    nb1, summary1 = first / "default.ipynb", first / "summary.json"
    nb1_bytes, summary1_bytes = nb1.read_bytes(), summary1.read_bytes()
    second = run("filter_warmup_steps=0")

    # nothing of the first run was overwritten
    assert second != first
    assert nb1.read_bytes() == nb1_bytes and summary1.read_bytes() == summary1_bytes
    sweeps = sorted((runs / "rerun" / runner.SWEEPS_DIR).iterdir())
    assert len(sweeps) == 2 and (sweeps[0] / "summary.json").read_bytes() == summary1_bytes

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("rerun")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`{tracking.TAG_ROLE}` = 'point'",
                                  order_by=["attributes.start_time ASC"])
    assert [c.data.params["filter_warmup_steps"] for c in children] == ["2", "0"]
    states = {f: json.loads(f.read_text())
              for f in (runs / "rerun" / "default" / "train").rglob("ckpt-*/state.json")}
    for child, warmup in zip(children, (2, 0)):
        # the checkpoint this run reports was trained with this run's warm-up
        mine = [f for f, st in states.items() if st["config"]["filter_warmup_steps"] == warmup]
        assert len(mine) == 1, (f"no checkpoint trained with filter_warmup_steps={warmup}: "
                                f"{ {str(f): st['config']['filter_warmup_steps'] for f, st in states.items()} }")
        state, ckpt_dir = states[mine[0]], mine[0].parent.parent
        assert state["step"] == 2
        # training actually ran: both steps in the log and on the run's curves
        rows = [json.loads(x) for x in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        hist = client.get_metric_history(child.info.run_id, "spr_loss")
        assert sorted(m.step for m in hist) == [1, 2]
        # the logged train.* params are the checkpoint's config
        want = tracking._flatten_params({f"train.{k}": v
                                         for k, v in flatten(state["config"]).items()})
        got = {k: v for k, v in child.data.params.items()
               if k.startswith("train.") and not k.startswith("train.param_counts")}
        assert got == want


@pytest.mark.parametrize("mode", ["joint", "separate_prm"])
def test_the_trained_model_stays_in_memory_and_equals_its_checkpoint(micro, tmp_path, mode):
    """train_reflective hands back the trainer's own model (no rebuild from disk); its
    weights are the checkpoint's, which load_trained rebuilds in another session."""
    import torch

    cfg = _cfg(micro, tmp_path, train_mode=mode)
    model, tok = study.prepare_backbone(cfg)
    trained = study.train_reflective(cfg, model, tok)
    assert trained.result.model is None and not trained.model.training
    again = study.load_trained(trained.result.checkpoint, model, tok)
    for got, want in ((trained.model, again.model), (trained.scorer, again.scorer)):
        if want is None:
            assert got is None
            continue
        a, b = got.state_dict(), want.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
