"""What a :class:`~metastone_lab.training.trainer.Trainer` writes into a checkpoint and
restores from one (``Trainer.save`` / ``Trainer.load`` / ``TrainConfig.init_from``).

The file layout and the atomic write live in :mod:`.checkpoint`; this module decides
which of the trainer's tensors go in. The mode decides the heads
(:attr:`TrainingMode.separate_prm`): the policy's own head is saved as
``score_module.pt`` unless the mode trains a separate PRM copy, whose head is saved
as ``prm_score_module.pt``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from . import checkpoint as ckpt_mod

HEAD_FILE = "score_module.pt"
PRM_HEAD_FILE = "prm_score_module.pt"


def trainer_state(t: Any) -> dict[str, Any]:
    """The JSON state of trainer ``t`` written into ``state.json`` (fingerprints, config,
    aha detector, counters)."""
    return {"fingerprint": t.cfg.fingerprint(),
            "fingerprint_fields": t.cfg.fingerprint_fields(),
            "result_fingerprint": t.cfg.result_fingerprint(t.fingerprint_extra),
            "result_extra": t.fingerprint_extra,
            "config": t.cfg.to_dict(), "aha": t.aha.state_dict(),
            "no_step_batches": t.no_step_batches, "param_counts": t.param_counts}


def _heads(t: Any) -> dict[str, Any]:
    """``{file name: head module or None}`` of what ``t``'s checkpoint holds."""
    return {HEAD_FILE: t.rm.head if not t.mode.separate_prm else None,
            PRM_HEAD_FILE: t.head if t.prm is not None else None}


def save(t: Any, out_dir: Path) -> Path | None:
    """Write ``ckpt-<t.step>`` under ``out_dir`` (main process; every rank's RNG state is
    gathered first). Returns its path on the main process, None elsewhere."""
    st = ckpt_mod.rng_state()
    if t.world > 1:
        gathered: list = [None] * t.world
        torch.distributed.all_gather_object(gathered, st)
    else:
        gathered = [st]
    path = None
    if t.acc.is_main_process:
        heads = _heads(t)
        parts = ckpt_mod.CheckpointParts(
            policy=t.policy, head=heads[HEAD_FILE], prm_head=heads[PRM_HEAD_FILE],
            optimizers=t.optimizers, state=trainer_state(t), rng_states=gathered)
        path = ckpt_mod.save_checkpoint(out_dir, t.step, parts, keep=t.cfg.keep_checkpoints)
    t.acc.wait_for_everyone()
    return path


def load(t: Any, path: Path) -> None:
    """Restore a checkpoint written by :func:`save` into ``t`` (weights, optimisers, this
    rank's RNG, aha state, step)."""
    from ..sprm import load_score_module

    state = ckpt_mod.read_state(path)
    ckpt_mod.check_compatible(state, t.cfg.fingerprint_fields(), path)
    ckpt_mod.load_adapter_weights(t.policy, path / "adapter")
    for name, target in _heads(t).items():
        if target is None:
            continue
        try:
            h = load_score_module(path / name, t.rm.head_input_size,
                                  width_mult=t.cfg.head_width_mult, dropout=t.cfg.head_dropout)
        except Exception as e:
            raise CheckpointError(f"{path / name}: {e}") from None
        target.load_state_dict(h.state_dict())
    for name, opt in t.optimizers.items():
        opt.load_state_dict(ckpt_mod.torch_load(path / f"optim-{name}.pt"))
    rng_file = path / f"rng-{t.rank}.pt"
    if not rng_file.exists():
        warnings.warn(f"{rng_file} missing (checkpoint written with a different world size);"
                      f" using rng-0.pt", RuntimeWarning)
        rng_file = path / "rng-0.pt"
    ckpt_mod.set_rng_state(ckpt_mod.torch_load(rng_file))
    t.aha.load_state_dict(state.get("aha", {}))
    t.no_step_batches = int(state.get("no_step_batches", 0))
    t.step = int(state["step"])


def init_from(t: Any, path: Path, policy: Any, rm: Any) -> None:
    """Initialise a NEW run's adapter (``policy``) and heads from a checkpoint dir (or a
    run output_dir) of another run: the policy's head when the mode trains a head, the
    PRM copy's head when the trainer has one."""
    from ..sprm import load_score_module

    cfg = t.cfg
    if (path / ckpt_mod.LATEST).exists():
        found = ckpt_mod.find_resume_checkpoint(path)
        if found is None:
            raise CheckpointError(f"init_from={str(path)!r}: no complete checkpoint in it")
        path = found
    if not (path / "adapter").is_dir():
        raise CheckpointError(f"init_from={str(path)!r}: no adapter/ dir; point it at a "
                              f"ckpt-<step> dir or a run output_dir")
    ckpt_mod.check_compatible(ckpt_mod.read_state(path), {
        "backbone": cfg.backbone, "lora_r": cfg.lora_r,
        "lora_targets": sorted(cfg.lora_targets)}, path)
    ckpt_mod.load_adapter_weights(policy, path / "adapter")
    f = path / HEAD_FILE
    if f.exists() and t.mode.trains_head:
        h = load_score_module(f, rm.head_input_size, width_mult=cfg.head_width_mult,
                              dropout=cfg.head_dropout)
        rm.head.load_state_dict(h.state_dict())
    # separate_prm keeps its trained head in prm_score_module.pt (its policy head is unused)
    f = path / PRM_HEAD_FILE
    if f.exists() and t.prm is not None:
        h = load_score_module(f, t.prm.head_input_size, width_mult=cfg.head_width_mult,
                              dropout=cfg.head_dropout)
        t.prm.head.load_state_dict(h.state_dict())
