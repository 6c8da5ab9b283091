import math
import warnings
from itertools import product
from math import comb

import numpy as np
import pytest

from metastone_lab import metrics as M
from metastone_lab.errors import ConfigError


def brute_auroc(s, y):
    pos = [a for a, l in zip(s, y) if l]
    neg = [a for a, l in zip(s, y) if not l]
    tot = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return tot / (len(pos) * len(neg))


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 5, size=30).astype(float)  # many ties
        y = rng.integers(0, 2, size=30)
        if y.min() == y.max():
            continue
        assert M.auroc(s, y) == pytest.approx(brute_auroc(s, y))


def test_auroc_perfect_inverse_and_constant():
    assert M.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert M.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert M.auroc([0.5] * 4, [0, 1, 0, 1]) == 0.5


def test_auroc_one_class_is_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="positives"):
        assert math.isnan(M.auroc([0.1, 0.2], [1, 1]))


def test_auroc_drops_nan():
    with pytest.warns(RuntimeWarning, match="NaN"):
        v = M.auroc([0.1, float("nan"), 0.9, 0.2], [0, 0, 1, 1])
    assert v == pytest.approx(brute_auroc([0.1, 0.9, 0.2], [0, 1, 1]))


def test_first_below_threshold():
    assert M.first_below_threshold([0.9, 0.4, 0.1], 0.5) == 1
    assert M.first_below_threshold([0.9, 0.8], 0.5) == -1
    assert M.first_below_threshold([], 0.5) == -1
    assert M.first_below_threshold([0.9, float("nan")], 0.5) == 1


def test_step_error_f1_hand_example():
    scores = [[0.9, 0.2, 0.1], [0.9, 0.9], [0.9, 0.8, 0.3], [0.3, 0.9], [0.7]]
    labels = [1, -1, 1, -1, None]
    r = M.step_error_f1(scores, labels, 0.5)
    # err trajectories: pred 1 (hit), pred 2 (miss) -> 0.5; ok: pred -1 (hit), pred 0 (miss) -> 0.5
    assert r["acc_err"] == 0.5 and r["acc_ok"] == 0.5 and r["f1"] == 0.5
    assert r["n_err"] == 2 and r["n_ok"] == 2


def test_choose_threshold_picks_a_separating_threshold():
    rng = np.random.default_rng(1)
    scores, labels = [], []
    for _ in range(40):
        n = 4
        wrong = int(rng.integers(-1, n))
        s = list(rng.uniform(0.6, 1.0, n))
        if wrong >= 0:
            s[wrong] = float(rng.uniform(0.0, 0.4))
        scores.append(s)
        labels.append(wrong)
    thr = M.choose_threshold(scores, labels)
    assert 0.4 <= thr <= 0.6
    assert M.step_error_f1(scores, labels, thr)["f1"] == 1.0


def test_choose_threshold_refuses_test_split():
    with pytest.raises(ConfigError, match="validation"):
        M.choose_threshold([[0.5]], [-1], split="test")


def test_pass_at_k_matches_combinatorics():
    for n, c, k in product(range(1, 9), range(0, 9), range(1, 9)):
        if c > n or k > n:
            continue
        exact = 1 - comb(n - c, k) / comb(n, k)
        assert M.pass_at_k(n, c, k) == pytest.approx(exact)
    with pytest.raises(ConfigError):
        M.pass_at_k(4, 5, 1)
    with pytest.raises(ConfigError):
        M.pass_at_k(4, 1, 5)


def test_ece():
    assert M.ece([1.0, 0.0], [1, 0]) == 0.0
    assert M.ece([0.8] * 10, [1] * 4 + [0] * 6) == pytest.approx(0.4)
    assert math.isnan(M.ece([], []))


def test_bootstrap_ci_contains_mean_and_narrows():
    rng = np.random.default_rng(2)
    small = rng.uniform(size=20)
    big = rng.uniform(size=2000)
    lo, hi = M.bootstrap_ci(small)
    assert lo <= small.mean() <= hi
    lo2, hi2 = M.bootstrap_ci(big)
    assert hi2 - lo2 < hi - lo


def _t(correct, score, answer="a"):
    return {"correct": correct, "scores": {"geometric": score}, "answer": answer}


