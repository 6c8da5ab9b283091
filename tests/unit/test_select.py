import math

import numpy as np
import pytest

from metastone_lab import metrics as M
from metastone_lab.errors import ConfigError, UnknownNameError
from metastone_lab.select import SELECTORS, all_selectors, select


def T(answer, score, correct, last=None, signals=None):
    """A trajectory dict; the self-signals default to the SPRM score (so every
    selector runs on it), or ``signals`` (a float for all three, or a dict)."""
    sig = score if signals is None else signals
    if not isinstance(sig, dict):
        sig = {"mean_logprob": sig, "self_certainty": sig, "deepconf": sig}
    return {"answer": answer, "correct": correct, "signals": sig,
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
                                      "last_step", "random", "oracle",
                                      "mean_logprob_bon", "mean_logprob_vote",
                                      "self_certainty_bon", "self_certainty_vote",
                                      "deepconf_bon", "deepconf_vote"}
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


def test_rounding_sized_gaps_are_ties_on_every_thread_count():
    """Issue 16 §8: a float32 forward on another thread count moves a score by a few
    ulps; gaps of that size tie (lowest index wins), whichever way they point."""
    from metastone_lab.select import TIE_ULPS, ties_with

    eps32 = 2.0 ** -23                 # float32 unit roundoff x 2 (one ulp at 1.0)
    for base in (0.731, 3.25, -2.5):
        ulp = eps32 * abs(base)
        near = base + 0.5 * TIE_ULPS * ulp          # well inside the bound
        for pair in ([base, near], [near, base]):   # either order: the first one wins
            g = [T(str(i), v, i == 0, signals={"mean_logprob": v, "self_certainty": v,
                                               "deepconf": v}) for i, v in enumerate(pair)]
            for name in ("sprm_bon", "mean_logprob_bon", "self_certainty_bon", "deepconf_bon"):
                assert SELECTORS.get(name)(g) == 0, (name, pair)
        far = base + 4 * TIE_ULPS * ulp             # a real preference still wins
        assert SELECTORS.get("sprm_bon")([T("a", base, False), T("b", far, True)]) == 1
        assert not ties_with(base, far) and ties_with(base, near)
    assert not ties_with(float("inf"), 1e300) and ties_with(-math.inf, -math.inf)


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


# ------------------------------------------------------- training-free self-signals
SIGNAL_BON = ["mean_logprob_bon", "self_certainty_bon", "deepconf_bon"]
SIGNAL_VOTE = ["mean_logprob_vote", "self_certainty_vote", "deepconf_vote"]


def S(answer, value, correct=False, score=0.5):
    """A trajectory whose three self-signals are all ``value`` (SPRM score fixed)."""
    return T(answer, score, correct, signals=value)


@pytest.mark.parametrize("name", SIGNAL_BON)
def test_signal_bon_reads_its_signal_with_sprm_tie_rules(name):
    sig = name[:-len("_bon")]
    g = [T("1", 0.9, False, signals={"mean_logprob": 0.0, "self_certainty": 0.0,
                                     "deepconf": 0.0}),
         T("2", 0.1, True, signals={"mean_logprob": 0.0, "self_certainty": 0.0,
                                    "deepconf": 0.0, sig: 1.0})]
    assert SELECTORS.get(name)(g) == 1                                  # its signal, not the SPRM
    ties = [S("a", 0.5), S("b", 0.7), S("c", 0.7)]
    assert SELECTORS.get(name)(ties) == 1                               # lowest index on ties
    assert SELECTORS.get(name)([S("a", float("nan")), S("b", -5.0)]) == 1   # NaN ranks last
    assert SELECTORS.get(name)([S("a", -math.inf), S("b", -math.inf)]) == 0
    assert SELECTORS.get(name)([S(None, 2.0), S("b", 1.0)]) == 0        # like sprm_bon: no filter


@pytest.mark.parametrize("name", SIGNAL_BON + SIGNAL_VOTE)
def test_missing_signal_is_a_config_error_naming_the_fix(name):
    g = [{"answer": "1", "correct": True, "scores": {"geometric": 0.5}}]
    with pytest.raises(ConfigError, match="token_stats=True"):
        SELECTORS.get(name)(g)
    with pytest.raises(ConfigError, match="empty"):
        SELECTORS.get(name)([])


@pytest.mark.parametrize("name", SIGNAL_VOTE)
def test_signal_vote_tie_rules(name):
    assert SELECTORS.get(name)([S(None, 1.0), S(None, 2.0)]) == 0      # nobody votes -> 0
    # None answers never win, even with the highest signal
    assert SELECTORS.get(name)([S("a", 0.1), S(None, 9.0), S("a", 0.2)]) in (0, 2)
    # a 2-2 vote tie -> the answer that appears first (Borda with equal signals ranks by
    # index, so its tie needs power 0, where it is a majority vote)
    kw = {"power": 0.0} if name == "self_certainty_vote" else {}
    g = [S("b", 0.3), S("a", 0.3), S("a", 0.3), S("b", 0.3)]
    assert SELECTORS.get(name)(g, **kw) == 0
    # representative of the winner = its highest-signal trajectory
    g = [S("b", 0.2), S("b", 0.4), S("c", 0.1)]
    i = SELECTORS.get(name)(g)
    assert g[i]["answer"] == "b" and i == 1


