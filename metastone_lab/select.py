"""Answer selectors for best-of-N (method.md §6, §7).

A selector picks one trajectory out of a group of k sampled for the same
problem and returns its **index**::

    SELECTORS.get("sprm_bon")(trajectories, aggregator="geometric", rng=None) -> int

A trajectory is any object (or dict) with ``answer`` (str | None), ``correct``
(bool) and ``scores`` (``{aggregator: float}``), e.g. ``generate.Trajectory``.
The training-free selectors read ``signals`` (``{signal: float}``, higher = more
confident, computed during generation: ``generate.trajectory_signals``) instead:
``mean_logprob``, ``self_certainty`` (Kang et al. 2025, arXiv 2502.18581) and
``deepconf`` (lowest group confidence, Fu et al. 2025, arXiv 2508.15260).
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
* Ties are exact where exact arithmetic makes them: the sampler gives samples that
  share a prefix bit-identical token stats and head logits over it
  (:mod:`metastone_lab.prefix_ties`), so these rules break them the same way on any
  thread count, batch composition or machine.
* Score and signal argmaxes (``sprm_bon``, ``last_step``, ``<s>_bon``) treat values
  within :data:`TIE_ULPS` float32 ulps of the maximum as tied with it
  (:func:`ties_with`): such a gap is rounding (it moves with the thread count), so
  the lowest index of them wins on every machine. Vote totals and a winning answer's
  representative (same answer, same correctness) compare exactly.

Self-signal selectors (``aggregator`` is ignored; a missing signal is a
ConfigError naming the fix). NaN signals rank below every number.

* ``<s>_bon`` for s in mean_logprob, self_certainty, deepconf: argmax of
  ``signals[s]``, same tie rule as ``sprm_bon`` (lowest index).
* ``mean_logprob_vote``: vote weighted by ``exp(mean_logprob)`` (the geometric
  mean token probability, in (0, 1]; -inf counts 0).
* ``self_certainty_vote``: the paper's Borda vote (Self-Certainty
  ``src/voting_from_list.py``): the whole group is ranked by self-certainty
  (rank 1 = most certain; equal values: lower index ranks first) and a
  trajectory with an answer gives ``(N - rank + 1) ** p`` to it, p =
  :data:`SELF_CERTAINTY_POWER` = 0.5 (their default; p = 0 is majority vote).
* ``deepconf_vote``: DeepConf offline (``deepconf/utils.py``
  ``filter_top_confidence`` + ``weighted_majority_vote``): among the trajectories
  with an answer and a finite confidence, keep those with ``deepconf >=`` the
  ``100 * (1 - eta)`` percentile (numpy linear interpolation; ties at the
  threshold are kept, so at least one is), eta = :data:`DEEPCONF_KEEP` = 0.9
  (the paper's conservative "DeepConf-high"; its aggressive 10% keeps a single
  trace at k <= 10, i.e. it would be ``deepconf_bon``), then a vote weighted by
  the kept trajectories' confidence.
* For all three votes: vote ties -> the answer that appears first in the group;
  ``None`` answers never vote (index 0 if nobody votes); the representative of
  the winning answer is its highest-signal trajectory (lowest index on ties).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import ConfigError
from .registry import Registry

Selector = Callable[..., int]
SELECTORS: Registry[Selector] = Registry("selector")

#: Borda power of ``self_certainty_vote`` (Self-Certainty's ``--power`` default).
SELF_CERTAINTY_POWER = 0.5
#: fraction of the answered traces ``deepconf_vote`` keeps (DeepConf's eta).
DEEPCONF_KEEP = 0.9
#: the trajectory signal each self-signal selector reads (see the module docstring)
SIGNAL_OF: dict[str, str] = {}


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


def _signal(t: Any, name: str) -> float:
    signals = _get(t, "signals") or {}
    if name not in signals:
        raise ConfigError(
            f"selector: trajectory has no {name!r} signal (has {sorted(signals)}); generate "
            f"with GenerateConfig(token_stats=True) (the default when score=True) so the "
            f"per-token stats are captured during decoding, or pick an SPRM selector"
        )
    v = float(signals[name])
    return -math.inf if math.isnan(v) else v


def _check(trajectories: Sequence[Any]) -> None:
    if len(trajectories) == 0:
        raise ConfigError("selector: empty group of trajectories; generate k >= 1 samples")


#: Two scores closer than this many float32 units in the last place (of the larger
#: magnitude) are a tie. Scores and signals are computed from float32 values, so a gap
#: below a few float32 ulps is not a preference the model expressed: it is rounding,
#: and rounding moves with the reduction order (torch thread count, BLAS kernel,
#: machine). Measured (issue 16 §8, 500 problems x 32, 1 vs 2 threads): two DeepConf
#: lowest-window means of different windows tied exactly on 1 thread and differed by
#: 0.03 ulps on 2, which flipped a pick; 16 ulps (relative 1.9e-6) makes such a pair a
#: tie on both. It does not absorb every movement: single values moved by up to 40 ulps
#: (mean log-prob) and 220 ulps (SPRM score) there, so a real gap smaller than that can
#: still flip a pick (none did on those 500 problems).
TIE_ULPS = 16
_F32_EPS = 2.0 ** -23


def ties_with(a: float, b: float) -> bool:
    """Whether ``a`` and ``b`` are equal up to float32 rounding (:data:`TIE_ULPS`)."""
    if a == b:
        return True
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= TIE_ULPS * _F32_EPS * max(abs(a), abs(b), 2.0 ** -126)


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; values that tie with it up to float32 rounding
    (:func:`ties_with`) count as equal and the lowest index of them wins."""
    best, best_i = -math.inf, 0
    for i, v in enumerate(values):
        if v > best:
            best, best_i = v, i
    for i, v in enumerate(values[:best_i]):
        if ties_with(v, best):
            return i
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


