"""Evaluation metrics for reflective best-of-N (method.md §6, §7).

Everything here works on plain Python / numpy data so that the trainer, the
generation engine and notebooks can share it:

- :func:`auroc` - trajectory-level AUROC of scores vs outcome (ties = average rank).
- :func:`first_below_threshold`, :func:`step_error_f1`, :func:`choose_threshold` -
  ProcessBench-style earliest-error detection.
- :func:`pass_at_k` - the unbiased estimator of Chen et al. (2021).
- :func:`accuracy_vs_k` - accuracy of every selector at every k <= K_max from one
  large run, with the reference grouping method and bootstrap CIs over problems.
- :func:`bootstrap_ci`, :func:`ece`, :func:`trajectory_metrics`.
- :func:`paired_bootstrap_diff` / :func:`selector_diff_ci` - CI of the accuracy
  difference of two selectors on the same problems (paired problem bootstrap).

Tables are tidy pandas DataFrames with the columns of :data:`TABLE_COLUMNS`
(one row per metric x selector/aggregator x k).

Conventions
-----------
* Step indices are 0-based over the trajectory's scored steps; ``-1`` means
  "no wrong step" (ProcessBench). ``step_scores[i]`` is the score of step ``i``.
* A *trajectory* passed to :func:`accuracy_vs_k` / :func:`trajectory_metrics` is
  any object with attributes ``answer`` (str | None), ``correct`` (bool) and
  ``scores`` (``{aggregator: float}``), e.g. ``generate.Trajectory``; dicts with
  those keys work too.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import ConfigError

TABLE_COLUMNS = ["metric", "selector", "aggregator", "k", "value", "ci_low", "ci_high", "n"]


def _get(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


# --------------------------------------------------------------------------- AUROC
def auroc(scores: Sequence[float], labels: Sequence[bool | int]) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely positive).

    Computed as the Mann-Whitney U statistic with average ranks, so tied scores
    count 1/2. Pairs with a NaN score or label are dropped (with a warning).
    Returns ``nan`` (with a warning) when one class is empty.
    """
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=float).reshape(-1)
    if s.shape != y.shape:
        raise ConfigError(f"auroc: {s.size} scores but {y.size} labels; pass one label per score")
    ok = ~(np.isnan(s) | np.isnan(y))
    if not ok.all():
        warnings.warn(f"auroc: dropped {int((~ok).sum())} NaN score/label pairs", RuntimeWarning)
        s, y = s[ok], y[ok]
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        warnings.warn(
            f"auroc: undefined with {n_pos} positives and {n_neg} negatives; returning nan",
            RuntimeWarning,
        )
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# ------------------------------------------------- ranking within a problem
def per_group_auroc(scores, labels, groups) -> list[float]:
    """AUROC among each group's items (ties 1/2), for groups holding both classes."""
    by: dict[Any, tuple[list, list]] = {}
    for s, y, g in zip(scores, labels, groups):
        by.setdefault(g, ([], []))[0 if y else 1].append(float(s))
    vals = []
    for pos, neg in by.values():
        if pos and neg:
            p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
            vals.append(float(((p > n) + 0.5 * (p == n)).mean()))
    return vals


def per_group_best(scores, labels, groups) -> list[float]:
    """Per group: 1.0 if its highest-scored item (first on ties) is positive, else 0.0."""
    best: dict[Any, tuple[float, bool]] = {}
    for s, y, g in zip(scores, labels, groups):
        if g not in best or float(s) > best[g][0]:
            best[g] = (float(s), bool(y))
    return [float(c) for _, c in best.values()]


def within_group_auroc(scores: Sequence[float], labels: Sequence[bool | int],
                       groups: Sequence[Any]) -> tuple[float, int]:
    """Mean over groups of the AUROC among that group's items (ties count 1/2),
    over the groups that hold both classes. Returns (value or nan, n groups)."""
    vals = per_group_auroc(scores, labels, groups)
    return (float(np.mean(vals)) if vals else float("nan")), len(vals)