def test_mean_logprob_vote_weights_exp_mean_logprob():
    # "a": 2 x e^-3 = 0.0996 ; "b": e^-0.5 = 0.607 -> b, although a has more votes
    g = [S("a", -3.0), S("a", -3.0), S("b", -0.5)]
    assert SELECTORS.get("mean_logprob_vote")(g) == 2
    assert SELECTORS.get("majority")(g) == 0
    # -inf (empty response) weighs 0
    assert SELECTORS.get("mean_logprob_vote")([S("a", -math.inf), S("b", -50.0)]) == 1


def test_self_certainty_vote_is_the_papers_borda_count():
    from metastone_lab.select import SELF_CERTAINTY_POWER

    assert SELF_CERTAINTY_POWER == 0.5          # Self-Certainty's --power default
    # ranks by self-certainty: b(9) 1, a(5) 2, a(4) 3, c(3) 4, c(2) 5 (N = 5)
    # weights (N - rank + 1)^0.5: b sqrt5 = 2.24; a sqrt4 + sqrt3 = 3.73; c sqrt2 + 1 = 2.41
    g = [S("a", 5.0), S("b", 9.0), S("a", 4.0), S("c", 3.0), S("c", 2.0)]
    assert SELECTORS.get("self_certainty_vote")(g) == 0
    # power 0 is majority vote; a large power approaches argmax
    g = [S("a", 1.0), S("a", 2.0), S("b", 3.0)]
    assert SELECTORS.get("self_certainty_vote")(g, power=0.0) == 1    # a wins, best rep
    assert SELECTORS.get("self_certainty_vote")(g, power=4.0) == 2    # 3^4 > 2^4 + 1
    # equal values: the lower index takes the better rank (stable sort, as the reference)
    g = [S("a", 1.0), S("b", 1.0)]          # a: 2^0.5 > b: 1
    assert SELECTORS.get("self_certainty_vote")(g) == 0
    g = [S(None, 9.0), S("b", 1.0), S("a", 1.0)]   # None occupies rank 1 but gives no vote
    assert SELECTORS.get("self_certainty_vote")(g) == 1


def test_deepconf_vote_keeps_the_most_confident_then_weights():
    from metastone_lab.select import DEEPCONF_KEEP

    assert DEEPCONF_KEEP == 0.9
    # 10 answered traces: the 10th percentile (0.995) lies between the two least confident,
    # so only the least confident is dropped. All voting: x 0.95 + 4 x 1.1 = 5.35 > y 5.0;
    # after the filter x has 4.4 < y 5.0, so y wins (representative: first of its ties)
    g = [S("x", 0.95)] + [S("y", 1.0)] * 5 + [S("x", 1.1)] * 4
    assert SELECTORS.get("deepconf_vote")(g, keep=1.0) == 6
    assert SELECTORS.get("deepconf_vote")(g) == 1
    # a low keep leaves the most confident trace alone
    g = [S("a", 1.0)] * 4 + [S("b", 2.5)]          # a 4.0 vs b 2.5 when all vote
    assert SELECTORS.get("deepconf_vote")(g, keep=0.1) == 4
    assert SELECTORS.get("deepconf_vote")(g) == 0  # 90%: threshold 1.0, ties kept: a 4.0
    # ties at the threshold are kept (at least one trace always votes)
    g = [S("a", 1.0), S("b", 1.0), S("b", 1.0)]
    assert SELECTORS.get("deepconf_vote")(g, keep=0.01) == 1
    # traces without an answer or with -inf confidence never vote
    g = [S(None, 9.0), S("a", -math.inf), S("b", 0.5)]
    assert SELECTORS.get("deepconf_vote")(g) == 2
    with pytest.raises(ConfigError, match="keep"):
        SELECTORS.get("deepconf_vote")(g, keep=0.0)


def test_signal_selectors_in_accuracy_vs_k_with_reference_grouping():
    """k=1 groups: every selector = pass@1; an informative signal beats random at k=8."""
    rng = np.random.default_rng(1)
    problems = []
    for _ in range(30):
        ts = []
        for _ in range(8):
            c = bool(rng.uniform() < 0.3)
            sig = float(rng.uniform(-0.5, 0.0) if c else rng.uniform(-1.5, -0.4))
            ts.append(T("7" if c else str(rng.integers(0, 3)), 0.5, c, signals=sig))
        problems.append(ts)
    sels = {n: SELECTORS.get(n) for n in SIGNAL_BON + SIGNAL_VOTE + ["random", "oracle"]}
    tab = M.accuracy_vs_k(problems, sels, ks=[1, 8], n_boot=50)
    acc = {(r.selector, r.k): r.value for r in tab.itertuples()}
    assert len({acc[(s, 1)] for s in sels}) == 1
    for s in SIGNAL_BON:
        assert acc[("random", 8)] < acc[(s, 8)] <= acc[("oracle", 8)] + 1e-12
