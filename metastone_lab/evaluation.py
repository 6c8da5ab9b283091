"""The evaluation of best-of-N samples: one function turns sampled problems into the
tidy metric table (``metrics.TABLE_COLUMNS``) that the study, the trainer's held-out
evaluation and the notebooks read."""
from __future__ import annotations

from typing import Any, Sequence


def evaluate(samples: Sequence[Any], *, aggregator: str = "geometric",
             selectors: Sequence[str] | None = None, ks: Sequence[int] | None = None,
             val_samples: Sequence[Any] | None = None, n_boot: int = 1000,
             seed: int = 0, log: bool = True, table_name: str = "bon_eval.json"):
    """Metric tables for best-of-N samples (tidy DataFrame, ``metrics.TABLE_COLUMNS``).

    Rows: accuracy of every selector at every k (``selectors=None``: all
    registered ones, the self-signal ones only when the samples have
    ``signals``; reference grouping + bootstrap
    CI, plus unbiased ``pass@k``), trajectory AUROC / ECE for every aggregator,
    the count of max-token trajectories without an answer and, when
    ``val_samples`` carry step labels, ProcessBench step F1 (threshold chosen on
    ``val_samples``, reported on ``samples``). If ``metastone_lab.tracking`` is
    importable and ``log``, the table goes to ``tracking.active().log_table``.
    """
    import pandas as pd

    from . import metrics
    from .select import SELECTORS, usable_selectors

    groups = [s.trajectories for s in samples]
    if selectors is not None:
        names = list(selectors)
    else:   # all; self-signal selectors only when the samples carry their signals
        names = usable_selectors(groups[0][0]) if groups and groups[0] else SELECTORS.names()
    sel = {n: SELECTORS.get(n) for n in names}
    aggs = sorted(groups[0][0].scores) if groups and groups[0] else []
    parts = [metrics.accuracy_vs_k(groups, sel, ks, aggregator=aggregator, n_boot=n_boot,
                                   seed=seed)]
    if aggs:
        parts.append(metrics.trajectory_metrics(groups, aggs, n_boot=n_boot, seed=seed))
    if val_samples is not None:
        def flat(ss):
            ts = [t for s in ss for t in s.trajectories if t.first_wrong_step is not None]
            return [t.step_scores for t in ts], [t.first_wrong_step for t in ts]
        vs, vl = flat(val_samples)
        ts_, tl = flat(samples)
        if vl and tl:
            parts.append(metrics.step_f1_table(vs, vl, ts_, tl))
    table = pd.concat(parts, ignore_index=True)
    if log:
        _log_table(table, table_name)
    return table


def _log_table(table: Any, name: str) -> None:
    try:
        from . import tracking
    except ImportError:
        return
    tracker = tracking.active()
    if tracker is not None and hasattr(tracker, "log_table"):
        tracker.log_table(table, name)


__all__ = ["evaluate"]
