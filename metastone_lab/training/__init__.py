"""Reflective training: GRPO on LoRA adapters + the SPR loss on the SPRM head.

Modules: ``config`` (TrainConfig), ``modes`` (the training-mode registry),
``grpo`` (advantages, clipped surrogate, k3 KL), ``rollout`` (sampler, RolloutBatch),
``sparse_forward`` (the training forward), ``evaluation`` (held-out metrics during
training), ``checkpoint`` (atomic checkpoints), ``persist`` (what a trainer's checkpoint
holds), ``run_dir`` (resume / fresh / refuse), ``metrics_log`` (JSONL log), ``aha``
(aha-onset detector), ``trainer`` (Trainer, train).
"""
from .config import TrainConfig

__all__ = ["TrainConfig"]
