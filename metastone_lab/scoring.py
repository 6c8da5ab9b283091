"""Trajectory scores from step scores.

:func:`aggregate` turns head logits (B, L) read at a step mask (B, L) into one score
per trajectory (B,) in [0, 1]; it applies the sigmoid itself. Registry
:data:`AGGREGATORS` (each maps probabilities (B, L) + mask (B, L) -> (B,)):

- ``geometric`` (reference): ``exp(mean(log(clamp(p, eps))))``;
- ``mean``: arithmetic mean; ``min``: the weakest step; ``last``: the last step
  (an outcome-RM-like score); ``product``: ``prod(p)`` (no clamp; biased to short
  trajectories, as the paper notes).

Zero-step rule (documented, never NaN): a trajectory with no scored step scores
**0.0** (the reference inference behaviour) and is flagged ``True`` by
:func:`aggregate_with_flags`. NaN/inf logits at a scored position raise
:class:`NumericsError` naming the row and position; logits at unscored positions are
ignored.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import NumericsError, ShapeError
from .registry import Registry

Aggregator = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
AGGREGATORS: Registry[Aggregator] = Registry("aggregator")


def _count(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(dim=1).clamp_min(1).to(torch.float32)


@AGGREGATORS.register("geometric")
def _geometric(p: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    logs = torch.where(m, torch.log(p.clamp_min(eps)), torch.zeros_like(p))
    return torch.exp(logs.sum(dim=1) / _count(m))


@AGGREGATORS.register("mean")
def _mean(p: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.where(m, p, torch.zeros_like(p)).sum(dim=1) / _count(m)


@AGGREGATORS.register("min")
def _min(p: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.where(m, p, torch.ones_like(p)).min(dim=1).values


@AGGREGATORS.register("last")
def _last(p: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    L = p.shape[1]
    pos = torch.arange(L, device=p.device).expand_as(m)
    idx = torch.where(m, pos, torch.full_like(pos, -1)).max(dim=1).values.clamp_min(0)
    return p.gather(1, idx[:, None]).squeeze(1)


@AGGREGATORS.register("product")
def _product(p: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.where(m, p, torch.ones_like(p)).prod(dim=1)


def _check_inputs(step_logits: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    if step_logits.dim() != 2:
        raise ShapeError(f"step_logits must be (B, L), got shape {tuple(step_logits.shape)}")
    if step_mask.shape != step_logits.shape:
        raise ShapeError(
            f"step_mask shape {tuple(step_mask.shape)} does not match step_logits shape "
            f"{tuple(step_logits.shape)}"
        )
    mask = step_mask.to(device=step_logits.device).bool()
    bad = mask & ~torch.isfinite(step_logits)
    if bool(bad.any()):
        b, pos = (int(v) for v in bad.nonzero()[0])
        raise NumericsError(
            f"step logit at row {b}, position {pos} is {float(step_logits[b, pos])} "
            f"({int(bad.sum())} non-finite scored positions in total); check the head/backbone "
            f"for overflow (fp16?) or a diverged training step"
        )
    return mask


def aggregate_with_flags(step_logits: torch.Tensor, step_mask: torch.Tensor,
                         method: str = "geometric", eps: float = 1e-6
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B,) float32 in [0, 1], empty (B,) bool). Empty rows score 0.0."""
    fn = AGGREGATORS.get(method)
    mask = _check_inputs(step_logits, step_mask)
    logits = torch.where(mask, step_logits.detach().float(), torch.zeros((), device=mask.device))
    scores = fn(torch.sigmoid(logits), mask, eps)
    empty = ~mask.any(dim=1)
    return torch.where(empty, torch.zeros_like(scores), scores), empty


def aggregate(step_logits: torch.Tensor, step_mask: torch.Tensor, method: str = "geometric",
              eps: float = 1e-6) -> torch.Tensor:
    """Trajectory scores (B,) in [0, 1] from head logits (B, L) read where ``step_mask``
    (B, L) is True. Applies the sigmoid; zero-step rows score 0.0. No gradient."""
    return aggregate_with_flags(step_logits, step_mask, method, eps)[0]


def aggregate_scores(step_scores: Sequence[float], method: str = "geometric",
                     eps: float = 1e-6) -> float:
    """One trajectory's score from its step *probabilities* (already sigmoided)."""
    fn = AGGREGATORS.get(method)
    if len(step_scores) == 0:
        return 0.0
    p = torch.tensor([list(map(float, step_scores))], dtype=torch.float64)
    if not bool(torch.isfinite(p).all()):
        k = int((~torch.isfinite(p)).nonzero()[0, 1])
        raise NumericsError(f"step score {k} is {step_scores[k]}; scores must be finite in [0, 1]")
    if bool((p < 0).any() or (p > 1).any()):
        raise NumericsError("step scores must be probabilities in [0, 1] (apply sigmoid to logits)")
    return float(fn(p, torch.ones_like(p, dtype=torch.bool), eps)[0])


__all__ = ["AGGREGATORS", "aggregate", "aggregate_with_flags", "aggregate_scores"]
