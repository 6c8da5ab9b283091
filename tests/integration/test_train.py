"""Trainer tests on a micro backbone (random 2-layer Llama, hidden 32): config
validation, GRPO math, the sampler, the four modes, logging and aha detection.
Each test takes about a second."""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _accel_worker import fixed_batch, make_micro, make_trainer, one_step  # noqa: E402
from _tolerance import (assert_within_rounding, head_terms, llama_terms,  # noqa: E402
                        rounding_bound)

from metastone_lab.config import from_dict  # noqa: E402
from metastone_lab.errors import ConfigError, UnknownNameError  # noqa: E402
from metastone_lab.generate import encode_prompt  # noqa: E402
from metastone_lab.train import TrainConfig, train  # noqa: E402
from metastone_lab.training.aha import AhaDetector  # noqa: E402
from metastone_lab.training.grpo import (clipped_surrogate, group_advantages, k3_kl,  # noqa: E402
                                         masked_token_mean)
from metastone_lab.training.rollout import pack  # noqa: E402

TASK_OPTS = {"n_train": 64, "n_val": 8, "n_test": 8, "n_ood": 0}


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return make_micro(tmp_path_factory.mktemp("micro"))


def _snap(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(a: dict, b: dict, part: str = "") -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if part in k)


# ----------------------------------------------------------------------------- config

def test_config_rejects_small_group_lora_r0_unknown_key_and_wrong_type():
    with pytest.raises(ConfigError, match="GRPO needs a group"):
        from_dict(TrainConfig, {"n": 1})
    with pytest.raises(ConfigError, match="lora_r"):
        from_dict(TrainConfig, {"lora_r": 0})
    with pytest.raises(ConfigError, match="unknown key 'nn'"):
        from_dict(TrainConfig, {"nn": 8})
    with pytest.raises(ConfigError, match="TrainConfig.steps"):
        from_dict(TrainConfig, {"steps": "ten"})
    with pytest.raises(ConfigError, match="mode"):
        from_dict(TrainConfig, {"mode": "both"})
    with pytest.raises(ConfigError, match="temperature"):
        from_dict(TrainConfig, {"temperature": -1.0})
    with pytest.raises(UnknownNameError, match="bogus"):
        from_dict(TrainConfig, {"loss": "bogus"}).validate_names()


def test_fingerprint_depends_on_shapes_not_on_lr():
    a, b = TrainConfig(), TrainConfig(policy_lr=0.5, steps=3)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != TrainConfig(head_width_mult=4.0).fingerprint()
    assert a.fingerprint() != TrainConfig(backbone="smollm2").fingerprint()


def test_result_fingerprint_covers_every_field_but_bookkeeping():
    import dataclasses

    from metastone_lab.config import to_dict
    from metastone_lab.training.config import BOOKKEEPING_FIELDS

    a = TrainConfig()
    # bookkeeping: where and how often it is saved, how this call treats output_dir
    for change in ({"output_dir": "elsewhere"}, {"resume": True}, {"fresh": True},
                   {"checkpoint_every": 1}, {"keep_checkpoints": 0}, {"device": "cpu"}):
        assert TrainConfig(**change).result_fingerprint() == a.result_fingerprint(), change
    # every other field changes it (one changed value per field)
    probe = {"mode": "sft", "task_options": {"n_train": 5}, "prompt_format": {"shots": 1},
             "lora_targets": ["q_proj"], "loss": "bce_all_steps", "spr_dp_norm": "global",
             "segmenter": "paragraph", "segmenter_options": {"n": 2}, "read_at": "step_token",
             "aggregator": "min", "init_from": "x", "eval_at_start": False,
             "backbone": "micro", "task": "jsonl", "head_inputs": "hidden+confidence"}
    # (the flat names: the fields of the composed sub-configs, config_tree, count one by one)
    for name in to_dict(a):
        if name in BOOKKEEPING_FIELDS:
            continue
        v = getattr(a, name)
        new = probe.get(name, v + 1 if isinstance(v, int) else
                        (v + 0.25 if isinstance(v, float) else None))
        assert new is not None and new != v, name
        b = dataclasses.replace(a)
        object.__setattr__(b, name, new)  # (no range checks needed for a hash)
        assert b.result_fingerprint() != a.result_fingerprint(), name
        assert name in a.result_diff(b.to_dict()), name
    assert a.result_fingerprint({"backbone_config": "x"}) != a.result_fingerprint()
    assert a.result_diff(a.to_dict()) == {}
    # a checkpoint written before a field existed: the missing key is its default
    old = {k: v for k, v in a.to_dict().items() if k != "filter_warmup_steps"}
    assert a.result_diff(old) == {}