def best_of_group(scores: Sequence[float], labels: Sequence[bool | int],
                  groups: Sequence[Any]) -> float:
    """Accuracy of picking each group's highest-scored item (first on ties)."""
    vals = per_group_best(scores, labels, groups)
    return float(np.mean(vals)) if vals else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=float)
    # boundaries of runs of equal values
    edges = np.flatnonzero(np.diff(xs) != 0) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(x)]])
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + 1 + b) / 2.0  # mean of ranks a+1..b
    return ranks


# ------------------------------------------------------------ ProcessBench step F1
def first_below_threshold(step_scores: Sequence[float], threshold: float) -> int:
    """Index of the first step whose score is ``< threshold``; ``-1`` if none.

    A NaN score counts as below the threshold (an unreadable step is flagged).
    """
    for i, v in enumerate(step_scores):
        v = float(v)
        if math.isnan(v) or v < threshold:
            return i
    return -1


def step_error_f1(
    step_scores: Sequence[Sequence[float]],
    first_wrong: Sequence[int | None],
    threshold: float,
) -> dict[str, float]:
    """ProcessBench earliest-error metric for a scalar PRM.

    ``step_scores[i]`` are the step scores of trajectory ``i``; ``first_wrong[i]``
    is its label (0-based index of the earliest wrong step, ``-1`` if the
    trajectory has no wrong step, ``None`` if unlabelled - skipped).
    The prediction is :func:`first_below_threshold`.

    Returns ``acc_err`` (exact match on trajectories with an error), ``acc_ok``
    (predicted ``-1`` on error-free ones), ``f1`` = their harmonic mean (0 when
    both are 0; nan with a warning when a class is empty), and the counts
    ``n_err``, ``n_ok``.
    """
    if len(step_scores) != len(first_wrong):
        raise ConfigError(
            f"step_error_f1: {len(step_scores)} score lists but {len(first_wrong)} labels"
        )
    hit_err = n_err = hit_ok = n_ok = 0
    for scores, label in zip(step_scores, first_wrong):
        if label is None:
            continue
        pred = first_below_threshold(scores, threshold)
        if int(label) < 0:
            n_ok += 1
            hit_ok += pred == -1
        else:
            n_err += 1
            hit_err += pred == int(label)
    acc_err = hit_err / n_err if n_err else float("nan")
    acc_ok = hit_ok / n_ok if n_ok else float("nan")
    if not n_err or not n_ok:
        warnings.warn(
            f"step_error_f1: F1 undefined with {n_err} erroneous and {n_ok} correct "
            f"labelled trajectories; returning nan",
            RuntimeWarning,
        )
        f1 = float("nan")
    elif acc_err + acc_ok == 0:
        f1 = 0.0
    else:
        f1 = 2 * acc_err * acc_ok / (acc_err + acc_ok)
    return {"acc_err": acc_err, "acc_ok": acc_ok, "f1": f1, "n_err": n_err, "n_ok": n_ok}


def choose_threshold(
    step_scores: Sequence[Sequence[float]],
    first_wrong: Sequence[int | None],
    *,
    split: str = "val",
    max_candidates: int = 256,
) -> float:
    """Threshold maximising :func:`step_error_f1` on **validation** data.

    Candidates are the midpoints between consecutive distinct step scores (plus
    one below the minimum and one above the maximum), thinned to at most
    ``max_candidates`` quantiles. Ties in F1 go to the smallest threshold
    (deterministic). ``split="test"`` is refused: choosing a threshold on the
    test set would leak labels into the reported F1.
    """
    if split == "test":
        raise ConfigError(
            "choose_threshold: refusing split='test'; choose the threshold on the "
            "validation split and apply it to test with step_error_f1"
        )
    flat = np.array([float(v) for s in step_scores for v in s], dtype=float)
    flat = np.unique(flat[~np.isnan(flat)])
    if flat.size == 0:
        warnings.warn("choose_threshold: no step scores; returning 0.5", RuntimeWarning)
        return 0.5
    mids = (flat[:-1] + flat[1:]) / 2.0
    cands = np.concatenate([[flat[0] - 1e-6], mids, [flat[-1] + 1e-6]])
    if cands.size > max_candidates:
        idx = np.unique(np.linspace(0, cands.size - 1, max_candidates).round().astype(int))
        cands = cands[idx]
    best_thr, best_f1 = float(cands[0]), -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for thr in cands:
            f1 = step_error_f1(step_scores, first_wrong, float(thr))["f1"]
            if not math.isnan(f1) and f1 > best_f1:
                best_thr, best_f1 = float(thr), f1
    if best_f1 < 0:
        warnings.warn(
            "choose_threshold: F1 undefined on this data (one label class is empty); "
            f"returning {best_thr:.4g}",
            RuntimeWarning,
        )
    return best_thr


