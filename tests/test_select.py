import numpy as np
import pytest

from metastone_lab import metrics as M
from metastone_lab.errors import ConfigError, UnknownNameError
from metastone_lab.select import SELECTORS, all_selectors, select


def T(answer, score, correct, last=None):
    return {"answer": answer, "correct": correct,
            "scores": {"geometric": score, "last": score if last is None else last}}


GROUP = [
    T("3", 0.20, False),
    T("5", 0.90, True),
    T("3", 0.30, False),
    T("3", 0.25, False),
    T(None, 0.99, False),  # hit max tokens: highest score but no answer
    T("5", 0.80, True, last=0.01),
]


def test_registry_has_all_selectors():
    assert set(SELECTORS.names()) == {"sprm_bon", "majority", "sprm_weighted_vote",
                                      "last_step", "random", "oracle"}
    with pytest.raises(UnknownNameError, match="majority"):
        SELECTORS.get("majorty")


def test_sprm_bon_takes_argmax_even_without_answer():
    assert SELECTORS.get("sprm_bon")(GROUP) == 4


def test_majority_ignores_none_answers():
    i = SELECTORS.get("majority")(GROUP)
    assert GROUP[i]["answer"] == "3" and i == 0


def test_weighted_vote_sums_scores_and_returns_best_representative():
    # "3": 0.75, "5": 1.70 (None with 0.99 never wins)
    i = SELECTORS.get("sprm_weighted_vote")(GROUP)
    assert i == 1 and GROUP[i]["correct"]


def test_last_step_uses_last_score():
    group = [T("1", 0.9, True, last=0.1), T("2", 0.1, False, last=0.5)]
    assert SELECTORS.get("last_step")(group) == 1


def test_tie_rules_are_deterministic():
    g = [T("a", 0.5, False), T("b", 0.5, True), T("b", 0.5, True), T("a", 0.5, False)]
    assert SELECTORS.get("sprm_bon")(g) == 0          # lowest index on score ties
    assert SELECTORS.get("majority")(g) == 0          # 2-2 tie -> answer seen first
    assert SELECTORS.get("sprm_weighted_vote")(g) == 0
    nan = [T("a", float("nan"), False), T("b", 0.1, True)]
    assert SELECTORS.get("sprm_bon")(nan) == 1        # NaN ranks below numbers


def test_all_none_answers_fall_back_to_index_zero():
    g = [T(None, 0.2, False), T(None, 0.9, False)]
    assert SELECTORS.get("majority")(g) == 0
    assert SELECTORS.get("sprm_weighted_vote")(g) == 0


def test_oracle_and_random():
    assert SELECTORS.get("oracle")(GROUP) == 1
    assert SELECTORS.get("oracle")([T("x", 0.1, False)]) == 0
    rng = np.random.default_rng(0)
    picks = {SELECTORS.get("random")(GROUP, rng=rng) for _ in range(200)}
    assert picks == set(range(len(GROUP)))
    assert SELECTORS.get("random")(GROUP) == SELECTORS.get("random")(GROUP)


def test_errors():
    with pytest.raises(ConfigError, match="empty"):
        SELECTORS.get("sprm_bon")([])
    with pytest.raises(ConfigError, match="'min'"):
        SELECTORS.get("sprm_bon")(GROUP, aggregator="min")


def test_select_and_accuracy_vs_k_integration():
    assert select(GROUP, "majority")["answer"] == "3"
    rng = np.random.default_rng(3)
    problems = []
    for _ in range(30):
        ts = []
        for _ in range(8):
            c = bool(rng.uniform() < 0.3)
            ts.append(T("7" if c else str(rng.integers(0, 3)),
                        float(rng.uniform(0.5, 1.0) if c else rng.uniform(0.0, 0.6)), c))
        problems.append(ts)
    tab = M.accuracy_vs_k(problems, all_selectors(), ks=[1, 2, 8], n_boot=100)
    acc = {(r.selector, r.k): r.value for r in tab.itertuples()}
    # informative scores: BoN beats random and is bounded by the oracle/pass@k
    assert acc[("sprm_bon", 8)] > acc[("random", 8)]
    assert acc[("sprm_bon", 8)] <= acc[("oracle", 8)] + 1e-12
    assert acc[("oracle", 8)] == pytest.approx(acc[("pass@k", 8)])  # one group of 8 = all samples
    # at k=1 every selector is the same (one candidate per group)
    vals = {acc[(s, 1)] for s in SELECTORS.names()}
    assert len(vals) == 1
