"""The reflective trainer: GRPO on LoRA adapters + the SPR loss on the SPRM
head, from ONE forward pass, with separate AdamW optimisers (method.md §4-5).

One :meth:`Trainer.update` on a :class:`RolloutBatch` (mode ``joint``)::

    out   = ReflectiveModel(ids)                    # logits (B,L,V), step_logits (B,L)
    logp  = log p(response tokens)                  # (B, L-1)
    L_pg  = clipped surrogate(logp, logp_old, A)    # token-level mean (global count)
    L_kl  = kl_coef * k3(logp, logp_ref)            # ref = same peft model, adapters disabled
    L_spr = LOSSES[cfg.loss](step_logits, step_mask, outcome)
    (L_pg + L_kl + L_spr).backward(); policy_opt.step(); head_opt.step()

The head sees ``f*grad_scale + f.detach()*(1-grad_scale)`` (inside
``ReflectiveModel``), so it learns at full rate while the backbone is barely
pulled. Under ``accelerate launch`` the model is DDP-wrapped; token means are
normalised by the all-reduced token count so the DP step equals the
single-process step on the same global batch.

What a run trains is its :class:`~.modes.TrainingMode` (``self.mode``, looked up
from ``cfg.mode`` in the ``MODES`` registry): the trainer asks its flags, never the
mode's name. Around the trainer: :mod:`.sparse_forward` (the training forward),
:mod:`.evaluation` (held-out metrics), :mod:`.persist` (what a checkpoint holds)
and :mod:`.run_dir` (resume / fresh / refuse).
"""
from __future__ import annotations

import copy
import functools
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import progress
from ..errors import ConfigError
from . import evaluation, persist
from .aha import AhaDetector
from .config import TrainConfig
from .grpo import clipped_surrogate, k3_kl, masked_token_mean, token_logprobs
from .metrics_log import JsonlLog
from .rollout import RolloutBatch, pack, rollout
from .run_dir import (LOG_NAME, SUPERSEDED_PREFIX, checkpoint_to_resume,  # noqa: F401
                      replay_log, resume_mismatch)
from .sparse_forward import SparseHeadForward

AHA_TAG = "metastone.aha_onset_step"
RESUMED_TAG = "metastone.train_resumed_from"


@dataclass
class TrainResult:
    output_dir: Path
    steps_done: int
    start_step: int                      # 0 for a fresh run, the checkpoint step on resume
    last_metrics: dict[str, Any]
    evals: list[dict[str, Any]]
    aha_onset_step: int | None
    checkpoint: Path | None
    param_counts: dict[str, int]
    no_step_batches: int
    log_path: Path = field(default_factory=Path)
    #: the trained ReflectiveModel in memory (policy + head), so a pipeline evaluates
    #: it without rebuilding it from the checkpoint; ``scorer``: the PRM copy
    #: (``separate_prm``), else None
    model: Any = field(default=None, repr=False, compare=False)
    scorer: Any = field(default=None, repr=False, compare=False)


def load_backbone(spec: str) -> tuple[Any, Any]:
    """``backbones.load_backbone`` (tiny / smollm2 / local dir / hub id)."""
    try:
        from ..backbones import load_backbone as lb
    except ImportError:  # pragma: no cover - backbones package not installed yet
        if not Path(spec).is_dir():
            raise
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(spec), AutoTokenizer.from_pretrained(spec)
    return lb(spec)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count(params) -> int:
    return int(sum(p.numel() for p in params))