# ------------------------------------------------------------------- pass@k, ECE
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    ``n`` samples of which ``c`` are correct. Computed as a stable product.
    """
    if not (0 <= c <= n) or k < 1:
        raise ConfigError(f"pass_at_k: need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ConfigError(f"pass_at_k: k={k} exceeds the number of samples n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def ece(scores: Sequence[float], labels: Sequence[bool | int], n_bins: int = 10) -> float:
    """Expected calibration error of probabilities ``scores`` in [0, 1].

    Equal-width bins; ``sum_b |mean(score_b) - mean(label_b)| * n_b / n``.
    NaN pairs are dropped; empty input gives nan.
    """
    if n_bins < 1:
        raise ConfigError(f"ece: n_bins must be >= 1, got {n_bins}")
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=float).reshape(-1)
    ok = ~(np.isnan(s) | np.isnan(y))
    s, y = np.clip(s[ok], 0.0, 1.0), y[ok]
    if s.size == 0:
        return float("nan")
    b = np.minimum((s * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for i in range(n_bins):
        m = b == i
        if m.any():
            total += abs(s[m].mean() - y[m].mean()) * m.sum()
    return float(total / s.size)


def bootstrap_ci(
    values: Sequence[float],
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stat: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(values)``, resampling the values (problems).

    Returns ``(lo, hi)``; ``(nan, nan)`` for empty input. NaNs are dropped.
    """
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    if stat is np.mean:
        boots = v[idx].mean(axis=1)
    else:
        boots = np.array([stat(v[i]) for i in idx])
    return float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))