def _argmax(group, aggregator, rng):
    return int(np.argmax([g["scores"][aggregator] for g in group]))


def test_accuracy_vs_k_reference_grouping():
    # K_max = 4. Scores make argmax pick the correct one only in group [2, 3] at k=2.
    trajs = [_t(False, 0.9), _t(True, 0.1), _t(True, 0.8), _t(False, 0.2)]
    table = M.accuracy_vs_k([trajs], {"bon": _argmax}, ks=[1, 2, 4], n_boot=50)
    acc = {(r.selector, r.k): r.value for r in table.itertuples()}
    assert acc[("bon", 1)] == 0.5     # mean correctness of the 4 singletons
    assert acc[("bon", 2)] == 0.5     # groups {0,1} -> 0 wrong, {2,3} -> 2 right
    assert acc[("bon", 4)] == 0.0     # argmax of all four is trajectory 0, wrong
    assert acc[("pass@k", 1)] == 0.5
    assert acc[("pass@k", 2)] == pytest.approx(1 - comb(2, 2) / comb(4, 2))
    assert acc[("pass@k", 4)] == 1.0
    assert list(table.columns) == M.TABLE_COLUMNS
    assert M.gap_closed(table, "bon", 4) == pytest.approx((0.0 - 0.5) / (1.0 - 0.5))


def test_accuracy_vs_k_rejects_bad_k():
    with pytest.raises(ConfigError, match="K_max"):
        M.accuracy_vs_k([[_t(True, 1.0)]], {"bon": _argmax}, ks=[2])


def test_trajectory_metrics_table():
    problems = [[_t(True, 0.9), _t(False, 0.1)], [_t(True, 0.7), _t(False, 0.3)],
                [dict(_t(False, 0.2), hit_max_tokens=True, answer=None)]]
    tab = M.trajectory_metrics(problems, ["geometric"], n_boot=50)
    auc = tab[tab.metric == "auroc"].value.iloc[0]
    assert auc == 1.0
    assert tab[tab.metric == "max_tokens_no_answer"].value.iloc[0] == 1


