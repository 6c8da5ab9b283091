"""The self-supervised process reward (SPR) loss of MetaStone-S1 and its ablations.

Every scored step of a trajectory gets the trajectory outcome as its label
(``y = outcome > 0.5``). With ``x`` the head logit of a step (B, L) read where
``step_mask`` (B, L) is True, the reference loss (method.md §4, reference actor code) is::

    keep   = step_mask & valid_row & filter          filter: (x > 0 & y) | (x < 0 & ~y)
    n_pos  = allreduce(sum(keep & y) + 1)            +1 smoothing on every rank, then summed
    n_neg  = allreduce(sum(keep & ~y) + 1)
    w      = pos_boost * (n_neg / (n_pos + n_neg)) * (keep & y)
           +             (n_pos / (n_pos + n_neg)) * (keep & ~y)
    loss   = sum(BCEWithLogits(x, y) * w) / (sum(w) + 1e-5)

Interpretations (each switchable):

- ``filter`` (pseudo-label filter): a step counts only if its prediction already agrees
  with the outcome. A logit of exactly 0 agrees with neither label and is dropped, as in
  the reference. ``filter=False`` keeps every masked step.
- ``balance``: the class counts are of the **kept** steps (after the filter), exactly as
  the reference computes them from ``valid * filter`` masks. ``balance=False`` gives
  every kept step weight 1 (positives still ``pos_boost``).
- The +1 smoothing is added to the local counts *before* the all-reduce, so with R ranks
  the effective smoothing is R (reference behaviour). The reduction is injectable
  (``reduce_counts``); by default it is ``torch.distributed.all_reduce(SUM)`` when a
  process group is initialised and the identity otherwise.
- ``valid`` (B,) bool optionally drops whole trajectories (the reference drops rollouts
  whose reward is the format-failure value 0.1).
- A batch with no kept step returns a loss of exactly 0.0 that is still connected to
  the graph (zero gradients, never NaN), like the reference's ``* 0.0`` branch.

Diagnostics (floats): ``n_steps`` (masked steps of valid rows), ``kept_fraction``,
``n_pos``/``n_neg`` (kept steps, local, before smoothing), ``pos_weight``/``neg_weight``,
``weight_sum`` (the local ``sum(w)``, for combining ranks' losses),
``score_correct_mean``/``score_incorrect_mean`` (mean over trajectories of the
geometric-mean step score ``exp(mean(log(clamp(sigmoid(x), 1e-6))))``; trajectories
without a step are skipped, 0.0 when none is left), ``score_gap`` and the trajectory
counts ``n_correct``/``n_incorrect`` behind those means. These are the reference's
"aha moment" curves.

Registry :data:`LOSSES` holds the named variants used by the ablations.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError, NumericsError, ShapeError
from .registry import Registry

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
LossFn = Callable[..., "tuple[torch.Tensor, dict[str, float]]"]
LOSSES: Registry[LossFn] = Registry("loss")

EPS_NORM = 1e-5
EPS_SCORE = 1e-6


def default_reduce_counts(counts: torch.Tensor) -> torch.Tensor:
    """Sum ``counts`` over data-parallel ranks when torch.distributed is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        counts = counts.clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts


def _check(step_logits, step_mask, outcome, valid):
    if step_logits.dim() != 2:
        raise ShapeError(f"step_logits must be (B, L), got shape {tuple(step_logits.shape)}")
    B = step_logits.shape[0]
    if step_mask.shape != step_logits.shape:
        raise ShapeError(
            f"step_mask shape {tuple(step_mask.shape)} does not match step_logits shape "
            f"{tuple(step_logits.shape)}"
        )
    if outcome.shape != (B,):
        raise ShapeError(
            f"outcome must be (B,)=({B},) (one label per trajectory), got shape {tuple(outcome.shape)}"
        )
    if valid is not None and valid.shape != (B,):
        raise ShapeError(f"valid must be (B,)=({B},), got shape {tuple(valid.shape)}")


def last_step_mask(step_mask: torch.Tensor) -> torch.Tensor:
    """Keep only the last True position of each row of ``step_mask`` (B, L)."""
    B, L = step_mask.shape
    pos = torch.arange(L, device=step_mask.device).expand(B, L)
    last = torch.where(step_mask, pos, torch.full_like(pos, -1)).max(dim=1).values
    return step_mask & (pos == last[:, None])