# ----------------------------------------------------------------------------- GRPO math

def test_group_advantages_normalise_per_group_and_all_equal_is_zero():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    a = group_advantages(r, 4)
    assert torch.isfinite(a).all()
    # exactly (r - 0.5) / (0.5 + eps); float32: mean of 4 (4), r - mean (1), the squared
    # deviations and their mean (6), sqrt, + eps, the division (3): n = 14 (tests/_tolerance.py)
    want = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64) * 0.5 / (0.5 + 1e-6)
    assert_within_rounding(a[:4], want, 14, what="advantages")
    assert torch.equal(a[4:], torch.zeros(8))
    with pytest.raises(ValueError, match="group size"):
        group_advantages(torch.ones(5), 4)


def test_clipped_surrogate_clips_and_k3_is_nonnegative():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5]]))  # ratios 1.5, 1, 0.5
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss_pos, info = clipped_surrogate(logp, old, torch.tensor([1.0]), mask, clip=0.2)
    # A>0: min(r, clip(r)) = [1.2, 1.0, 0.5]
    # float32: log of the ratio (1), logp - old and exp (2), clamp/min (exact), x A (1),
    # the masked mean over 3 tokens (4): n = 8, positive terms (tests/_tolerance.py)
    rel = rounding_bound(8, 1.0)
    assert loss_pos.item() == pytest.approx(-(1.2 + 1.0 + 0.5) / 3, rel=rel)
    assert info["clip_frac"] == pytest.approx(2 / 3)
    loss_neg, _ = clipped_surrogate(logp, old, torch.tensor([-1.0]), mask, clip=0.2)
    # A<0: min(-r, -clip(r)) = [-1.5, -1.0, -0.8]
    assert loss_neg.item() == pytest.approx((1.5 + 1.0 + 0.8) / 3, rel=rel)
    kl = k3_kl(logp, old)
    assert (kl >= 0).all() and k3_kl(old, old).abs().max() == 0
    assert masked_token_mean(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.bool)) == 0


# ----------------------------------------------------------------------------- modes

def test_joint_update_trains_lora_and_head_not_base_and_kl_starts_at_zero(micro):
    t = make_trainer(micro, kl_coef=0.1)
    b = fixed_batch(t.tokenizer, t.task)
    assert b.correct.any() and not b.correct.all()
    base0, head0 = _snap(t.policy), _snap(t.head)
    r = one_step(t, b)
    m = r["metrics"]
    # LoRA B=0 adds an exact 0: the policy's logits are the reference's bit for bit,
    # so k3 = exp(0) - 0 - 1 = 0 exactly
    assert m["kl"] == 0.0
    assert m["spr_loss"] > 0 and 0 < m["kept_fraction"] <= 1
    assert r["lora_grad_abs_sum"] > 0
    base1 = _snap(t.policy)
    assert _changed(base0, base1, "lora_")
    assert not any(not torch.equal(base0[k], base1[k]) for k in base0 if "lora_" not in k)
    assert _changed(head0, _snap(t.head))
    m2 = t.update(b)
    assert m2["kl"] > 0  # the adapter moved away from the reference


def test_head_only_freezes_policy_and_learns_to_separate(micro):
    # plain BCE on every step: on random micro features the SPR pseudo-label filter keeps
    # one class at a time and does not separate from a cold start (see the report)
    t = make_trainer(micro, mode="head_only", head_lr=3e-2, loss="bce_all_steps")
    b = fixed_batch(t.tokenizer, t.task, n_prompts=4)
    pol0, head0 = _snap(t.policy), _snap(t.head)
    gaps = [t.update(b)["score_gap"] for _ in range(30)]
    assert not _changed(pol0, _snap(t.policy))
    assert _changed(head0, _snap(t.head))
    assert all(p.grad is None for p in t.policy.parameters())
    assert abs(gaps[0]) < 0.05 and gaps[-1] > gaps[0] + 0.05, gaps[::8]


def test_sft_lowers_nll_on_canonical_solutions_and_leaves_head(micro):
    t = make_trainer(micro, mode="sft", sft_batch_size=8, policy_lr=3e-2)
    b = t.sft_batch(1)
    head0 = _snap(t.head)
    losses = [t.sft_update(b)["sft_loss"] for _ in range(10)]
    assert losses[-1] < losses[0] - 0.1, losses
    assert not _changed(head0, _snap(t.head))