def test_step_f1_table_uses_val_threshold():
    val = [[0.9, 0.1], [0.9, 0.9]]
    test = [[0.9, 0.55], [0.9, 0.9]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tab = M.step_f1_table(val, [1, -1], test, [1, -1])
    f1 = tab[tab.metric == "step_f1"].value.iloc[0]
    thr = tab[tab.metric == "step_threshold"].value.iloc[0]
    # val threshold = midpoint 0.5 (0.1 flagged, 0.9 not); on test 0.55 is then missed,
    # whereas a threshold chosen on test itself would have reached F1 = 1.
    assert thr == pytest.approx(0.5) and f1 == pytest.approx(0.0)
    assert M.step_error_f1(test, [1, -1], M.choose_threshold(test, [1, -1]))["f1"] == 1.0


# ------------------------------------------------- paired bootstrap of a difference
def test_paired_bootstrap_diff_exact_when_the_difference_is_constant():
    """b = a - 0.25 on every problem: every resample has difference exactly 0.25, however
    much the problems vary (the pairing removes their variance)."""
    rng = np.random.default_rng(0)
    a = rng.choice([0.25, 0.5, 0.75, 1.0], size=40)
    lo, hi = M.paired_bootstrap_diff(a, a - 0.25, n_boot=200)
    assert lo == hi == 0.25
    # unpaired CIs of the two means would overlap heavily: pairing is what makes it exact
    assert M.bootstrap_ci(a)[1] > M.bootstrap_ci(a - 0.25)[0]


def test_paired_bootstrap_diff_excludes_and_includes_zero():
    rng = np.random.default_rng(1)
    base = rng.uniform(size=60).round(1)                 # problem difficulty, shared
    better = np.minimum(base + rng.choice([0.0, 0.1, 0.2], size=60), 1.0)
    lo, hi = M.paired_bootstrap_diff(better, base, n_boot=1000, seed=3)
    assert 0.0 < lo <= hi
    assert lo <= float(np.mean(better - base)) <= hi
    # no true difference: +-0.1 noise symmetric around 0 -> CI includes 0
    noisy = base + np.tile([0.1, -0.1], 30)
    lo, hi = M.paired_bootstrap_diff(noisy, base, n_boot=1000, seed=3)
    assert lo < 0.0 < hi
    # seeded and symmetric in the arguments
    assert M.paired_bootstrap_diff(noisy, base, seed=3) == (lo, hi)
    assert M.paired_bootstrap_diff(base, noisy, seed=3) == pytest.approx((-hi, -lo))
    # NaN pairs dropped; mismatched lengths refused; nothing left -> nan
    assert M.paired_bootstrap_diff([1.0, np.nan], [0.5, 0.0]) == (0.5, 0.5)
    with pytest.raises(ConfigError, match="same problems"):
        M.paired_bootstrap_diff([1.0, 0.0], [1.0])
    assert all(math.isnan(v) for v in M.paired_bootstrap_diff([], []))


def test_selector_diff_ci_uses_the_reference_grouping():
    from metastone_lab.select import SELECTORS

    def t(answer, score, correct):
        return {"answer": answer, "correct": correct, "scores": {"geometric": score}}

    # 8 samples per problem: the correct answer "1" is a minority with the top score, so
    # sprm_bon is right in every group of 4 or 8 and majority in none
    group = [t("1", 0.9, True), t("2", 0.1, False), t("2", 0.2, False), t("2", 0.3, False)]
    problems = [group * 2 for _ in range(5)]
    bon, maj = SELECTORS.get("sprm_bon"), SELECTORS.get("majority")
    assert M.selector_diff_ci(problems, bon, maj, 8) == [1.0, 1.0]
    assert M.selector_diff_ci(problems, bon, maj, 4) == [1.0, 1.0]       # 2 groups of 4
    assert M.per_problem_accuracy(problems, maj, 1) == [0.25] * 5          # 8 groups of 1
    assert M.selector_diff_ci(problems, bon, maj, 16) is None             # k > K_max
    assert M.selector_diff_ci([], bon, maj, 8) is None


def test_study_summary_has_the_self_signal_and_ci_keys():
    """summarize on synthetic samples (no model): every SUMMARY_KEY present; keys for
    k > k_max are None; the CI is a [lo, hi] pair; signal AUROCs in ablation_summary."""
    from metastone_lab import study
    from metastone_lab.generate import ProblemSamples, Trajectory, evaluate, trajectory_signals
    from metastone_lab.scoring import AGGREGATORS
    from metastone_lab.tasks.base import Problem

    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        trajs = []
        for _ in range(8):
            c = bool(rng.uniform() < 0.4)
            lp = [float(rng.uniform(-0.3, 0.0) if c else rng.uniform(-1.0, -0.2))] * 5
            trajs.append(Trajectory(
                text="", token_ids=[1] * 5, step_positions=[], step_scores=[],
                scores=dict.fromkeys(AGGREGATORS.names(),
                                     float(rng.uniform(0.5, 1) if c else rng.uniform(0, 0.6))),
                answer="7" if c else str(rng.integers(0, 3)), correct=c, first_wrong_step=None,
                n_steps=0, hit_max_tokens=False, token_logprobs=lp, token_self_certainty=lp,
                token_confidence=[-x for x in lp],
                signals=trajectory_signals(lp, lp, [-x for x in lp], 16)))
        samples.append(ProblemSamples(Problem(f"p{i}", "q", "7", "q <think>"), trajs))
    table = evaluate(samples, ks=[1, 2, 4, 8], n_boot=20, log=False)
    ev = study.Evaluation(samples, [], table, 0.0)
    s = study.summarize(ev, None)
    assert set(study.SUMMARY_KEYS) <= set(s)
    assert s["self_certainty@8"] is not None and s["self_certainty@32"] is None
    assert s["mean_logprob@32"] is None and s["deepconf@32"] is None
    lo, hi = s["bon_minus_majority@8_ci"]
    assert lo <= hi and s["bon_minus_majority@32_ci"] is None
    assert s["auroc_within"] == study.within_problem_auroc(samples)[0]
    cfg = study.StudyConfig(k_max=8)
    a = study.ablation_summary(cfg, ev, None)
    for sig in ("mean_logprob", "self_certainty", "deepconf"):
        assert 0.0 <= a[f"auroc_within.{sig}"] <= 1.0
    assert (a["bon_minus_majority@8_ci.lo"], a["bon_minus_majority@8_ci.hi"]) == (lo, hi)
