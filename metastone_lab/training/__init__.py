"""Reflective training: GRPO on LoRA adapters + the SPR loss on the SPRM head.

Modules: ``config`` (TrainConfig), ``grpo`` (advantages, clipped surrogate, k3 KL),
``rollout`` (sampler, RolloutBatch), ``checkpoint`` (atomic checkpoints),
``metrics_log`` (JSONL log), ``aha`` (aha-onset detector), ``trainer`` (Trainer, train).
"""
from .config import TrainConfig

__all__ = ["TrainConfig"]
