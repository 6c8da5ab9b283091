"""Answer selectors for best-of-N (method.md §6, §7).

A selector picks one trajectory out of a group of k sampled for the same
problem and returns its **index**::

    SELECTORS.get("sprm_bon")(trajectories, aggregator="geometric", rng=None) -> int

A trajectory is any object (or dict) with ``answer`` (str | None), ``correct``
(bool) and ``scores`` (``{aggregator: float}``), e.g. ``generate.Trajectory``.
For vote selectors the returned index is a representative of the winning
answer, so ``trajectories[i].correct`` is the selection's correctness.

Deterministic tie rules (documented contract)
---------------------------------------------
* Score ties (``sprm_bon``, ``last_step``): the **lowest index** wins. NaN
  scores rank below every number.
* Vote ties (``majority``, ``sprm_weighted_vote``): the answer that **appears
  first** in the group wins.
* ``None`` answers (unparsable / hit max tokens) **never win a vote**; if no
  trajectory has an answer, vote selectors fall back to index 0.
* Representative of a winning answer: ``majority`` -> its first occurrence;
  ``sprm_weighted_vote`` -> its highest-scored trajectory (lowest index on ties).
* ``random`` draws from ``rng`` (a ``numpy.random.Generator``); with ``rng=None``
  it uses a fixed seed 0 so results are reproducible.
* ``oracle`` returns the first correct trajectory (index 0 if none): pass@k.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import ConfigError
from .registry import Registry

Selector = Callable[..., int]
SELECTORS: Registry[Selector] = Registry("selector")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _score(t: Any, aggregator: str) -> float:
    scores = _get(t, "scores") or {}
    if aggregator not in scores:
        raise ConfigError(
            f"selector: trajectory has no {aggregator!r} score (has {sorted(scores)}); "
            f"generate with that aggregator or pick another"
        )
    v = float(scores[aggregator])
    return -math.inf if math.isnan(v) else v


def _check(trajectories: Sequence[Any]) -> None:
    if len(trajectories) == 0:
        raise ConfigError("selector: empty group of trajectories; generate k >= 1 samples")


def _argmax(values: Sequence[float]) -> int:
    best, best_i = -math.inf, 0
    for i, v in enumerate(values):
        if v > best:
            best, best_i = v, i
    return best_i


def _answer(t: Any) -> str | None:
    a = _get(t, "answer")
    return None if a is None else str(a).strip()


@SELECTORS.register("sprm_bon")
def sprm_bon(trajectories: Sequence[Any], *, aggregator: str = "geometric", rng=None) -> int:
    """Argmax trajectory score under ``aggregator`` (the paper's selector)."""
    _check(trajectories)
    return _argmax([_score(t, aggregator) for t in trajectories])


@SELECTORS.register("last_step")
def last_step(trajectories: Sequence[Any], *, aggregator: str = "geometric", rng=None) -> int:
    """Argmax of the last step's score only (an outcome-RM-like baseline).

    Uses ``scores["last"]``; ``aggregator`` is ignored.
    """
    _check(trajectories)
    return _argmax([_score(t, "last") for t in trajectories])


@SELECTORS.register("majority")
def majority(trajectories: Sequence[Any], *, aggregator: str = "geometric", rng=None) -> int:
    """Most frequent non-None answer; returns its first occurrence."""
    _check(trajectories)
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, t in enumerate(trajectories):
        a = _answer(t)
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    if not counts:
        return 0
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return first[best]


@SELECTORS.register("sprm_weighted_vote")
def sprm_weighted_vote(
    trajectories: Sequence[Any], *, aggregator: str = "geometric", rng=None
) -> int:
    """Answer with the largest summed score; returns its highest-scored trajectory."""
    _check(trajectories)
    total: dict[str, float] = {}
    first: dict[str, int] = {}
    rep: dict[str, int] = {}
    for i, t in enumerate(trajectories):
        a = _answer(t)
        if a is None:
            continue
        s = _score(t, aggregator)
        total[a] = total.get(a, 0.0) + (0.0 if s == -math.inf else s)
        first.setdefault(a, i)
        if a not in rep or s > _score(trajectories[rep[a]], aggregator):
            rep[a] = i
    if not total:
        return 0
    best = max(total, key=lambda a: (total[a], -first[a]))
    return rep[best]


@SELECTORS.register("random")
def random(trajectories: Sequence[Any], *, aggregator: str = "geometric", rng=None) -> int:
    """A uniformly random trajectory (expected accuracy = pass@1)."""
    _check(trajectories)
    rng = rng if rng is not None else np.random.default_rng(0)
    return int(rng.integers(0, len(trajectories)))


@SELECTORS.register("oracle")
def oracle(trajectories: Sequence[Any], *, aggregator: str = "geometric", rng=None) -> int:
    """The first correct trajectory, if any (upper bound = pass@k)."""
    _check(trajectories)
    for i, t in enumerate(trajectories):
        if bool(_get(t, "correct", False)):
            return i
    return 0


def select(trajectories: Sequence[Any], name: str = "sprm_bon", *,
           aggregator: str = "geometric", rng=None) -> Any:
    """The trajectory chosen by selector ``name``."""
    return trajectories[SELECTORS.get(name)(trajectories, aggregator=aggregator, rng=rng)]


def all_selectors() -> dict[str, Selector]:
    """``{name: selector}`` for every registered selector (for ``metrics.accuracy_vs_k``)."""
    return {name: SELECTORS.get(name) for name in SELECTORS.names()}
