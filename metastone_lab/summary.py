"""The numbers a study reports: the headline summary (:data:`SUMMARY_KEYS`, what
``runs/<spec>/summary.json`` and the terminal table hold) and the ablation summary
(every selector, aggregator and curve the report reads), both from a held-out
:class:`~metastone_lab.held_out.Evaluation`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .held_out import Evaluation, table_value

if TYPE_CHECKING:   # annotations only: study imports this module
    from .study import StudyConfig, Trained

#: the headline numbers every study run reports (runs/<spec>/summary.json).
SUMMARY_KEYS = ["pass@1", "pass@32", "bon@2", "bon@8", "bon@32", "majority@8", "majority@32",
                "weighted@8", "weighted@32", "auroc", "step_f1", "aha_onset_step",
                "wall_seconds",
                # training-free self-signal baselines (best-of-N by each signal)
                "self_certainty@8", "self_certainty@32", "mean_logprob@32", "deepconf@32",
                # the SPRM's within-problem ranking, and [lo, hi] 95% paired-bootstrap
                # CIs of sprm_bon - majority accuracy (problems resampled)
                "auroc_within", "bon_minus_majority@8_ci", "bon_minus_majority@32_ci"]


def summarize(ev: Evaluation, trained: Trained | None = None, *, aggregator: str = "geometric",
              wall_seconds: float | None = None) -> dict[str, Any]:
    """The headline numbers (:data:`SUMMARY_KEYS`) from an evaluation table.

    Keys for a k larger than the run's ``k_max`` are None. ``aha_onset_step``
    comes from the training run (None if no onset was detected).
    ``self_certainty@k`` / ``mean_logprob@k`` / ``deepconf@k``: best-of-N accuracy
    by that self-signal (None when the samples carry no signals).
    ``auroc_within``: :func:`within_problem_auroc` under ``aggregator``.
    ``bon_minus_majority@k_ci``: ``[lo, hi]``, 95% CI of sprm_bon - majority
    accuracy (:func:`metrics.selector_diff_ci`: reference grouping, problems
    resampled, paired).
    """
    from .metrics import selector_diff_ci
    from .select import SELECTORS

    t = ev.table
    out: dict[str, Any] = {"pass@1": table_value(t, "accuracy", "pass@k", 1),
                           "pass@32": table_value(t, "accuracy", "pass@k", 32)}
    for k in (2, 8, 32):
        out[f"bon@{k}"] = table_value(t, "accuracy", "sprm_bon", k)
    for k in (8, 32):
        out[f"majority@{k}"] = table_value(t, "accuracy", "majority", k)
        out[f"weighted@{k}"] = table_value(t, "accuracy", "sprm_weighted_vote", k)
    out["auroc"] = table_value(t, "auroc", aggregator=aggregator)
    out["step_f1"] = table_value(t, "step_f1")
    for key, sel, k in (("self_certainty@8", "self_certainty_bon", 8),
                        ("self_certainty@32", "self_certainty_bon", 32),
                        ("mean_logprob@32", "mean_logprob_bon", 32),
                        ("deepconf@32", "deepconf_bon", 32)):
        out[key] = table_value(t, "accuracy", sel, k)
    out["auroc_within"] = within_problem_auroc(ev.test, aggregator)[0]
    groups = [ps.trajectories for ps in ev.test]
    for k in (8, 32):
        out[f"bon_minus_majority@{k}_ci"] = selector_diff_ci(
            groups, SELECTORS.get("sprm_bon"), SELECTORS.get("majority"), k,
            aggregator=aggregator)
    res = trained.result if trained is not None else None
    out["aha_onset_step"] = getattr(res, "aha_onset_step", None)
    out["wall_seconds"] = wall_seconds
    out["n_test"] = len(ev.test)
    out["eval_seconds"] = ev.seconds
    return out


def summary_frame(summary: dict[str, Any]):
    """The summary as a one-row DataFrame with the :data:`SUMMARY_KEYS` columns."""
    import pandas as pd

    return pd.DataFrame([{k: summary.get(k) for k in SUMMARY_KEYS}])


def param_counts(trained: Trained) -> dict[str, int]:
    """Parameter counts of what generates and what scores: ``policy`` (backbone +
    LoRA) and ``scorer`` (the SPRM head; for ``separate_prm`` the second backbone
    and its head)."""
    pc = dict(getattr(trained.result, "param_counts", None) or {})
    if pc:
        return {"policy": int(pc.get("backbone", 0)) + int(pc.get("lora", 0)),
                "scorer": int(pc.get("extra_for_scoring", pc.get("head", 0)))}
    rm = trained.model
    if rm is None:
        return {}
    head = sum(p.numel() for p in rm.head.parameters())
    return {"policy": sum(p.numel() for p in rm.parameters()) - head, "scorer": head}


def _log_rows(trained: Trained | None) -> list[dict]:
    res = getattr(trained, "result", None)
    rows = getattr(res, "log_rows", None)
    if rows is not None:
        return list(rows)
    lp = getattr(res, "log_path", None)
    if lp is not None and Path(lp).is_file():
        from .plots import read_jsonl

        return read_jsonl(lp)
    return []


def within_problem_auroc(samples, aggregator: str = "geometric") -> tuple[float | None, int]:
    """Mean over problems of the AUROC of trajectory scores (correct vs incorrect)
    among the k samples of the SAME problem, over the problems that have both
    (ties count 1/2). This is what best-of-N needs; the pooled AUROC also rewards
    a head that only recognises easy problems. Returns (value or None, n problems)."""
    from .metrics import within_group_auroc

    scores, labels, groups = [], [], []
    for pi, ps in enumerate(samples):
        for t in ps.trajectories:
            scores.append(t.scores.get(aggregator, 0.0))
            labels.append(bool(t.correct))
            groups.append(pi)
    value, n = within_group_auroc(scores, labels, groups)
    return (value if n else None), n


#: training-curve series copied into the ablation summary as ``curve.<name>@<step>``
CURVE_SERIES = ("score_correct", "score_incorrect", "eval_auroc")


def ablation_summary(cfg: StudyConfig, ev: Evaluation, trained: Trained | None, *,
                     wall_seconds: float | None = None) -> dict[str, Any]:
    """:func:`summarize` plus what the ablation report needs, all numeric:

    - ``acc.<selector>@<k>``: accuracy of every selector at every k (the curves);
    - ``auroc.<agg>``, ``bon@<k>.<agg>``, ``weighted@<k>.<agg>`` for every aggregator
      (k in 2/8/32 up to ``k_max``), computed on the SAME scored trajectories;
    - ``auroc_within.<agg>`` / ``auroc_within`` (:func:`within_problem_auroc`, the
      ranking among one problem's samples that best-of-N relies on) and
      ``n_mixed_problems`` (problems with both correct and incorrect samples);
    - ``auroc_within.<signal>`` for the training-free signals (mean_logprob,
      self_certainty, deepconf; None without signals) on the same samples, and
      ``bon_minus_majority@<k>_ci.lo`` / ``.hi`` (the summary's CI pair as numbers);
    - ``params_policy``, ``params_scorer``, ``gen_tokens_mean`` (generated tokens per
      trajectory, prompt excluded) and ``compute@<k>`` = (policy + scorer params) x
      generated tokens x k, the thinking compute per problem at effort k;
    - ``curve.<series>@<step>``: the training curves (aha-moment figure).
    """
    from .evaluation import evaluate
    from .scoring import AGGREGATORS

    out = summarize(ev, trained, aggregator=cfg.aggregator, wall_seconds=wall_seconds)
    t = ev.table
    acc = t[(t.metric == "accuracy")]
    ks = sorted({int(k) for k in acc.k.dropna()})
    for _, r in acc.iterrows():
        out[f"acc.{r.selector}@{int(r.k)}"] = float(r.value)
    read_ks = [k for k in (2, 8, 32) if k in ks]
    for agg in AGGREGATORS.names():
        out[f"auroc.{agg}"] = table_value(t, "auroc", aggregator=agg)
        if read_ks:
            ta = evaluate(ev.test, aggregator=agg, selectors=["sprm_bon", "sprm_weighted_vote"],
                          ks=read_ks, n_boot=20, seed=cfg.seed, log=False)
            for k in read_ks:
                out[f"bon@{k}.{agg}"] = table_value(ta, "accuracy", "sprm_bon", k)
                out[f"weighted@{k}.{agg}"] = table_value(ta, "accuracy", "sprm_weighted_vote", k)
    for agg in AGGREGATORS.names():
        out[f"auroc_within.{agg}"], n_mixed = within_problem_auroc(ev.test, agg)
    out["auroc_within"] = out.get(f"auroc_within.{cfg.aggregator}")
    out["n_mixed_problems"] = n_mixed
    from .token_signals import SIGNALS
    from .metrics import within_group_auroc

    for sig in SIGNALS:   # the same within-problem ranking by each training-free signal
        rows = [(t.signals[sig], t.correct, pi) for pi, ps in enumerate(ev.test)
                for t in ps.trajectories if sig in (t.signals or {})]
        v, n = within_group_auroc(*zip(*rows)) if rows else (None, 0)
        out[f"auroc_within.{sig}"] = v if n else None
    for k in (8, 32):     # the CI pair as two numbers (metric stores keep numbers only)
        ci = out.get(f"bon_minus_majority@{k}_ci")
        if ci is not None:
            out[f"bon_minus_majority@{k}_ci.lo"], out[f"bon_minus_majority@{k}_ci.hi"] = ci
    pc = param_counts(trained) if trained is not None else {}
    lens = [len(tr.token_ids) for ps in ev.test for tr in ps.trajectories]
    out["gen_tokens_mean"] = sum(lens) / len(lens) if lens else None
    if pc:
        out["params_policy"], out["params_scorer"] = pc["policy"], pc["scorer"]
        if lens:
            for k in ks:
                out[f"compute@{k}"] = float((pc["policy"] + pc["scorer"])
                                            * out["gen_tokens_mean"] * k)
    for row in _log_rows(trained):
        for s in CURVE_SERIES:
            if isinstance(row.get(s), (int, float)) and "step" in row:
                out[f"curve.{s}@{int(row['step'])}"] = float(row[s])
    return out
