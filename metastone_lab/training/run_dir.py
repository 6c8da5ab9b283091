"""A run's ``output_dir`` across invocations: continue its checkpoint, refuse one
written by another config, or move it aside (``fresh``); replay the logged curve of
the resumed steps on the new run's tracker."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from . import checkpoint as ckpt_mod
from .config import TrainConfig

LOG_NAME = "metrics.jsonl"
SUPERSEDED_PREFIX = "superseded-"


def resume_mismatch(ckpt: Path, cfg: TrainConfig,
                    extra: dict[str, Any] | None = None) -> list[str]:
    """Why ``cfg`` may not continue checkpoint ``ckpt``: one line per result field
    (:meth:`TrainConfig.result_fields`) whose value differs from the config that wrote
    it, a different ``extra`` identity, or a checkpoint past ``cfg.steps``. Empty when
    resuming gives the run ``cfg`` describes."""
    from .config import EXTENDABLE_FIELDS

    state = ckpt_mod.read_state(ckpt)
    stored = state.get("config")
    if not isinstance(stored, dict):
        return ["config: the checkpoint records no config (written by an old version)"]
    out = [f"{k}: checkpoint has {a!r}, this run has {b!r}"
           for k, (a, b) in cfg.result_diff(stored, ignore=EXTENDABLE_FIELDS).items()]
    have_extra = state.get("result_extra") or {}
    if have_extra != (extra or {}):
        out.append(f"inputs: checkpoint has {have_extra!r}, this run has {extra or {}!r}")
    step = int(state.get("step", 0))
    if step > cfg.steps:
        out.append(f"steps: the checkpoint is at step {step}, past this run's steps={cfg.steps}")
    return out


def supersede(out_dir: Path) -> Path | None:
    """``--fresh``: move the checkpoints, pointer and log of ``out_dir`` into
    ``out_dir/superseded-<time>/`` (kept, never deleted) so a new run starts there."""
    names = [p for p in out_dir.iterdir() if p.name.startswith((ckpt_mod.PREFIX, ".ckpt-"))
             or p.name in (ckpt_mod.LATEST, LOG_NAME)]
    if not names:
        return None
    import secrets

    dest = out_dir / f"{SUPERSEDED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    dest.mkdir()
    for p in names:
        p.rename(dest / p.name)
    return dest


def checkpoint_to_resume(cfg: TrainConfig, extra: dict[str, Any] | None = None) -> Path | None:
    """The checkpoint in ``cfg.output_dir`` this run continues, or None to start fresh
    (after moving existing checkpoints aside when ``cfg.fresh``). ConfigError when one
    exists and ``cfg.resume`` is off, or it was written by a different config."""
    out_dir = Path(cfg.output_dir)
    existing = ckpt_mod.find_resume_checkpoint(out_dir) if out_dir.exists() else None
    if existing is not None and cfg.fresh:
        supersede(out_dir)
        existing = None
    if existing is not None and not cfg.resume:
        raise ConfigError(
            f"output_dir {str(out_dir)!r} already holds checkpoint {existing.name}; set "
            f"resume: true (--resume) to continue it, fresh: true (--fresh) to start over "
            f"(the old checkpoints move to {SUPERSEDED_PREFIX}*/), or choose a new output_dir")
    if existing is not None:
        why = resume_mismatch(existing, cfg, extra)
        if why:
            raise ConfigError(
                f"cannot resume {str(existing)!r}: it was written by a different config "
                f"({'; '.join(why)}). Continuing it would report its weights under this "
                f"config. Resume with the config that wrote it (its state.json 'config'), or "
                f"start over with --fresh (fresh: true; the old checkpoints move to "
                f"{SUPERSEDED_PREFIX}*/) or another output_dir")
    return existing


def replay_log(tracker: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Log the curve of the resumed steps on this run's tracker (so every run carries
    the full curves of the checkpoint it reports)."""
    for row in rows:
        vals = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                and not isinstance(v, bool)}
        if vals:
            tracker.log_metrics(vals, step=int(row.get("step", 0)))