def test_separate_prm_has_its_own_backbone_copy_and_head(micro):
    t = make_trainer(micro, mode="separate_prm")
    pc = t.param_counts
    assert pc["prm_backbone"] == pc["backbone"] and pc["prm_head"] == pc["head"]
    assert pc["extra_for_scoring"] == pc["backbone"] + pc["head"]
    b = fixed_batch(t.tokenizer, t.task)
    own_head0, prm_head0, prm_bb0 = _snap(t.rm.head), _snap(t.head), _snap(t.scorer.backbone)
    lora0 = _snap(t.policy)
    m = t.update(b)
    assert m["spr_loss"] > 0
    assert _changed(prm_head0, _snap(t.head))
    assert not _changed(own_head0, _snap(t.rm.head))
    assert not _changed(prm_bb0, _snap(t.scorer.backbone))
    assert _changed(lora0, _snap(t.policy), "lora_")


def test_batch_without_steps_gives_zero_spr_and_counts_a_warning(micro):
    t = make_trainer(micro)
    tok = t.tokenizer
    prompt = encode_prompt(tok, t.task.problems("train", 1)[0].prompt)
    resp = tok.encode("no steps here</think> The answer is 3", add_special_tokens=False)
    b = pack([prompt] * 4, [resp] * 4, [0.0, 1.0, 0.0, 1.0], n=4, pad_id=tok.pad_token_id)
    with pytest.warns(RuntimeWarning, match="no steps"):
        m = t.update(b)
    assert m["spr_loss"] == 0.0 and t.no_step_batches == 1
    assert math.isfinite(m["policy_loss"])


def test_all_equal_rewards_give_zero_policy_loss_without_nan(micro):
    t = make_trainer(micro)
    b = fixed_batch(t.tokenizer, t.task)
    b.advantages = group_advantages(torch.ones(len(b)), 4)
    m = t.update(b)
    assert m["policy_loss"] == 0.0 and all(
        math.isfinite(v) for k, v in m.items() if k not in ("score_gap",))


# ----------------------------------------------------------------------------- aha

def test_aha_onset_needs_two_consecutive_evals_above_threshold():
    d = AhaDetector(0.8, 2)
    assert d.update(10, 0.5) is None
    assert d.update(20, 0.85) is None      # first above: not yet confirmed
    assert d.update(30, 0.7) is None       # dropped: run broken
    assert d.update(40, 0.81) is None
    assert d.update(50, float("nan")) is None
    assert d.update(60, 0.9) is None
    assert d.update(70, 0.95) == 60        # onset = first eval of the confirmed run
    assert d.update(80, 0.99) is None and d.onset == 60
    d2 = AhaDetector()
    d2.load_state_dict(d.state_dict())
    assert d2.onset == 60 and d2.history == d.history


# ----------------------------------------------------------------------------- train loop

class _RecTracker:
    def __init__(self):
        self.metrics, self.tags, self.params = [], {}, None

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_params(self, p):
        self.params = p


@pytest.mark.parametrize("mode", ["joint", "head_only", "sft", "separate_prm"])
def test_train_loop_logs_every_step_to_jsonl_and_tracker(micro, tmp_path, mode):
    cfg = TrainConfig(mode=mode, backbone=str(micro), n=2, prompts_per_step=2, steps=3,
                      max_new_tokens=12, lora_r=2, lora_alpha=4, eval_every=2,
                      eval_val_problems=2, eval_test_problems=2, eval_samples=2,
                      checkpoint_every=2, sft_batch_size=4, output_dir=str(tmp_path / mode),
                      task_options=TASK_OPTS)
    tr = _RecTracker()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(cfg, tracker=tr)
    rows = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == ([1, 2, 3] if mode == "sft" else [0, 1, 2, 3])
    assert [s for s, _ in tr.metrics] == [r["step"] for r in rows]
    need = {"sft_loss"} if mode == "sft" else {
        "reward_mean", "pass_rate", "policy_loss", "kl", "spr_loss", "kept_fraction",
        "score_correct", "score_incorrect", "score_gap"}
    by_step = {r["step"]: r for r in rows}
    assert need <= set(by_step[1])
    if mode != "sft":
        assert {"eval_auroc", "eval_step_f1", "eval_pass1"} <= set(by_step[2]) & set(by_step[0])
    assert res.checkpoint is not None and res.checkpoint.name == "ckpt-3"
    assert (res.checkpoint / "adapter" / "adapter_model.safetensors").exists()
    assert res.steps_done == 3 and tr.params is not None


