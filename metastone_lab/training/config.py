"""The typed trainer config (:class:`TrainConfig`).

One dataclass drives every training mode; it is loaded with
``config.from_dict`` (unknown keys / wrong types -> ``ConfigError``) and
range-checked in ``__post_init__``. ``TrainConfig.fingerprint()`` hashes the
fields that decide the *shape* of what a checkpoint holds (backbone, head
width, LoRA layout, mode), so resuming into an incompatible run is refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import check, to_dict

MODES = ("joint", "head_only", "sft", "separate_prm")


@dataclass
class TrainConfig:
    """Reflective training (GRPO on LoRA adapters + SPR loss on the SPRM head).

    Modes:
        ``joint``: the paper's form: one forward, policy GRPO loss + KL + SPR loss.
        ``head_only``: frozen policy; only the head learns from rollouts (cheap ablation).
        ``sft``: supervised warm start of the LoRA adapters on canonical solutions.
        ``separate_prm``: GRPO on the policy, and the SPR loss on a *second* frozen copy
            of the backbone with its own head (the external-PRM baseline).
    """

    mode: Literal["joint", "head_only", "sft", "separate_prm"] = "joint"
    backbone: str = "tiny"
    task: str = "arith"
    task_options: dict[str, Any] = field(default_factory=dict)
    # how problems are shown to the backbone (tasks.prompts.PromptFormat keys, e.g.
    # {"style": "chat", "shots": 2} for an instruction model); {} = the task's own prompt
    prompt_format: dict[str, Any] = field(default_factory=dict)
    # rollouts
    n: int = 8                      # group size (trajectories per prompt)
    prompts_per_step: int = 4
    steps: int = 100
    temperature: float = 0.8
    max_new_tokens: int = 64
    # optimisation
    policy_lr: float = 1e-4
    head_lr: float = 1e-3
    head_weight_decay: float = 1e-2
    policy_weight_decay: float = 0.0
    max_grad_norm: float = 1.0      # 0 disables clipping
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    clip: float = 0.2
    kl_coef: float = 1e-3
    # SPRM head / loss
    loss: str = "spr"
    # Deviation from the reference (0 = reference): the first N steps train the head
    # without the pseudo-label filter. From a cold head the filter can lock in a
    # constant prediction (every step scored 1 once all logits are > 0, because the
    # y=0 steps it would learn from are exactly the ones it filters out).
    filter_warmup_steps: int = 0
    feature_layer: int = -2
    grad_scale: float = 1e-4
    head_width_mult: float = 2.0
    head_dropout: float = 0.5
    # data-parallel normalisation of the SPR loss: "rank" = the reference (each rank divides
    # by its own sum of step weights; only class counts are all-reduced); "global" = divide
    # by the all-reduced sum, so a DP step equals the single-process step on the global batch
    spr_dp_norm: Literal["rank", "global"] = "rank"
    segmenter: str = "reference"
    segmenter_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"n": 4} (fixed)
    read_at: Literal["before_step_token", "step_token"] = "before_step_token"
    aggregator: str = "geometric"
    # evaluation
    eval_every: int = 10            # 0 disables periodic evaluation
    eval_val_problems: int = 32     # validation: threshold choice only
    eval_test_problems: int = 32    # held-out test: reported AUROC / F1 / pass@1
    eval_samples: int = 4           # trajectories per eval problem
    eval_at_start: bool = True      # evaluate the starting model, logged as step 0
    eval_seed: int = 1234
    aha_threshold: float = 0.8
    aha_patience: int = 2
    # sft
    sft_batch_size: int = 16
    # bookkeeping
    checkpoint_every: int = 10      # 0: only the final checkpoint
    keep_checkpoints: int = 3       # newest complete checkpoints kept (0 = all)
    output_dir: str = "runs/train"
    seed: int = 0
    resume: bool = False            # continue from the last complete checkpoint in output_dir
    init_from: str | None = None    # checkpoint dir whose adapter/head initialise a NEW run
    device: str = "auto"            # auto | cpu | cuda

    def __post_init__(self) -> None:
        from ..tasks.prompts import parse_prompt_format

        parse_prompt_format(self.prompt_format, where="TrainConfig.prompt_format")
        check(self.n >= 2, f"TrainConfig.n={self.n}: GRPO needs a group of at least 2 "
                           f"trajectories per prompt to normalise advantages; set n >= 2 (default 8)")
        check(self.prompts_per_step >= 1, f"TrainConfig.prompts_per_step must be >= 1, got "
                                          f"{self.prompts_per_step}")
        check(self.steps >= 0, f"TrainConfig.steps must be >= 0, got {self.steps}")
        check(self.temperature > 0, f"TrainConfig.temperature must be > 0, got {self.temperature}")
        check(self.max_new_tokens >= 1, f"TrainConfig.max_new_tokens must be >= 1, got "
                                        f"{self.max_new_tokens}")
        for k in ("policy_lr", "head_lr", "head_weight_decay", "policy_weight_decay",
                  "max_grad_norm", "kl_coef"):
            check(getattr(self, k) >= 0, f"TrainConfig.{k} must be >= 0, got {getattr(self, k)}")
        check(self.lora_r >= 1, f"TrainConfig.lora_r={self.lora_r}: LoRA rank must be >= 1 "
                                f"(e.g. 8); the policy is trained through LoRA adapters only")
        check(self.lora_alpha >= 1, f"TrainConfig.lora_alpha must be >= 1, got {self.lora_alpha}")
        check(0 <= self.lora_dropout < 1, "TrainConfig.lora_dropout must be in [0, 1)")
        check(len(self.lora_targets) > 0, "TrainConfig.lora_targets: name at least one module, "
                                          "e.g. ['q_proj', 'v_proj']")
        check(0 < self.clip < 1, f"TrainConfig.clip must be in (0, 1), got {self.clip}")
        check(0 <= self.grad_scale <= 1, f"TrainConfig.grad_scale must be in [0, 1], got "
                                         f"{self.grad_scale}")
        check(self.head_width_mult > 0, "TrainConfig.head_width_mult must be > 0")
        check(0 <= self.head_dropout < 1, "TrainConfig.head_dropout must be in [0, 1)")
        check(self.filter_warmup_steps >= 0, "TrainConfig.filter_warmup_steps must be >= 0 "
                                             "(0 = the reference: filter from the first step)")
        for k in ("eval_every", "eval_val_problems", "eval_test_problems", "checkpoint_every",
                  "keep_checkpoints", "sft_batch_size"):
            check(getattr(self, k) >= 0, f"TrainConfig.{k} must be >= 0, got {getattr(self, k)}")
        check(self.eval_samples >= 1, "TrainConfig.eval_samples must be >= 1")
        check(0 < self.aha_threshold < 1, "TrainConfig.aha_threshold must be in (0, 1)")
        check(self.aha_patience >= 1, "TrainConfig.aha_patience must be >= 1")
        check(self.device in ("auto", "cpu", "cuda"),
              f"TrainConfig.device={self.device!r}: choose auto, cpu or cuda")

    def validate_names(self) -> None:
        """Check loss / segmenter / aggregator / task names against their registries."""
        from .. import loss as loss_mod, scoring, steps, tasks

        loss_mod.LOSSES.get(self.loss)
        steps.SEGMENTERS.get(self.segmenter)
        scoring.AGGREGATORS.get(self.aggregator)
        tasks.TASKS.get(self.task)

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields a checkpoint's tensors depend on (shape/layout compatibility)."""
        return {
            "backbone": self.backbone, "mode": "policy" if self.mode != "separate_prm"
            else "separate_prm", "lora_r": self.lora_r, "lora_alpha": self.lora_alpha,
            "lora_targets": sorted(self.lora_targets), "head_width_mult": self.head_width_mult,
            "feature_layer": self.feature_layer,
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