def trajectory_scores(step_logits: torch.Tensor, mask: torch.Tensor, eps: float = EPS_SCORE
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(geometric-mean score (B,), has_step (B,)) with no gradient."""
    with torch.no_grad():
        logp = torch.log(torch.sigmoid(step_logits.float()).clamp_min(eps))
        logp = torch.where(mask, logp, torch.zeros_like(logp))
        n = mask.sum(dim=1)
        score = torch.exp(logp.sum(dim=1) / n.clamp_min(1))
        has = n > 0
        return torch.where(has, score, torch.zeros_like(score)), has


def spr_loss(
    step_logits: torch.Tensor,
    step_mask: torch.Tensor,
    outcome: torch.Tensor,
    filter: bool = True,
    balance: bool = True,
    pos_boost: float = 1.5,
    *,
    valid: torch.Tensor | None = None,
    last_step_only: bool = False,
    reduce_counts: ReduceFn | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SPR loss (scalar) and diagnostics.

    Args:
        step_logits: (B, L) float head logits, read only where ``step_mask`` is True.
        step_mask: (B, L) bool positions of the scored steps.
        outcome: (B,) trajectory outcome, 1 (> 0.5) for a correct trajectory.
        filter / balance / pos_boost: the reference switches (see the module docstring).
        valid: optional (B,) bool; False drops the whole trajectory.
        last_step_only: score only the last masked step of each row (outcome-RM-like).
        reduce_counts: maps the local ``[n_pos + 1, n_neg + 1]`` (2,) tensor to the
            global one; default all-reduce SUM when distributed, else identity.
    """
    _check(step_logits, step_mask, outcome, valid)
    if not pos_boost > 0:
        raise ConfigError(f"spr_loss: pos_boost must be > 0, got {pos_boost!r}")
    device = step_logits.device
    mask = step_mask.to(device).bool()
    if valid is not None:
        mask = mask & valid.to(device).bool()[:, None]
    if last_step_only:
        mask = last_step_mask(mask)
    bad = mask & ~torch.isfinite(step_logits)
    if bool(bad.any()):
        b, p = (int(v) for v in bad.nonzero()[0])
        raise NumericsError(
            f"spr_loss: step logit at row {b}, position {p} is {float(step_logits[b, p])}; "
            f"check the head/backbone (lower the learning rate, use fp32)"
        )
    y_row = outcome.to(device).float() > 0.5                      # (B,)
    y = y_row[:, None].expand_as(mask)                             # (B, L)

    x = step_logits[mask].float()                                  # (N,) scored steps
    yl = y[mask]
    if filter:
        keep = ((x > 0) & yl) | ((x < 0) & ~yl)
    else:
        keep = torch.ones_like(yl)
    pos = (keep & yl).float()
    neg = (keep & ~yl).float()
    n_pos_local, n_neg_local = pos.sum(), neg.sum()
    if balance:
        counts = torch.stack([n_pos_local + 1.0, n_neg_local + 1.0]).detach()
        counts = (reduce_counts or default_reduce_counts)(counts)
        total = counts[0] + counts[1]
        pos_w, neg_w = counts[1] / total, counts[0] / total
    else:
        pos_w = neg_w = torch.tensor(1.0, device=device)
    w = pos_boost * pos_w * pos + neg_w * neg
    bce = F.binary_cross_entropy_with_logits(x, yl.float(), reduction="none")
    loss = (bce * w).sum() / (w.sum() + EPS_NORM)  # empty x -> exactly 0.0, graph kept

    score, has = trajectory_scores(step_logits, mask)
    vrow = has if valid is None else has & valid.to(device).bool()
    corr, inc = vrow & y_row, vrow & ~y_row
    n_steps = int(mask.sum())

    def mean_of(sel: torch.Tensor) -> float:
        return float(score[sel].mean()) if bool(sel.any()) else 0.0

    diag = {
        "n_steps": float(n_steps),
        "kept_fraction": float(keep.float().sum()) / n_steps if n_steps else 0.0,
        "n_pos": float(n_pos_local),
        "n_neg": float(n_neg_local),
        "pos_weight": float(pos_w),
        "neg_weight": float(neg_w),
        "weight_sum": float(w.sum()),
        "score_correct_mean": mean_of(corr),
        "score_incorrect_mean": mean_of(inc),
        "n_correct": float(corr.sum()),
        "n_incorrect": float(inc.sum()),
    }
    diag["score_gap"] = diag["score_correct_mean"] - diag["score_incorrect_mean"]
    return loss, diag


def _variant(name: str, doc: str, **fixed) -> LossFn:
    fn = functools.partial(spr_loss, **fixed)
    fn.__doc__ = doc  # type: ignore[attr-defined]
    LOSSES.register(name)(fn)
    return fn


_variant("spr", "The reference SPR loss: filter, class balance, positive boost 1.5.")
_variant("spr_no_filter", "SPR without the pseudo-label filter.", filter=False)
_variant("spr_no_balance", "SPR without class-balance weights (positives still x pos_boost).",
         balance=False)
_variant("spr_no_boost", "SPR with pos_boost=1.0.", pos_boost=1.0)
_variant("bce_all_steps", "Plain BCE on every step: no filter, no balance, no boost.",
         filter=False, balance=False, pos_boost=1.0)
_variant("last_step_only", "SPR (all reference switches) on the last scored step of each row "
         "only: an outcome-RM-like head.", last_step_only=True)


def get_loss(name: str, **overrides) -> LossFn:
    """A registered loss with keyword overrides, e.g. ``get_loss('spr', pos_boost=2.0)``."""
    fn = LOSSES.get(name)
    return functools.partial(fn, **overrides) if overrides else fn


__all__ = ["spr_loss", "LOSSES", "get_loss", "last_step_mask", "trajectory_scores",
           "default_reduce_counts"]