def paired_bootstrap_diff(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap CI of ``mean(a) - mean(b)`` for PAIRED values.

    ``a``, ``b``: (n,) per-problem values of two methods on the same n problems
    (e.g. accuracies of two selectors). Each of the ``n_boot`` replicates draws
    n problem indices with replacement and applies the SAME indices to both, so
    problem difficulty cancels (a paired test: far narrower than two independent
    CIs). Pairs with a NaN on either side are dropped; ``(nan, nan)`` when none
    is left. Seeded (``seed``): the same inputs give the same interval.
    Returns ``(lo, hi)``, the ``alpha/2`` and ``1 - alpha/2`` quantiles.
    """
    x = np.asarray(a, dtype=float).reshape(-1)
    y = np.asarray(b, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ConfigError(f"paired_bootstrap_diff: {x.size} values vs {y.size}; the two "
                          f"methods must be measured on the same problems")
    ok = ~(np.isnan(x) | np.isnan(y))
    d = (x - y)[ok]                                          # (n,) paired differences
    if d.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))     # (n_boot, n), shared by a and b
    boots = d[idx].mean(axis=1)                              # (n_boot,)
    return float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))


def per_problem_accuracy(
    problems: Sequence[Sequence[Any]],
    select: Callable[..., int],
    k: int,
    *,
    aggregator: str = "geometric",
    rng: Any = None,
    k_max: int | None = None,
) -> list[float]:
    """Per problem, the mean correctness of ``select`` over its ``k_max // k``
    consecutive groups of ``k`` (the reference grouping, see :func:`accuracy_vs_k`).
    ``k_max`` defaults to the smallest number of trajectories over problems."""
    k_max = min(len(p) for p in problems) if k_max is None else k_max
    n_groups = k_max // k
    rng = rng if rng is not None else np.random.default_rng(0)
    per_problem = []
    for trajs in problems:
        hits = []
        for g in range(n_groups):
            group = list(trajs[g * k:(g + 1) * k])
            j = int(select(group, aggregator=aggregator, rng=rng))
            hits.append(bool(_get(group[j], "correct")))
        per_problem.append(float(np.mean(hits)))
    return per_problem


def selector_diff_ci(
    problems: Sequence[Sequence[Any]],
    select_a: Callable[..., int],
    select_b: Callable[..., int],
    k: int,
    *,
    aggregator: str = "geometric",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> list[float] | None:
    """``[lo, hi]``: paired-bootstrap CI (:func:`paired_bootstrap_diff`) of
    accuracy(``select_a``) - accuracy(``select_b``) at ``k``, each problem's
    accuracy from the reference grouping (:func:`per_problem_accuracy`).
    None when ``k`` exceeds K_max (or there are no problems)."""
    if not problems:
        return None
    k_max = min(len(p) for p in problems)
    if k < 1 or k > k_max:
        return None
    acc_a = per_problem_accuracy(problems, select_a, k, aggregator=aggregator, k_max=k_max)
    acc_b = per_problem_accuracy(problems, select_b, k, aggregator=aggregator, k_max=k_max)
    lo, hi = paired_bootstrap_diff(acc_a, acc_b, n_boot=n_boot, alpha=alpha, seed=seed)
    return [lo, hi]


# ------------------------------------------------------------------ accuracy vs k
def default_ks(k_max: int) -> list[int]:
    """Powers of two up to ``k_max`` (plus ``k_max`` itself)."""
    ks, k = [], 1
    while k <= k_max:
        ks.append(k)
        k *= 2
    if ks[-1] != k_max:
        ks.append(k_max)
    return ks


def _row(metric: str, value: float, *, selector: str = "", aggregator: str = "",
         k: int | None = None, ci: tuple[float, float] = (float("nan"), float("nan")),
         n: int = 0) -> dict[str, Any]:
    return {"metric": metric, "selector": selector, "aggregator": aggregator,
            "k": k, "value": float(value), "ci_low": ci[0], "ci_high": ci[1], "n": int(n)}


def accuracy_vs_k(
    problems: Sequence[Sequence[Any]],
    selectors: Mapping[str, Callable[..., int]],
    ks: Sequence[int] | None = None,
    *,
    aggregator: str = "geometric",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
):
    """Accuracy of every selector at every k from one large run (method.md §6).

    ``problems[i]`` is the list of K trajectories sampled for problem ``i``.
    K_max is the smallest K over problems (extra trajectories are ignored).
    For each k the first ``(K_max // k) * k`` trajectories are split into
    ``K_max // k`` **consecutive** groups; the selector picks one trajectory per
    group (``selector(group, aggregator=..., rng=...) -> index``); the problem's
    accuracy is the mean correctness over its groups, and the reported accuracy
    the mean over problems with a percentile-bootstrap CI over problems.
    When k does not divide K_max the remainder is dropped (the reference only
    uses divisors: 32/k for k in 2, 8, 32).

    An extra selector row ``pass@k`` holds the unbiased estimator
    :func:`pass_at_k` computed from all K_max samples.

    Returns a tidy DataFrame (:data:`TABLE_COLUMNS`, ``metric="accuracy"``).
    """
    import pandas as pd

    if not problems:
        raise ConfigError("accuracy_vs_k: no problems given")
    k_max = min(len(p) for p in problems)
    if k_max < 1:
        raise ConfigError("accuracy_vs_k: a problem has zero trajectories; generate k >= 1")
    ks = list(ks) if ks is not None else default_ks(k_max)
    bad = [k for k in ks if k < 1 or k > k_max]
    if bad:
        raise ConfigError(f"accuracy_vs_k: ks {bad} outside 1..K_max={k_max}")
    rows = []
    rng = np.random.default_rng(seed)
    for name, select in selectors.items():
        for k in ks:
            per_problem = per_problem_accuracy(problems, select, k, aggregator=aggregator,
                                               rng=rng, k_max=k_max)
            ci = bootstrap_ci(per_problem, n_boot=n_boot, alpha=alpha, seed=seed)
            rows.append(_row("accuracy", np.mean(per_problem), selector=name,
                             aggregator=aggregator, k=k, ci=ci, n=len(per_problem)))
    for k in ks:
        per_problem = [
            pass_at_k(k_max, sum(bool(_get(t, "correct")) for t in trajs[:k_max]), k)
            for trajs in problems
        ]
        ci = bootstrap_ci(per_problem, n_boot=n_boot, alpha=alpha, seed=seed)
        rows.append(_row("accuracy", np.mean(per_problem), selector="pass@k",
                         aggregator="", k=k, ci=ci, n=len(per_problem)))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def gap_closed(table, selector: str = "sprm_bon", k: int | None = None) -> float:
    """Fraction of the pass@1 -> pass@k gap closed by ``selector`` at ``k``.

    ``(acc_sel(k) - pass@1) / (pass@k - pass@1)``; nan when the gap is 0.
    ``k`` defaults to the largest k in the table.
    """
    acc = table[table.metric == "accuracy"]
    k = int(acc.k.max()) if k is None else k

    def val(sel: str, kk: int) -> float:
        r = acc[(acc.selector == sel) & (acc.k == kk)]
        if r.empty:
            raise ConfigError(f"gap_closed: no accuracy row for selector {sel!r} at k={kk}")
        return float(r.value.iloc[0])

    p1, pk, s = val("pass@k", 1), val("pass@k", k), val(selector, k)
    return float("nan") if pk - p1 <= 0 else (s - p1) / (pk - p1)


def trajectory_metrics(
    problems: Sequence[Sequence[Any]],
    aggregators: Sequence[str],
    *,
    n_bins: int = 10,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
):
    """AUROC and ECE of trajectory scores vs correctness for each aggregator.

    All trajectories of all problems are pooled. The AUROC CI resamples
    problems (a cluster bootstrap), so correlated samples of one problem move
    together. Also a ``max_tokens_no_answer`` count row (trajectories that hit
    the token limit without an answer; they count as incorrect). Tidy DataFrame.
    """
    import pandas as pd

    rows = []
    flat = [t for trajs in problems for t in trajs]
    n = len(flat)
    labels = np.array([bool(_get(t, "correct")) for t in flat], dtype=float)
    sizes = np.array([len(p) for p in problems])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for agg in aggregators:
        scores = np.array([float(_get(t, "scores")[agg]) for t in flat], dtype=float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            value = auroc(scores, labels)
            ci = _cluster_bootstrap_auroc(scores, labels, sizes, offsets, n_boot, alpha, seed)
        rows.append(_row("auroc", value, aggregator=agg, ci=ci, n=n))
        rows.append(_row("ece", ece(scores, labels, n_bins), aggregator=agg, n=n))
    no_answer = sum(
        1 for t in flat
        if _maybe(t, "hit_max_tokens", False) and _maybe(t, "answer", None) is None
    )
    rows.append(_row("max_tokens_no_answer", no_answer, n=n))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _maybe(obj: Any, name: str, default: Any) -> Any:
    try:
        return _get(obj, name)
    except (KeyError, AttributeError):
        return default


def _cluster_bootstrap_auroc(scores, labels, sizes, offsets, n_boot, alpha, seed):
    if len(sizes) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(sizes), size=len(sizes))
        idx = np.concatenate([np.arange(offsets[i], offsets[i] + sizes[i]) for i in pick])
        v = auroc(scores[idx], labels[idx])
        if not math.isnan(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def step_f1_table(
    val_scores: Sequence[Sequence[float]],
    val_labels: Sequence[int | None],
    test_scores: Sequence[Sequence[float]],
    test_labels: Sequence[int | None],
):
    """Choose the threshold on validation, report ProcessBench metrics on test.

    Tidy DataFrame rows ``step_threshold``, ``step_acc_err``, ``step_acc_ok``, ``step_f1``.
    """
    import pandas as pd

    thr = choose_threshold(val_scores, val_labels, split="val")
    r = step_error_f1(test_scores, test_labels, thr)
    n = r["n_err"] + r["n_ok"]
    rows = [_row("step_threshold", thr, n=n), _row("step_acc_err", r["acc_err"], n=r["n_err"]),
            _row("step_acc_ok", r["acc_ok"], n=r["n_ok"]), _row("step_f1", r["f1"], n=n)]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)
