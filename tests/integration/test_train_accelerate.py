"""Scale-out: one joint step under ``accelerate launch`` with 2 CPU processes equals
the single-process step on the same global batch (DDP averages the gradients;
token means use the all-reduced token count; the SPR class-balance counts are
all-reduced inside ``loss.spr_loss``).

Two SPR normalisations (``TrainConfig.spr_dp_norm``):
* ``global``: each rank's SPR loss is rescaled to the all-reduced weight sum, so the
  DP step equals the single-process step (checked to the rounding bound of
  tests/_tolerance.py: the two differ only in reduction order and batch shapes);
* ``rank`` (the reference): each rank divides by its own weight sum; measured on this
  batch: 0.077 relative L2 error (cosine 0.997) on the head gradient.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _launch import accelerate_cli  # noqa: E402
from _accel_worker import fixed_batch, make_micro, make_trainer, one_step  # noqa: E402
from _tolerance import (assert_within_rounding, head_terms, llama_terms,  # noqa: E402
                        rounding_bound)

REPO = Path(__file__).resolve().parents[2]


def _launch(micro: Path, out: Path, norm: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # accelerate 1.15: `launch --cpu --num_processes 2` on one machine starts ONE process
    # (multi-CPU needs mpirun + a hostfile). `--multi_gpu` spawns 2 torchrun workers; the
    # worker's Accelerator(cpu=True) makes them CPU ranks on the gloo backend.
    cmd = accelerate_cli() + ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                           "1", "--main_process_port", "0", "--mixed_precision", "no",
                           "--dynamo_backend", "no", str(REPO / "tests" / "_accel_worker.py"),
                           str(micro), str(out), norm]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    dp = json.loads(out.read_text())
    assert dp["world"] == 2
    return dp


def _term_counts(t, b) -> dict:
    """What the single-process step accumulates (tests/_tolerance.py counts): a step
    logit (all layers + the head), the response tokens and step positions summed over
    the global batch, and the largest step logit (the scale of the logits' rounding)."""
    cfg, L = t.policy.config, b.input_ids.shape[1]
    mask = t._step_mask(b)
    with torch.no_grad():
        _, logits = t.model(b.input_ids, b.attention_mask, mask)
    return {"logit": llama_terms(cfg, L) + head_terms(cfg.hidden_size, t.head[0].out_features),
            "backbone": llama_terms(cfg, L), "tokens": b.n_response_tokens,
            "positions": int(mask.sum()), "max_steps": int(mask.sum(-1).max()),
            "logit_scale": float(logits[mask].abs().max()), "adv_scale": float(
                b.advantages.abs().max()), "rows": len(b)}


def test_two_process_step_equals_single_process_step(tmp_path):
    micro = make_micro(tmp_path / "micro")
    dp = _launch(micro, tmp_path / "dp.json", "global")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = make_trainer(micro)
        b = fixed_batch(t.tokenizer, t.task)
        n = _term_counts(t, b)
        single = one_step(t, b)
    m1, m2 = single["metrics"], dp["metrics"]
    # The DP step and the single-process step compute the same values with other batch
    # shapes (each rank forwards half the rows) and another reduction order (per-rank
    # sums, then an all-reduce: +2 terms). Bounds: tests/_tolerance.py, term counts above.
    # policy loss: ratio = exp(logp - logp.detach()) = 1 exactly, so the loss is a token
    # mean of advantages: n = tokens + 2, terms of magnitude <= max |advantage|
    assert m2["policy_loss"] == pytest.approx(
        m1["policy_loss"], abs=rounding_bound(n["tokens"] + 2, n["adv_scale"]))
    # score gap: a step logit differs by at most the forward's rounding and |d log
    # sigmoid / dx| <= 1, so a geometric score (<= 1) by as much, plus the aggregate
    # (sigmoid, log, sum over the steps, division, exp), the means over the rows with
    # the all-reduce, and the difference of the two means
    logit_err = rounding_bound(n["logit"], n["logit_scale"])
    score_err = logit_err + rounding_bound(6 + n["max_steps"] + n["rows"] + 3, 1.0)
    for key in ("score_correct", "score_incorrect"):  # (the gap itself is ~1e-5 here)
        assert m2[key] == pytest.approx(m1[key], abs=score_err), key
    assert m2["score_gap"] == pytest.approx(m1["score_gap"], abs=2 * score_err)
    # head gradients: the forward to the head's input, the head, the sum over the step
    # positions and the all-reduce mean, on the scale of each gradient tensor
    n_grad = n["logit"] + n["positions"] + 3
    for k, g in single["grads"].items():
        assert_within_rounding(torch.tensor(dp["grads"][k]), g, n_grad, what=f"grad {k}")
    # head weights after one AdamW step: w - lr*(g/(|g| + eps) + wd*w) (bias-corrected
    # first step). A gradient error dg moves g/(|g| + eps) by at most dg*eps/(|g| - dg +
    # eps)^2 (its derivative is eps/(|g| + eps)^2), and never by more than 2; plus the
    # optimiser's own rounding (sqrt, the ratio, the products and the update: ~6 terms
    # of magnitude |w| + lr).
    lr, adam_eps = t.cfg.head_lr, 1e-8
    for k, w in single["head"].items():
        g = single["grads"][k].double()
        dg = rounding_bound(n_grad, float(g.abs().max()))
        shift = (dg * adam_eps / ((g.abs() - dg).clamp_min(0) + adam_eps) ** 2).clamp_max(2.0)
        bound = lr * shift + rounding_bound(6, 1.0) * (single["head_before"][k].double().abs()
                                                       + lr)
        dev = (torch.tensor(dp["head"][k]).double() - w.double()).abs()
        assert (dev <= bound).all(), (k, float(dev.max()), float((dev - bound).max()))
    moved = max(float((single["head"][k] - single["head_before"][k]).abs().max())
                for k in single["head"])
    assert moved > 1e-4  # the step really moved the head (by ~lr under Adam)
    # LoRA gradients, summed as |g|: each element within the rounding bound of the forward
    # and backward through the backbone plus the token sum and the all-reduce, at the
    # scale of the largest LoRA gradient; the abs-sum adds its own positive sum
    n_lora = 2 * n["backbone"] + t.cfg.lora_r + n["tokens"] + 3
    dg = rounding_bound(n_lora, single["lora_grad_abs_max"])
    total = single["lora_grad_abs_sum"]
    assert dp["lora_grad_abs_sum"] == pytest.approx(
        total, abs=single["lora_grad_numel"] * dg
        + rounding_bound(single["lora_grad_numel"], total))

    # the reference (per-rank) normalisation: close, not equal
    ref = _launch(micro, tmp_path / "dp_rank.json", "rank")
    assert ref["metrics"]["spr_loss_rank_mean"] == pytest.approx(m1["spr_loss"], rel=0.03)
    for k, g in single["grads"].items():
        g2 = torch.tensor(ref["grads"][k])
        cos = torch.nn.functional.cosine_similarity(g.flatten(), g2.flatten(), dim=0)
        assert cos > 0.99, (k, float(cos))
