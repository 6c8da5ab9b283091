"""The held-out evaluation logged during training (``Trainer.evaluate``).

It is the study's evaluation path (:mod:`metastone_lab.held_out`), on fewer
problems: ``eval_samples`` trajectories per val/test problem from the one sampler
with seed ``eval_seed`` (the training RNG is untouched), scored in flight by the
head (re-scored by the PRM copy in ``separate_prm``); AUROC and pass@1 on test, the
step-error threshold chosen on val only.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch



def eval_problems(trainer: Any, split: str, k: int) -> list[Any]:
    """The first ``k`` problems of ``split``, drawn once per trainer and cached."""
    if split not in trainer._eval_cache:
        trainer._eval_cache[split] = trainer.task.problems(split, k)
    return trainer._eval_cache[split]


def generate_config(cfg: Any) -> Any:
    """The GenerateConfig of the held-out evaluation during training: ``eval_samples``
    per problem with the training ``sampling`` (seed ``eval_seed``) and
    ``segmentation``, scored with ``cfg.aggregator``."""
    import copy
    import dataclasses

    from ..generate_config import GenerateConfig

    return GenerateConfig(k=cfg.eval_samples,
                          sampling=dataclasses.replace(cfg.sampling, seed=cfg.eval_seed),
                          segmentation=copy.deepcopy(cfg.segmentation),
                          aggregators=[cfg.aggregator])


def evaluate(trainer: Any) -> dict[str, float]:
    """Fixed held-out evaluation of ``trainer`` through the study's own evaluation path
    (:func:`metastone_lab.held_out.evaluate_held_out`: the one sampler, in-flight
    scoring, the same metric table; ``separate_prm``: re-scored by the PRM copy).
    Returns :func:`metastone_lab.held_out.headline`: ``eval_auroc``, ``eval_pass1``,
    ``eval_n`` and, with val problems, ``eval_step_f1``, ``eval_step_acc_err``,
    ``eval_step_acc_ok``, ``eval_threshold``."""
    from ..held_out import evaluate_held_out, headline

    t, cfg = trainer, trainer.cfg
    test = eval_problems(t, "test", cfg.eval_test_problems)
    if not test:
        return {}
    gcfg = generate_config(cfg)
    was_training = t.model.training
    t.model.eval()
    if t.prm is not None:
        t.prm.eval()
    devices = [t.device] if t.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ev = evaluate_held_out(
                t.rm, t.tokenizer, t.task, test, test_config=gcfg,
                val_problems=eval_problems(t, "val", cfg.eval_val_problems),
                scorer=t.scorer if t.prm is not None else None, aggregator=cfg.aggregator,
                selectors=[], seed=cfg.eval_seed, n_boot=100, log=False)
    finally:
        t.model.train(was_training)
        if t.prm is not None:
            t.prm.train(was_training)
    return headline(ev, cfg.aggregator)
