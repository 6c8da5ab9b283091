"""Trajectory aggregation: hand-computed values, zero-step rule, NaN handling."""
import math

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tolerance import EPS64, rounding_bound  # noqa: E402

from metastone_lab.errors import NumericsError, ShapeError, UnknownNameError
from metastone_lab.scoring import AGGREGATORS, aggregate, aggregate_scores, aggregate_with_flags


def logit(p: float) -> float:
    return math.log(p / (1 - p))


PROBS = [0.9, 0.5, 0.2]  # row 0 scored at positions 0, 2, 3; row 1 has no step


@pytest.fixture
def batch():
    logits = torch.zeros(2, 5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for pos, p in zip([0, 2, 3], PROBS):
        logits[0, pos] = logit(p)
        mask[0, pos] = True
    logits[0, 4] = 7.0  # unscored: must be ignored
    logits[1] = 3.0
    return logits, mask


EXPECTED = {
    "geometric": (0.9 * 0.5 * 0.2) ** (1 / 3),
    "mean": (0.9 + 0.5 + 0.2) / 3,
    "min": 0.2,
    "last": 0.2,
    "product": 0.9 * 0.5 * 0.2,
}


# Rounding bound of one aggregate (tests/_tolerance.py): the logit's own rounding
# (1), sigmoid (3), clamp and log (2), a sum over 3 steps (3), the division or product
# (2), exp (1): n = 12, on terms of magnitude max(1, max |log p|) (the log-space
# aggregators sum logs; an error in a log is a relative error of the exp).
N_AGG = 12
SCALE = max(1.0, max(abs(math.log(p)) for p in PROBS))


def test_registry_names():
    assert AGGREGATORS.names() == sorted(EXPECTED)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_hand_computed_and_empty_row(batch, method):
    logits, mask = batch
    scores, empty = aggregate_with_flags(logits, mask, method)
    assert scores.shape == (2,)
    assert scores[0].item() == pytest.approx(EXPECTED[method], rel=rounding_bound(N_AGG, SCALE))
    assert scores[1].item() == 0.0 and empty.tolist() == [False, True]
    assert torch.equal(aggregate(logits, mask, method), scores)
    assert aggregate_scores(PROBS, method) == pytest.approx(
        EXPECTED[method], rel=rounding_bound(N_AGG, SCALE, eps=EPS64))  # float64 path


def test_geometric_clamps_at_eps():
    logits = torch.tensor([[-200.0, 0.0]])  # sigmoid(-200) == 0 in float32
    mask = torch.ones(1, 2, dtype=torch.bool)
    s = aggregate(logits, mask, "geometric", eps=1e-6)
    # float32: eps and 0.5 (2), two logs (2), their sum and the division (2), exp (1),
    # on log-space terms of magnitude |log 1e-6| = 13.8 (tests/_tolerance.py)
    assert s.item() == pytest.approx(math.sqrt(1e-6 * 0.5),
                                     rel=rounding_bound(7, abs(math.log(1e-6))))
    assert aggregate_scores([0.0, 0.5], "geometric", eps=1e-6) == pytest.approx(math.sqrt(1e-6 * 0.5))


def test_all_empty_never_nan():
    s, e = aggregate_with_flags(torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.bool))
    assert s.tolist() == [0.0, 0.0, 0.0] and e.all()
    assert aggregate_scores([], "mean") == 0.0


def test_nan_at_scored_position_names_row_and_position():
    logits = torch.zeros(2, 4)
    logits[1, 2] = float("nan")
    logits[0, 3] = float("nan")  # unscored -> ignored
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    mask[0, 1] = True
    with pytest.raises(NumericsError, match="row 1, position 2"):
        aggregate(logits, mask)
    mask[1, 2] = False
    assert torch.isfinite(aggregate(logits, mask)).all()


def test_bad_inputs():
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(2, 4\)"):
        aggregate(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(UnknownNameError, match="geometric"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "median")
    with pytest.raises(NumericsError):
        aggregate_scores([0.5, float("nan")])
    with pytest.raises(NumericsError, match="sigmoid"):
        aggregate_scores([1.5])