# ------------------------------------------------------------- self-signals
def _signal_vote(trajectories: Sequence[Any], values: Sequence[float],
                 weights: Sequence[float | None]) -> int:
    """Weighted vote: ``weights[i]`` (None = no vote) goes to trajectory i's answer;
    returns the winning answer's highest-``values`` trajectory (rules: module doc)."""
    total: dict[str, float] = {}
    first: dict[str, int] = {}
    rep: dict[str, int] = {}
    for i, (t, w) in enumerate(zip(trajectories, weights)):
        a = _answer(t)
        if a is None or w is None:
            continue
        total[a] = total.get(a, 0.0) + w
        first.setdefault(a, i)
        if a not in rep or values[i] > values[rep[a]]:
            rep[a] = i
    if not total:
        return 0
    best = max(total, key=lambda a: (total[a], -first[a]))
    return rep[best]


def _bon_selector(signal: str) -> Selector:
    def bon(trajectories: Sequence[Any], *, aggregator: str = "geometric", rng=None) -> int:
        _check(trajectories)
        return _argmax([_signal(t, signal) for t in trajectories])

    bon.__name__ = f"{signal}_bon"
    bon.__doc__ = f"Argmax of the trajectory's ``{signal}`` signal (lowest index on ties)."
    return bon


for _s in ("mean_logprob", "self_certainty", "deepconf"):
    SELECTORS.register(f"{_s}_bon")(_bon_selector(_s))
    SIGNAL_OF[f"{_s}_bon"] = SIGNAL_OF[f"{_s}_vote"] = _s


@SELECTORS.register("mean_logprob_vote")
def mean_logprob_vote(trajectories: Sequence[Any], *, aggregator: str = "geometric",
                      rng=None) -> int:
    """Vote weighted by ``exp(mean_logprob)`` (geometric-mean token probability)."""
    _check(trajectories)
    v = [_signal(t, "mean_logprob") for t in trajectories]
    return _signal_vote(trajectories, v, [math.exp(x) for x in v])


@SELECTORS.register("self_certainty_vote")
def self_certainty_vote(trajectories: Sequence[Any], *, aggregator: str = "geometric",
                        rng=None, power: float = SELF_CERTAINTY_POWER) -> int:
    """Borda vote by self-certainty rank: weight ``(N - rank + 1) ** power``."""
    _check(trajectories)
    v = [_signal(t, "self_certainty") for t in trajectories]
    n = len(v)
    order = sorted(range(n), key=lambda i: -v[i])      # stable: lower index first on ties
    weight = [0.0] * n
    for rank, i in enumerate(order, start=1):
        weight[i] = float(n - rank + 1) ** power
    return _signal_vote(trajectories, v, weight)


@SELECTORS.register("deepconf_vote")
def deepconf_vote(trajectories: Sequence[Any], *, aggregator: str = "geometric", rng=None,
                  keep: float = DEEPCONF_KEEP) -> int:
    """DeepConf offline: keep the top ``keep`` fraction of answered traces by
    lowest-group confidence, then a confidence-weighted majority vote."""
    _check(trajectories)
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"deepconf_vote: keep must be in (0, 1], got {keep}")
    v = [_signal(t, "deepconf") for t in trajectories]
    ok = [i for i, t in enumerate(trajectories) if _answer(t) is not None and math.isfinite(v[i])]
    if not ok:
        return 0
    threshold = float(np.percentile([v[i] for i in ok], 100.0 * (1.0 - keep)))
    kept = {i for i in ok if v[i] >= threshold} or {max(ok, key=lambda i: v[i])}
    return _signal_vote(trajectories, v, [v[i] if i in kept else None for i in range(len(v))])


def usable_selectors(trajectory: Any) -> list[str]:
    """Every registered selector except the self-signal ones whose signal
    ``trajectory`` lacks (samples generated without ``token_stats``)."""
    signals = _get(trajectory, "signals") or {}
    return [n for n in SELECTORS.names() if n not in SIGNAL_OF or SIGNAL_OF[n] in signals]


def select(trajectories: Sequence[Any], name: str = "sprm_bon", *,
           aggregator: str = "geometric", rng=None) -> Any:
    """The trajectory chosen by selector ``name``."""
    return trajectories[SELECTORS.get(name)(trajectories, aggregator=aggregator, rng=rng)]


def all_selectors() -> dict[str, Selector]:
    """``{name: selector}`` for every registered selector (for ``metrics.accuracy_vs_k``)."""
    return {name: SELECTORS.get(name) for name in SELECTORS.names()}