class Trainer:
    """Builds the models, optimisers and data of one run; see the module docstring."""

    def __init__(self, cfg: TrainConfig, *, model: Any = None, tokenizer: Any = None,
                 accelerator: Any = None, task: Any = None):
        from accelerate import Accelerator
        from peft import LoraConfig, get_peft_model

        from ..sprm import ReflectiveModel
        from ..tasks import get_task
        from ..tasks.prompts import apply_prompt_format

        cfg.validate_names()
        self.cfg = cfg
        self.mode = mode = cfg.training_mode   # what this run trains (training.modes)
        if accelerator is None:
            cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
            accelerator = Accelerator(cpu=cpu)
        self.acc = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        _seed_all(cfg.seed + self.rank)
        if model is None:
            model, tokenizer = load_backbone(cfg.backbone)
        if tokenizer is None:
            raise ConfigError("Trainer: pass tokenizer= together with model=")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.task = apply_prompt_format(
            task if task is not None else get_task(cfg.task, **cfg.task_options),
            tokenizer, cfg.prompt_format)
        model.config.use_cache = False
        base_for_prm = copy.deepcopy(model) if mode.separate_prm else None
        for p in model.parameters():
            p.requires_grad_(False)
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), bias="none",
                          task_type="CAUSAL_LM")
        try:
            policy = get_peft_model(model, lcfg)
        except ValueError as e:
            raise ConfigError(f"TrainConfig.lora_targets={cfg.lora_targets}: {e}. Name modules "
                              f"of this backbone (e.g. q_proj, v_proj)") from None
        # a frozen policy: the head's features carry no gradient to the backbone
        rm = ReflectiveModel(policy, feature_layer=cfg.feature_layer,
                             grad_scale=cfg.grad_scale if mode.trains_policy else 0.0,
                             head_width_mult=cfg.head_width_mult, head_dropout=cfg.head_dropout,
                             head_inputs=cfg.head_inputs)
        lora = [p for n, p in policy.named_parameters() if "lora_" in n]
        for p in lora:
            p.requires_grad_(mode.trains_policy)
        for p in rm.head.parameters():
            p.requires_grad_(mode.trains_policy_head)
        self.prm = None
        if base_for_prm is not None:
            for p in base_for_prm.parameters():
                p.requires_grad_(False)
            base_for_prm.config.use_cache = False
            self.prm = ReflectiveModel(base_for_prm, feature_layer=cfg.feature_layer, grad_scale=0.0,
                                       head_width_mult=cfg.head_width_mult,
                                       head_dropout=cfg.head_dropout,
                                       head_inputs=cfg.head_inputs)
        if cfg.init_from:
            persist.init_from(self, Path(cfg.init_from), policy, rm)
        self.param_counts = {
            "backbone": count(p for n, p in policy.named_parameters() if "lora_" not in n),
            "lora": count(lora), "head": count(rm.head.parameters()),
        }
        if self.prm is not None:
            self.param_counts["prm_backbone"] = count(self.prm.backbone.parameters())
            self.param_counts["prm_head"] = count(self.prm.head.parameters())
        self.param_counts["extra_for_scoring"] = (
            self.param_counts.get("prm_backbone", 0) + self.param_counts["prm_head"]
            if self.prm is not None else self.param_counts["head"])
        # optimisers (separate, as in the reference)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.optimizers["policy"] = torch.optim.AdamW(lora, lr=cfg.policy_lr,
                                                      weight_decay=cfg.policy_weight_decay)
        head_params = list(rm.head.parameters()) if self.prm is None else list(
            self.prm.head.parameters())
        if self.prm is not None:
            for p in head_params:
                p.requires_grad_(True)
        self.optimizers["head"] = torch.optim.AdamW(head_params, lr=cfg.head_lr,
                                                    weight_decay=cfg.head_weight_decay)
        names = list(self.optimizers)
        from ..confidence import lookahead

        rm = SparseHeadForward(rm, lookahead(cfg.read_at))
        if self.prm is not None:
            self.prm = SparseHeadForward(self.prm, lookahead(cfg.read_at))
            prepared = accelerator.prepare(rm, self.prm, *self.optimizers.values())
            self.model, self.prm = prepared[0], prepared[1]
            opts = prepared[2:]
        else:
            prepared = accelerator.prepare(rm, *self.optimizers.values())
            self.model, opts = prepared[0], prepared[1:]
        self.optimizers = dict(zip(names, opts))
        self.device = accelerator.device
        self.no_step_batches = 0
        self.aha = AhaDetector(cfg.aha_threshold, cfg.aha_patience)
        self.step = 0
        self.fingerprint_extra: dict[str, Any] = {}
        self._eval_cache: dict[str, list] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def rm(self):
        """The unwrapped ReflectiveModel (policy + head)."""
        return self.acc.unwrap_model(self.model).rm

    @property
    def policy(self):
        """The peft policy model."""
        return self.rm.backbone

    @property
    def scorer(self):
        """The model whose head is trained/evaluated (the PRM copy in separate_prm)."""
        return self.acc.unwrap_model(self.prm).rm if self.prm is not None else self.rm

    @property
    def head(self):
        return self.scorer.head

    def _allsum(self, x: float) -> float:
        if self.world == 1:
            return float(x)
        t = torch.tensor([float(x)], device=self.device, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def _step_mask(self, b: RolloutBatch) -> torch.Tensor:
        from ..steps import step_mask

        return step_mask(b.input_ids, self.tokenizer, self.cfg.segmenter, "train",
                         read_at=self.cfg.read_at, attention_mask=b.attention_mask,
                         response_start=b.response_start, **self.cfg.segmenter_options)

    # ------------------------------------------------------------------ data
    def train_problems(self, step: int) -> list[Any]:
        """The prompts of ``step`` for this rank: drawn from a stateless RNG keyed by
        (seed, step), identical on every rank, then sharded by rank."""
        cfg = self.cfg
        pool = self.task.problems("train")
        rng = random.Random(f"train:{cfg.seed}:{step}")
        k = cfg.prompts_per_step * self.world
        picks = [pool[rng.randrange(len(pool))] for _ in range(k)]
        return picks[self.rank::self.world]

    def make_rollouts(self, problems: Sequence[Any]) -> RolloutBatch:
        self.model.eval()
        try:
            b = rollout(self.policy, self.tokenizer, self.task, problems, n=self.cfg.n,
                        temperature=self.cfg.temperature, max_new_tokens=self.cfg.max_new_tokens,
                        top_p=self.cfg.top_p)
        finally:
            self.model.train()
        return b.to(self.device)

    def sft_batch(self, step: int) -> RolloutBatch:
        """Canonical solutions (+ eos) of ``sft_batch_size`` train problems. The prompt
        is encoded as rollouts and evaluation encode it (``generate.encode_prompt``);
        the solution is a continuation (no special tokens)."""
        from ..generate import encode_prompt

        cfg, tok = self.cfg, self.tokenizer
        pool = self.task.problems("train")
        rng = random.Random(f"sft:{cfg.seed}:{step}")
        picks = [pool[rng.randrange(len(pool))] for _ in range(cfg.sft_batch_size * self.world)]
        picks = picks[self.rank::self.world]
        prompts = [encode_prompt(tok, p.prompt) for p in picks]
        resps = [tok.encode(p.solution, add_special_tokens=False) + [tok.eos_token_id]
                 for p in picks]
        return pack(prompts, resps, [1.0] * len(picks), n=1, pad_id=tok.pad_token_id).to(
            self.device)

    # ------------------------------------------------------------------ updates
    def update(self, b: RolloutBatch, *, policy_only: bool = False) -> dict[str, float]:
        """One optimisation step on a rollout batch; returns local metrics.

        ``policy_only`` runs the GRPO update without the head (plain LM forward): the
        benchmark baseline for the joint step on the same rollouts.
        """
        from .. import threads

        threads.rebalance()  # share the cores with metastone-lab jobs started since
        from ..loss import LOSSES
        from ..scoring import aggregate

        cfg = self.cfg
        m: dict[str, float] = {}
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)
        n_tok_global = self._allsum(b.n_response_tokens)
        denom = max(n_tok_global, 1.0) / self.world
        train_policy = self.mode.grpo
        mask = None if policy_only else self._step_mask(b)
        own_head = mask if self.prm is None else None
        out_logits, step_logits = self.model(b.input_ids, b.attention_mask, own_head,
                                             b.response_start)
        total = torch.zeros((), device=self.device)
        if train_policy or policy_only:
            logp = token_logprobs(out_logits, b.input_ids)
            pg, info = clipped_surrogate(logp, logp.detach(), b.advantages, b.token_mask,
                                         cfg.clip, denom)
            total = total + pg
            m["policy_loss"] = float(pg.item()) * self.world
            m["clip_frac"] = info["clip_frac"]
            if cfg.kl_coef > 0:
                with torch.no_grad(), self.policy.disable_adapter():
                    ref = token_logprobs(self.policy(input_ids=b.input_ids,
                                                     attention_mask=b.attention_mask).logits,
                                         b.input_ids)
                kl = masked_token_mean(k3_kl(logp, ref), b.token_mask, denom)
                total = total + cfg.kl_coef * kl
                m["kl"] = float(kl.item()) * self.world
            else:
                m["kl"] = 0.0
        else:
            m["policy_loss"], m["kl"] = 0.0, 0.0
        if not policy_only:
            if self.prm is not None:
                _, step_logits = self.prm(b.input_ids, b.attention_mask, mask, b.response_start)
            outcome = b.correct.float()
            n_marks = self._allsum(int(mask.sum()))
            if n_marks == 0:
                self.no_step_batches += 1
                warnings.warn(f"step {self.step}: the step mask found no steps in this batch; "
                              f"SPR loss set to 0 (segmenter={cfg.segmenter!r})", RuntimeWarning)
                spr = step_logits.sum() * 0.0
                diag: dict = {}
            else:
                loss_fn = LOSSES.get(cfg.loss)
                if self.step <= cfg.filter_warmup_steps:
                    # named deviation: no pseudo-label filter while the head is cold
                    loss_fn = functools.partial(loss_fn, filter=False)
                spr, diag = loss_fn(step_logits, mask, outcome)
                if cfg.spr_dp_norm == "global" and self.world > 1:
                    w_local = _spr_weight_sum(loss_fn, diag)
                    w_global = self._allsum(w_local)
                    spr = spr * ((w_local + 1e-5) / (w_global + 1e-5) * self.world)
            total = total + spr
            m["spr_loss"] = float(spr.item())
            m["kept_fraction"] = float(diag.get("kept_fraction", float("nan")))
            with torch.no_grad():
                scores = aggregate(step_logits.detach().float(), mask, cfg.aggregator)
            corr = b.correct.bool()
            has = mask.any(-1)
            sc = self._allsum(float(scores[corr & has].sum()))
            nc = self._allsum(int((corr & has).sum()))
            si = self._allsum(float(scores[~corr & has].sum()))
            ni = self._allsum(int((~corr & has).sum()))
            m["score_correct"] = sc / nc if nc else float("nan")
            m["score_incorrect"] = si / ni if ni else float("nan")
            m["score_gap"] = m["score_correct"] - m["score_incorrect"]
            m["steps_per_traj"] = self._allsum(float(mask.sum())) / max(
                self._allsum(len(b)), 1.0)
        if not total.requires_grad:  # e.g. nothing trainable: keep the step a no-op
            return m
        self.acc.backward(total)
        if cfg.max_grad_norm > 0 and (train_policy or policy_only):
            lora = [p for p in self.policy.parameters() if p.requires_grad]
            m["policy_grad_norm"] = float(self.acc.clip_grad_norm_(lora, cfg.max_grad_norm))
        if train_policy or policy_only:
            self.optimizers["policy"].step()
        if not policy_only and self.mode.trains_head:
            self.optimizers["head"].step()
        return m

    def train_step(self, step: int) -> dict[str, float]:
        """One training step on the mode's data (``TrainingMode.data``): an update on
        this step's rollouts, or SFT on canonical solutions. Returns the metrics,
        losses averaged over ranks."""
        t0 = time.perf_counter()
        if self.mode.data == "solutions":
            metrics = self.sft_update(self.sft_batch(step))
            _reduce_mean(self, metrics, ["sft_loss"])
            return metrics
        b = self.make_rollouts(self.train_problems(step))
        t_roll = time.perf_counter() - t0
        metrics = self.update(b)
        n = self._allsum(len(b))
        metrics["reward_mean"] = self._allsum(float(b.rewards.sum())) / n
        metrics["pass_rate"] = self._allsum(float(b.correct.float().sum())) / n
        metrics["rollout_s"] = t_roll
        _reduce_mean(self, metrics, ["policy_loss", "kl", "spr_loss", "kept_fraction",
                                     "clip_frac"])
        return metrics

    def sft_update(self, b: RolloutBatch) -> dict[str, float]:
        opt = self.optimizers["policy"]
        opt.zero_grad(set_to_none=True)
        denom = max(self._allsum(b.n_response_tokens), 1.0) / self.world
        logits, _ = self.model(b.input_ids, b.attention_mask, None)
        nll = -token_logprobs(logits, b.input_ids)
        loss = masked_token_mean(nll, b.token_mask, denom)
        self.acc.backward(loss)
        if self.cfg.max_grad_norm > 0:
            self.acc.clip_grad_norm_([p for p in self.policy.parameters() if p.requires_grad],
                                     self.cfg.max_grad_norm)
        opt.step()
        return {"sft_loss": float(loss.item()) * self.world}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Fixed held-out evaluation (:func:`.evaluation.evaluate`): sample
        ``eval_samples`` trajectories per val/test problem (own seed; the training RNG
        is untouched), score them with the head. AUROC and pass@1 on test; the
        step-error threshold is chosen on val only."""
        return evaluation.evaluate(self)

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        """The JSON state a checkpoint records (:func:`.persist.trainer_state`)."""
        return persist.trainer_state(self)

    def save(self, out_dir: Path) -> Path | None:
        """Write ``ckpt-<step>`` under ``out_dir`` (:func:`.persist.save`)."""
        return persist.save(self, out_dir)

    def load(self, path: Path) -> None:
        """Restore a checkpoint written by :meth:`save` (weights, optimisers, RNG, state)."""
        persist.load(self, path)


def _spr_weight_sum(loss_fn: Any, diag: dict) -> float:
    """Sum of the SPR step weights of this rank, rebuilt from the loss diagnostics:
    ``pos_boost*pos_w*n_pos + neg_w*n_neg`` (see ``loss.spr_loss``)."""
    import inspect

    from ..loss import spr_loss

    kw = getattr(loss_fn, "keywords", {}) or {}
    boost = kw.get("pos_boost", inspect.signature(spr_loss).parameters["pos_boost"].default)
    return float(boost * diag["pos_weight"] * diag["n_pos"] + diag["neg_weight"] * diag["n_neg"])


def _log_line(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            out[k] = None
        else:
            out[k] = v
    return out


def _reduce_mean(trainer: Trainer, rows: dict[str, float], keys: Sequence[str]) -> None:
    for k in keys:
        if k in rows:
            rows[k] = trainer._allsum(rows[k]) / trainer.world


def train(cfg: TrainConfig, tracker: Any = None, *, model: Any = None, tokenizer: Any = None,
          accelerator: Any = None, task: Any = None,
          fingerprint_extra: dict[str, Any] | None = None) -> TrainResult:
    """Run ``cfg.steps`` training steps (resuming when ``cfg.resume``); see :class:`Trainer`.

    Logs every step to ``<output_dir>/metrics.jsonl`` and ``tracker.log_metrics``
    (default ``tracking.active()``); checkpoints every ``checkpoint_every`` steps and
    at the end. The aha onset (see :mod:`metastone_lab.training.aha`) is logged as
    the metric ``aha_onset_step`` and the tag ``metastone.aha_onset_step``.

    Resuming: a checkpoint is continued only if every result field of ``cfg``
    (all but :data:`~metastone_lab.training.config.BOOKKEEPING_FIELDS`; ``steps`` may
    grow) and ``fingerprint_extra`` (what else identifies the inputs, e.g. a
    tiny-family backbone's options) equal those that wrote it; otherwise
    ``ConfigError`` names the differing keys. ``cfg.fresh`` moves existing
    checkpoints aside and starts over. The params and the curves up to the resumed
    step are logged on ``tracker`` too, so every run records the config and the
    curves of the weights it reports.
    """
    from .. import tracking

    tracker = tracker if tracker is not None else tracking.active()
    out_dir = Path(cfg.output_dir)
    existing = checkpoint_to_resume(cfg, fingerprint_extra)
    t = Trainer(cfg, model=model, tokenizer=tokenizer, accelerator=accelerator, task=task)
    t.fingerprint_extra = dict(fingerprint_extra or {})
    main = t.acc.is_main_process
    log = JsonlLog(out_dir / LOG_NAME)
    start = 0
    if existing is not None:
        t.load(existing)
        start = t.step
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log.truncate_after(start)
        # every run logs the config of the weights it reports (on resume: equal to the
        # checkpoint's in every result field, checked above)
        tracker.log_params({**cfg.to_dict(), "param_counts": t.param_counts})
        if start == 0:
            if log.path.exists():
                log.path.unlink()  # a fresh run (no checkpoint to resume): start a new curve
        else:
            replay_log(tracker, [r for r in log.read() if int(r.get("step", 0)) <= start])
            tracker.set_tags({RESUMED_TAG: str(existing)})
    t.acc.wait_for_everyone()
    last: dict[str, Any] = {}
    evals = [dict(step=s, eval_auroc=a) for s, a in t.aha.history]
    path = existing
    t.model.train()
    if start == 0 and cfg.eval_every and cfg.eval_at_start and t.mode.eval_at_start:
        ev = t.evaluate()  # the starting point of the curves, logged as step 0
        if "eval_auroc" in ev:
            t.aha.update(0, ev["eval_auroc"])
        if main:
            log.append(dict(_log_line(ev), step=0))
            tracker.log_metrics(ev, step=0)
        evals.append(dict(step=0, **ev))
    for step in range(start + 1, cfg.steps + 1):
        t.step = step
        t0 = time.perf_counter()
        metrics = t.train_step(step)
        metrics["step_s"] = time.perf_counter() - t0
        metrics["no_step_batches"] = t.no_step_batches
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            ev = t.evaluate()
            metrics.update(ev)
            if "eval_auroc" in ev:
                evals.append(dict(step=step, **ev))
                onset = t.aha.update(step, ev["eval_auroc"])
                if onset is not None:
                    metrics["aha_onset_step"] = onset
                    if main:
                        tracker.set_tags({AHA_TAG: onset})
        if main:
            log.append(dict(_log_line(metrics), step=step))
            tracker.log_metrics(metrics, step=step)
            loss = metrics.get("spr_loss", metrics.get("sft_loss", metrics.get("policy_loss")))
            progress.report("training", step, cfg.steps, "steps",
                            **({"loss": round(float(loss), 4)} if loss is not None else {}),
                            **({"auroc": round(float(metrics["eval_auroc"]), 3)}
                               if "eval_auroc" in metrics else {}))
        last = metrics
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
            path = t.save(out_dir)
    return TrainResult(out_dir, max(t.step, start), start, last, evals,
                       t.aha.onset, path, t.param_counts, t.no_step_batches, out_dir / LOG_NAME,
                       model=t.rm, scorer=t.scorer if t.prm is not None else None)
