"""The one held-out evaluation path: sample, score, tabulate.

Both the trainer's periodic evaluation (``Trainer.evaluate``, logged as
``eval_*`` during training) and the study's final evaluation
(:func:`metastone_lab.study.evaluate_tts`) call :func:`evaluate_held_out`:

1. :func:`metastone_lab.generate.generate_best_of_n` samples the problems with the
   one sampler (:mod:`metastone_lab.sampling`) and scores every step in flight;
2. with an external PRM (``separate_prm``) :func:`rescore` replaces those scores by
   a re-forward through the PRM;
3. :func:`metastone_lab.evaluation.evaluate` turns the samples into the tidy metric
   table (accuracy vs k per selector, AUROC / ECE per aggregator, step F1 with the
   threshold chosen on the validation samples).

Under ``accelerate launch`` (``WORLD_SIZE`` > 1) steps 1-2 are sharded
(:mod:`metastone_lab.shard`): each process samples (and re-scores) a contiguous block
of the test and of the validation problems, whole engine batches each, every
problem seeded by its index in the full list; the samples are gathered in problem
order on every process, which then builds the same table from all of them. Only
process 0 logs it. So the result equals a single-process run's (tested on 2 CPU
processes in ``tests/integration/test_eval_accelerate.py``), and every process must
call :func:`evaluate_held_out` (it is a collective; ``shard=False`` opts out).

:func:`headline` reads the numbers the trainer logs from that table, so a curve's
last point and the final evaluation of the same model on the same problems agree.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Sequence

from .evaluation import evaluate


@dataclass
class Evaluation:
    """Held-out best-of-N samples and their metric table."""

    test: list            # list[ProblemSamples], k trajectories per test problem
    val: list             # list[ProblemSamples] for the step-threshold choice
    table: Any            # tidy DataFrame (metrics.TABLE_COLUMNS)
    seconds: float


def rescore(samples: Sequence[Any], scorer: Any, tokenizer: Any, cfg: Any) -> Sequence[Any]:
    """Re-score ``samples`` (list of ProblemSamples) in place with an external PRM
    ``scorer`` (a ReflectiveModel): one re-forward per trajectory, the step mask of
    ``cfg`` (a GenerateConfig: segmenter, options, read position)."""
    from .generate import reforward_scores
    from .sampling import encode_prompt
    from .scoring import AGGREGATORS, aggregate_scores

    for ps in samples:
        prompt = encode_prompt(tokenizer, ps.problem.prompt)
        seqs = [prompt + list(t.token_ids) for t in ps.trajectories]
        res = reforward_scores(scorer, tokenizer, seqs, segmenter=cfg.segmenter,
                               read_at=cfg.read_at, segmenter_options=cfg.segmenter_options,
                               prompt_lens=[len(prompt)] * len(seqs))
        for t, r in zip(ps.trajectories, res):
            t.step_scores = r["scores"]
            t.step_positions = r["positions"]
            t.n_steps = len(r["scores"])
            t.scores = {a: aggregate_scores(r["scores"], a) for a in AGGREGATORS.names()}
    return samples


def evaluate_held_out(model: Any, tokenizer: Any, task: Any, test_problems: Sequence[Any], *,
                      test_config: Any, val_problems: Sequence[Any] = (),
                      val_config: Any = None, scorer: Any = None,
                      aggregator: str = "geometric", selectors: Sequence[str] | None = None,
                      ks: Sequence[int] | None = None, seed: int = 0, n_boot: int = 1000,
                      log: bool = True, shard: bool = True) -> Evaluation:
    """Sample ``test_config.k`` trajectories per test problem (``val_config.k`` per
    validation problem, default: ``test_config``), score them (``scorer``: an external
    PRM instead of ``model``'s own head) and build the metric table. ``log``: the table
    goes to the active tracker (``bon_eval.json``; on process 0 only).

    Under a distributed launch the problems are sharded across the processes and the
    samples gathered on every process (see the module docstring); ``shard=False``:
    this process samples every problem itself (for a call made on one rank only)."""
    from . import shard as sharding

    t0 = time.perf_counter()
    val_config = val_config or test_config
    n_val = len(val_problems)

    def sample(blocks: list[range]) -> list[list]:
        t_idx, v_idx = blocks
        test = _sample(model, tokenizer, task, test_problems, t_idx, test_config)
        val = _sample(model, tokenizer, task, val_problems, v_idx, val_config) if n_val else []
        if scorer is not None:
            rescore(test, scorer, tokenizer, test_config)
            rescore(val, scorer, tokenizer, val_config)
        return [_strip(test), _strip(val)]

    sizes = [len(test_problems), n_val]
    if shard:
        test, val = sharding.run(sample, sizes, groups=[_per_batch(test_config),
                                                        _per_batch(val_config)])
    else:
        test, val = sample([range(n) for n in sizes])
    test, val = _attach(test, test_problems), _attach(val, val_problems)
    table = evaluate(test, aggregator=aggregator, selectors=selectors, ks=ks,
                     val_samples=val or None, seed=seed, n_boot=n_boot,
                     log=log and (not shard or sharding.is_main_process()))
    return Evaluation(test, val, table, time.perf_counter() - t0)


def _sample(model: Any, tokenizer: Any, task: Any, problems: Sequence[Any], idx: range,
            cfg: Any) -> list:
    """ProblemSamples of ``problems[i] for i in idx``, each seeded by its index ``i``."""
    from .generate import generate_best_of_n

    if not idx:
        return []
    if idx == range(len(problems)):   # everything (one process): the plain call
        return generate_best_of_n(model, tokenizer, problems, task, cfg)
    return generate_best_of_n(model, tokenizer, [problems[i] for i in idx], task, cfg,
                              indices=idx)


def _per_batch(cfg: Any) -> int:
    """Problems per batch of the engine under ``cfg`` (a GenerateConfig): a shard of
    whole batches decodes each problem in the batch it gets in a single process, on
    the same shapes, hence bit-identically on the same machine and thread count."""
    return max(1, cfg.batch_rows // cfg.k) if cfg.batch_rows else 1


def _strip(samples: list) -> list:
    """The samples without their problems (each process has those already): only the
    trajectories travel between processes, whatever the task's problem objects are."""
    return [dataclasses.replace(ps, problem=None) for ps in samples]


def _attach(samples: list, problems: Sequence[Any]) -> list:
    for ps, p in zip(samples, problems):
        ps.problem = p
    return samples


def table_value(table: Any, metric: str, selector: str = "", k: int | None = None,
                aggregator: str | None = None) -> float | None:
    """One value of a metric table (None when the table has no such row)."""
    rows = table[(table.metric == metric) & (table.selector == selector)]
    if k is not None:
        rows = rows[rows.k == k]
    if aggregator is not None:
        rows = rows[rows.aggregator == aggregator]
    return None if rows.empty else float(rows.value.iloc[0])


def headline(ev: Evaluation, aggregator: str = "geometric") -> dict[str, float]:
    """The trainer's ``eval_*`` numbers from an :class:`Evaluation`: ``eval_auroc``
    (trajectory AUROC under ``aggregator``), ``eval_pass1``, ``eval_n`` (trajectories)
    and, when validation samples chose a threshold, ``eval_step_f1``,
    ``eval_step_acc_err``, ``eval_step_acc_ok``, ``eval_threshold``. Missing numbers
    are left out (never NaN placeholders)."""
    t = ev.table
    out = {"eval_auroc": table_value(t, "auroc", aggregator=aggregator),
           "eval_pass1": table_value(t, "accuracy", "pass@k", 1),
           "eval_step_f1": table_value(t, "step_f1"),
           "eval_step_acc_err": table_value(t, "step_acc_err"),
           "eval_step_acc_ok": table_value(t, "step_acc_ok"),
           "eval_threshold": table_value(t, "step_threshold")}
    res: dict[str, float] = {k: v for k, v in out.items() if v is not None}
    res["eval_n"] = sum(len(ps.trajectories) for ps in ev.test)
    return res


__all__ = ["Evaluation", "evaluate_held_out", "rescore", "headline", "table_value"]
