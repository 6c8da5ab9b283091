"""The held-out evaluation logged during training (``Trainer.evaluate``).

Samples ``eval_samples`` trajectories per val/test problem under a forked RNG
seeded with ``eval_seed`` (the training RNG is untouched), scores them with the
scoring head (the PRM copy's in ``separate_prm``) and reports AUROC and pass@1 on
test; the step-error threshold is chosen on val only.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from .rollout import RolloutBatch, rollout


def eval_problems(trainer: Any, split: str, k: int) -> list[Any]:
    """The first ``k`` problems of ``split``, drawn once per trainer and cached."""
    if split not in trainer._eval_cache:
        trainer._eval_cache[split] = trainer.task.problems(split, k)
    return trainer._eval_cache[split]


@torch.no_grad()
def score_batch(trainer: Any, b: RolloutBatch) -> tuple[list[float], list[list[float]]]:
    """Score a batch of B trajectories with the trainer's scoring head.

    Returns (trajectory scores, B floats aggregated with ``cfg.aggregator``; per
    trajectory, the sigmoid step scores at its step positions)."""
    from ..confidence import lookahead
    from ..scoring import aggregate

    cfg = trainer.cfg
    mask = trainer._step_mask(b)                                          # (B, L) bool
    out = trainer.scorer(b.input_ids, attention_mask=b.attention_mask, step_mask=mask,
                         response_start=b.response_start, lookahead=lookahead(cfg.read_at))
    traj = aggregate(out.step_logits.float(), mask, cfg.aggregator).tolist()
    probs = torch.sigmoid(out.step_logits.float())                        # (B, L)
    steps = [probs[i][mask[i]].tolist() for i in range(len(b))]
    return traj, steps


def evaluate(trainer: Any) -> dict[str, float]:
    """Fixed held-out evaluation of ``trainer`` (see the module docstring): the metrics
    ``eval_auroc``, ``eval_pass1``, ``eval_n`` and, with val problems, ``eval_step_f1``,
    ``eval_step_acc_err``, ``eval_step_acc_ok``, ``eval_threshold``."""
    from ..metrics import auroc, choose_threshold, step_error_f1

    t, cfg = trainer, trainer.cfg
    res: dict[str, Any] = {}
    was_training = t.model.training
    t.model.eval()
    if t.prm is not None:
        t.prm.eval()
    devices = [t.device] if t.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.eval_seed)
            data = {}
            for split, k in (("val", cfg.eval_val_problems), ("test", cfg.eval_test_problems)):
                probs = eval_problems(t, split, k)
                if not probs:
                    continue
                b = rollout(t.policy, t.tokenizer, t.task, probs,
                            n=cfg.eval_samples, temperature=cfg.temperature,
                            max_new_tokens=cfg.max_new_tokens).to(t.device)
                traj, steps = score_batch(t, b)
                data[split] = (b, traj, steps)
    finally:
        t.model.train(was_training)
        if t.prm is not None:
            t.prm.train(was_training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if "test" in data:
            b, traj, steps = data["test"]
            res["eval_auroc"] = auroc(traj, b.correct.tolist())
            res["eval_pass1"] = float(b.correct.float().mean())
            res["eval_n"] = len(b)
            if "val" in data:
                vb, _, vsteps = data["val"]
                thr = choose_threshold(vsteps, vb.first_wrong, split="val")
                f1 = step_error_f1(steps, b.first_wrong, thr)
                res["eval_step_f1"] = float(f1["f1"])
                res["eval_step_acc_err"] = float(f1["acc_err"])
                res["eval_step_acc_ok"] = float(f1["acc_ok"])
                res["eval_threshold"] = float(thr)
    return res