def test_sparse_head_forward_equals_reflective_model_at_step_positions(micro):
    t = make_trainer(micro)
    b = fixed_batch(t.tokenizer, t.task)
    t.model.eval()
    mask = t._step_mask(b)
    with torch.no_grad():
        logits, sparse = t.model(b.input_ids, b.attention_mask, mask)
        full = t.rm(b.input_ids, attention_mask=b.attention_mask)
    # the same layers on the same inputs; the head runs on the gathered step rows, a
    # differently shaped matmul: equal up to rounding (tests/_tolerance.py)
    cfg, L = t.policy.config, b.input_ids.shape[1]
    assert_within_rounding(logits, full.logits, llama_terms(cfg, L), what="LM logits")
    assert_within_rounding(sparse[mask], full.step_logits[mask],
                           llama_terms(cfg, L) + head_terms(cfg.hidden_size,
                                                            t.head[0].out_features),
                           what="step logits")
    assert (sparse[~mask] == 0).all()


def test_bench_train_prints_json_last_line(micro, capsys):
    from metastone_lab.bench import cli_train

    assert cli_train(["--backbone", str(micro), "--n", "2", "--prompts", "2",
                      "--max-new-tokens", "8", "--repeats", "2", "--warmup", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"joint_step_s", "policy_step_s", "ratio", "ratio_stats", "tokens_per_s"} <= set(res)
    # the ratio is the median of the per-round joint / policy ratios, bracketed by their
    # min and max (each rounded to 4 decimals)
    st = res["ratio_stats"]
    assert res["ratio"] == st["median"] and st["min"] <= st["median"] <= st["max"]
    assert st["min"] > 0
    aa = res["a_a_control"]                           # the noise floor: policy step vs itself
    assert aa["min"] <= aa["median"] <= aa["max"] and aa["min"] > 0


def test_aha_onset_is_logged_as_metric_and_tag(micro, tmp_path, monkeypatch):
    from metastone_lab.training.trainer import AHA_TAG, Trainer

    seq = iter([0.5, 0.6, 0.85, 0.9, 0.95])  # evals at steps 0, 1, 2, 3, 4

    def fake_eval(self):
        return {"eval_auroc": next(seq), "eval_pass1": 0.5}

    monkeypatch.setattr(Trainer, "evaluate", fake_eval)
    cfg = TrainConfig(mode="head_only", backbone=str(micro), n=2, prompts_per_step=1, steps=4,
                      max_new_tokens=6, lora_r=2, lora_alpha=4, eval_every=1,
                      checkpoint_every=0, output_dir=str(tmp_path / "aha"), task_options=TASK_OPTS)
    tr = _RecTracker()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(cfg, tracker=tr)
    assert res.aha_onset_step == 2
    assert tr.tags == {AHA_TAG: 2}
    logged = [(s, m["aha_onset_step"]) for s, m in tr.metrics if "aha_onset_step" in m]
    assert logged == [(3, 2)]  # known one eval later (patience 2), value = onset step



def test_filter_warmup_trains_the_first_steps_without_the_filter(micro, monkeypatch):
    """filter_warmup_steps=N: updates 1..N call the loss with filter=False; later
    updates use the configured loss unchanged (the reference)."""
    from metastone_lab.loss import LOSSES
    from metastone_lab.tasks import get_task

    seen = []
    real = LOSSES.get("spr")

    def spy(*a, **kw):
        seen.append(kw.get("filter", True))
        return real(*a, **kw)

    monkeypatch.setitem(LOSSES._items, "spr", spy)
    t = make_trainer(micro, mode="head_only", filter_warmup_steps=2)
    batch = fixed_batch(t.tokenizer, get_task("arith"), n_prompts=2, n=4)
    for step in (1, 2, 3):
        t.step = step
        t.update(batch)
    assert seen == [False, False, True]
    with pytest.raises(ConfigError, match="filter_warmup_steps must be >= 0"):
        TrainConfig(filter_warmup_steps=-1)


def test_spr_loss_receives_outcome_labels_only(micro, monkeypatch):
    """Honesty: the head never sees step labels. The loss gets (step logits, step mask,
    outcome) and the outcome is the trajectory's final-answer correctness, the same on
    every step of a trajectory, although this batch knows its first wrong steps."""
    from metastone_lab.loss import LOSSES
    from metastone_lab.tasks import get_task

    calls = []
    real = LOSSES.get("spr")

    def spy(*a, **kw):
        calls.append((a, kw))
        return real(*a, **kw)

    monkeypatch.setitem(LOSSES._items, "spr", spy)
    for head_inputs in ("hidden", "hidden+confidence"):
        calls.clear()
        t = make_trainer(micro, mode="head_only", head_inputs=head_inputs)
        b = fixed_batch(t.tokenizer, get_task("arith"), n_prompts=2, n=4)
        assert any(f not in (None, -1) for f in b.first_wrong), "vacuous: no step labels known"
        t.update(b)
        (logits, mask, outcome), kw = calls[0]
        assert set(kw) <= {"filter"} and len(calls) == 1
        assert torch.equal(outcome, b.correct.float())            # one label per trajectory
        assert outcome.shape == (len(b),) and mask.shape == logits.shape


def test_confidence_head_trains_checkpoints_and_resumes(micro, tmp_path):
    """head_inputs='hidden+confidence': the head is C + 5 wide, learns, and its
    checkpoint round-trips into a Trainer of the same config."""
    from metastone_lab.confidence import N_CONFIDENCE
    from metastone_lab.tasks import get_task

    t = make_trainer(micro, mode="head_only", head_inputs="hidden+confidence", head_lr=3e-2,
                     loss="bce_all_steps", output_dir=str(tmp_path / "run"))
    C = t.rm.hidden_size
    assert t.head[0].in_features == C + N_CONFIDENCE
    b = fixed_batch(t.tokenizer, get_task("arith"), n_prompts=4)
    head0 = _snap(t.head)
    gaps = [t.update(b)["score_gap"] for _ in range(20)]
    assert _changed(head0, _snap(t.head)) and gaps[-1] > gaps[0], gaps[::5]
    ckpt = t.save(tmp_path / "run" / "ckpt-1")
    t2 = make_trainer(micro, mode="head_only", head_inputs="hidden+confidence",
                      output_dir=str(tmp_path / "run2"))
    t2.load(ckpt)
    for k, v in t.head.state_dict().items():
        assert torch.equal(v, t2.head.state_dict()[k]), k
    # a reference-head trainer cannot load it: a clear shape error, not a silent mix
    t3 = make_trainer(micro, mode="head_only", output_dir=str(tmp_path / "run3"))
    with pytest.raises(Exception, match="head_inputs|shape|width|fingerprint"):
        t3.load(ckpt)


def test_separate_prm_head_is_restored_by_init_from(micro, tmp_path):
    """separate_prm saves its trained PRM head as prm_score_module.pt; a Trainer built
    with init_from (what study.load_trained does) must score with THAT head, not a
    fresh one."""
    from metastone_lab.tasks import get_task

    t = make_trainer(micro, mode="separate_prm", head_lr=3e-2, loss="bce_all_steps",
                     output_dir=str(tmp_path / "run"))
    b = fixed_batch(t.tokenizer, get_task("arith"), n_prompts=2)
    for _ in range(3):
        t.update(b)
    ckpt = t.save(tmp_path / "run" / "ckpt-1")
    t2 = make_trainer(micro, mode="separate_prm", init_from=str(ckpt),
                      output_dir=str(tmp_path / "run2"))
    trained = {k: v for k, v in t.head.state_dict().items()}
    for k, v in t2.head.state_dict().items():
        assert torch.equal(v, trained[k]), k


# ------------------------------------------------------ one evaluation path
def test_training_eval_is_the_study_evaluation_path(micro):
    """Trainer.evaluate logs what held_out.evaluate_held_out measures on the same
    problems with the same sampler config: the curve's numbers and the final
    evaluation's come from one function."""
    from metastone_lab.held_out import evaluate_held_out, headline
    from metastone_lab.training.evaluation import generate_config

    t = make_trainer(micro, eval_samples=4, eval_val_problems=4, eval_test_problems=6)
    got = t.evaluate()
    ev = evaluate_held_out(t.rm, t.tokenizer, t.task, t.task.problems("test", 6),
                           test_config=generate_config(t.cfg),
                           val_problems=t.task.problems("val", 4), aggregator=t.cfg.aggregator,
                           selectors=[], seed=t.cfg.eval_seed, n_boot=100, log=False)
    want = headline(ev, t.cfg.aggregator)
    assert got.keys() == want.keys() and {"eval_auroc", "eval_pass1", "eval_n"} <= got.keys()
    assert got["eval_n"] == 24
    for k, v in want.items():
        assert got[k] == pytest.approx(v, nan_ok=True), k
    # the training RNG is untouched by an evaluation
    torch.manual_seed(3)
    before = torch.rand(1)
    torch.manual_seed(3)
    t.evaluate()
    assert torch.equal(torch.rand(1), before)
