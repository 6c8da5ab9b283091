"""The typed trainer config (:class:`TrainConfig`).

One dataclass drives every training mode; it is loaded with
``config.from_dict`` (unknown keys / wrong types -> ``ConfigError``) and
range-checked in ``__post_init__``. Two fingerprints:

* ``TrainConfig.fingerprint()`` hashes the fields that decide the *shape* of what
  a checkpoint holds (backbone, head width, LoRA layout, mode), so loading an
  incompatible checkpoint is refused (``CheckpointError``);
* ``TrainConfig.result_fingerprint()`` hashes every field that changes what
  training produces (all but :data:`BOOKKEEPING_FIELDS`): a checkpoint is resumed,
  and a study's training directory reused, only when it matches.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from ..config import check, composes, subconfig, to_dict
from ..config_tree import FilterConfig, SamplingConfig, StepsConfig, TaskConfig
from .modes import MODES, TrainingMode, get_mode  # noqa: F401 - MODES: the mode registry

#: TrainConfig fields that do NOT change what a run produces (its weights, its logged
#: curves, its aha onset); every other field is in ``result_fingerprint``.
#: Judged one by one:
#:   output_dir        where the run is written; the same run elsewhere is the same run
#:   resume, fresh     how this invocation treats checkpoints already in output_dir
#:   checkpoint_every  saving reads the RNG states, never draws from them
#:   keep_checkpoints  only prunes old checkpoint dirs
#:   device            auto/cpu/cuda: the same computation (up to float rounding)
#: Deliberately NOT bookkeeping: the eval_* and aha_* fields. They leave the weights
#: unchanged (evaluation samples under a forked RNG), but they decide the evaluation
#: curve and the aha onset that the checkpoint carries and the study reports.
BOOKKEEPING_FIELDS = ("output_dir", "resume", "fresh", "checkpoint_every", "keep_checkpoints",
                      "device")

#: Result fields an explicit resume may increase: the checkpoint at step k is the state
#: at step k of any longer run whose other fields are equal (``steps`` sets no
#: schedule). A checkpoint *past* ``steps`` is refused. The study keys its training
#: directories by the full result fingerprint, so it never extends a run either.
EXTENDABLE_FIELDS = ("steps",)

#: Result fields left out of :meth:`TrainConfig.result_fields` (and the study's rollout
#: cache key) while they hold this value: fields added after checkpoints were written,
#: whose default is what those runs did, so their fingerprints stay valid.
#:   top_p 1.0   rollouts sampled without a nucleus cut before TrainConfig had top_p
OMITTED_AT_DEFAULT = {"top_p": 1.0}


@composes
@dataclass
class TrainConfig:
    """Reflective training (GRPO on LoRA adapters + SPR loss on the SPRM head).

    ``mode`` names a registered :class:`~metastone_lab.training.modes.TrainingMode`
    (``MODES``; built in: ``joint``, ``head_only``, ``sft``, ``separate_prm``, each
    described in :mod:`metastone_lab.training.modes`). The shared knobs live in the
    composed sub-configs (:mod:`metastone_lab.config_tree`; flat names work everywhere):
    ``workload`` (backbone, task, task_options, prompt_format), ``sampling`` of the
    rollouts (temperature, top_p, max_new_tokens, seed: the run's seed) and
    ``segmentation`` (segmenter, segmenter_options, read_at, aggregator) and
    ``spr_filter`` (filter_warmup_steps). ``steps`` is the number of training steps.
    """

    mode: str = "joint"
    workload: TaskConfig = subconfig(TaskConfig)
    # rollouts
    n: int = 8                      # group size (trajectories per prompt)
    prompts_per_step: int = 4
    steps: int = 100
    sampling: SamplingConfig = subconfig(SamplingConfig)
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
    spr_filter: FilterConfig = subconfig(FilterConfig)   # filter_warmup_steps
    feature_layer: int = -2
    grad_scale: float = 1e-4
    head_width_mult: float = 2.0
    head_dropout: float = 0.5
    # Named deviation (default "hidden" = the reference): "hidden+confidence" gives the head
    # the policy's confidence in each step's tokens beside the hidden state
    # (metastone_lab.confidence); still trained from outcome labels only.
    # "confidence" is the ablation without the hidden state.
    head_inputs: Literal["hidden", "hidden+confidence", "confidence"] = "hidden"
    # data-parallel normalisation of the SPR loss: "rank" = the reference (each rank divides
    # by its own sum of step weights; only class counts are all-reduced); "global" = divide
    # by the all-reduced sum, so a DP step equals the single-process step on the global batch
    spr_dp_norm: Literal["rank", "global"] = "rank"
    segmentation: StepsConfig = subconfig(StepsConfig)
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
    resume: bool = False            # continue from the last complete checkpoint in output_dir
    fresh: bool = False             # start over: move output_dir's checkpoints to superseded-*/
    init_from: str | None = None    # checkpoint dir whose adapter/head initialise a NEW run
    device: str = "auto"            # auto | cpu | cuda

    def __post_init__(self) -> None:
        get_mode(self.mode)
        self.workload.check("TrainConfig")
        self.segmentation.check("TrainConfig")
        self.sampling.check("TrainConfig")
        check(self.n >= 2, f"TrainConfig.n={self.n}: GRPO needs a group of at least 2 "
                           f"trajectories per prompt to normalise advantages; set n >= 2 (default 8)")
        check(self.prompts_per_step >= 1, f"TrainConfig.prompts_per_step must be >= 1, got "
                                          f"{self.prompts_per_step}")
        check(self.steps >= 0, f"TrainConfig.steps must be >= 0, got {self.steps}")
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
        self.spr_filter.check("TrainConfig")
        for k in ("eval_every", "eval_val_problems", "eval_test_problems", "checkpoint_every",
                  "keep_checkpoints", "sft_batch_size"):
            check(getattr(self, k) >= 0, f"TrainConfig.{k} must be >= 0, got {getattr(self, k)}")
        check(self.eval_samples >= 1, "TrainConfig.eval_samples must be >= 1")
        check(0 < self.aha_threshold < 1, "TrainConfig.aha_threshold must be in (0, 1)")
        check(self.aha_patience >= 1, "TrainConfig.aha_patience must be >= 1")
        check(self.device in ("auto", "cpu", "cuda"),
              f"TrainConfig.device={self.device!r}: choose auto, cpu or cuda")
        check(not (self.resume and self.fresh),
              "TrainConfig: resume and fresh exclude each other; resume continues the "
              "checkpoints in output_dir, fresh starts over beside them")

    @property
    def training_mode(self) -> TrainingMode:
        """The registered mode named by ``mode`` (what it trains, on which data)."""
        return get_mode(self.mode)

    def validate_names(self) -> None:
        """Check loss / segmenter / aggregator / task names against their registries."""
        from .. import loss as loss_mod

        loss_mod.LOSSES.get(self.loss)
        self.segmentation.check("TrainConfig")
        self.workload.check("TrainConfig")

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields a checkpoint's tensors depend on (shape/layout compatibility)."""
        return {
            # the checkpoint layout, not the mode's name: modes that save the same tensors
            # share it ("policy" for joint/head_only/sft, "separate_prm")
            "backbone": self.backbone, "mode": self.training_mode.checkpoint_layout,
            "lora_r": self.lora_r, "lora_alpha": self.lora_alpha,
            "lora_targets": sorted(self.lora_targets), "head_width_mult": self.head_width_mult,
            "feature_layer": self.feature_layer,
            # the head's input width; absent for the reference head, so the fingerprint
            # of checkpoints written before this field existed is unchanged
            **({"head_inputs": self.head_inputs} if self.head_inputs != "hidden" else {}),
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def result_fields(self) -> dict[str, Any]:
        """Every field that changes what training produces (all but
        :data:`BOOKKEEPING_FIELDS`, flat names; :data:`OMITTED_AT_DEFAULT` fields only
        when they differ from that value)."""
        return {k: v for k, v in self.to_dict().items() if k not in BOOKKEEPING_FIELDS
                and not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])}

    def result_fingerprint(self, extra: Mapping[str, Any] | None = None) -> str:
        """Hash of :meth:`result_fields` (plus ``extra``: what else identifies the
        run's inputs, e.g. the options of a tiny-family backbone)."""
        blob = json.dumps({"fields": self.result_fields(), "extra": dict(extra or {})},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def result_diff(self, stored: Mapping[str, Any], ignore: tuple[str, ...] = ()
                    ) -> dict[str, tuple[Any, Any]]:
        """``{key: (stored value, this value)}`` for every result field that differs
        from ``stored`` (a checkpoint's ``config``). A key missing from ``stored`` was
        written before the field existed and counts as its default."""
        defaults = to_dict(TrainConfig())
        # every result field, OMITTED_AT_DEFAULT ones too (a stored top_p 0.9 differs)
        mine = {k: v for k, v in self.to_dict().items() if k not in BOOKKEEPING_FIELDS}
        out = {}
        for k, v in mine.items():
            if k in ignore:
                continue
            have = stored.get(k, defaults.get(k))
            if _canon(have) != _canon(v):
                out[k] = (have, v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _canon(v: Any) -> str:
    """Compare config values as JSON (a stored list equals a tuple, 1 equals 1.0)."""
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return json.dumps(float(v))
    return json.dumps(v, sort_keys=True, default=str)
