"""The study pipeline behind the notebooks (metastone_lab.study), on a random micro Llama."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
