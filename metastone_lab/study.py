"""The study pipeline behind the notebooks: backbone -> reflective training ->
best-of-N evaluation -> summary. Notebooks call these functions and plot;
all logic lives here, where it is tested.

>>> cfg = from_dict(StudyConfig, {"train_steps": 20})
>>> model, tok = prepare_backbone(cfg)
>>> trained = train_reflective(cfg, model, tok)
>>> ev = evaluate_tts(cfg, trained.model, tok)
>>> summary = summarize(ev, trained, wall_seconds=...)
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import check, from_dict
from .errors import ConfigError
from .held_out import Evaluation, table_value

#: the headline numbers every study run reports (runs/<spec>/summary.json).
SUMMARY_KEYS = ["pass@1", "pass@32", "bon@2", "bon@8", "bon@32", "majority@8", "majority@32",
                "weighted@8", "weighted@32", "auroc", "step_f1", "aha_onset_step",
                "wall_seconds",
                # training-free self-signal baselines (best-of-N by each signal)
                "self_certainty@8", "self_certainty@32", "mean_logprob@32", "deepconf@32",
                # the SPRM's within-problem ranking, and [lo, hi] 95% paired-bootstrap
                # CIs of sprm_bon - majority accuracy (problems resampled)
                "auroc_within", "bon_minus_majority@8_ci", "bon_minus_majority@32_ci"]


#: StudyConfig fields that training and evaluation must share (never set in ``train:``)
SHARED_WITH_TRAINING = ("segmenter", "segmenter_options", "read_at", "backbone", "task",
                        "task_options", "prompt_format", "aggregator")


@dataclass
class StudyConfig:
    """One study run: which backbone, how to train the head, how to evaluate.

    ``train_mode``: ``head_only`` (frozen policy, cheap), ``joint`` (GRPO + SPR,
    the paper's form), ``separate_prm`` (external-PRM baseline) or ``none``
    (untrained head, a control). ``train``: extra :class:`TrainConfig` keys.
    ``k_max`` samples per held-out test problem; accuracy at every k <= k_max
    comes from that one run (reference grouping). The step-error threshold is
    chosen on ``n_val`` validation problems, never on test.
    """

    backbone: str = "tiny"
    task: str = "arith"
    task_options: dict = field(default_factory=dict)
    #: how problems are shown to the backbone (tasks.prompts.PromptFormat keys):
    #: {} = the task's own prompt; {style: chat, shots: 2} for an instruction model
    prompt_format: dict = field(default_factory=dict)
    #: a registered training mode that trains the scoring head (training.modes.MODES), or "none"
    train_mode: str = "head_only"
    train_steps: int = 40
    # Named deviation from the reference (0 = reference): the head's first steps are
    # trained without the pseudo-label filter. Measured on the tiny default
    # (head_only, 60 steps, 64 test problems x 4 samples): with the reference
    # filter from step 1 the head collapses to scoring every step 1.0 and held-out
    # AUROC falls from 0.63 to 0.44; with 20 warm-up steps it reaches 0.84. The
    # quickstart, train_reflective and test_time_scaling notebooks default to 20.
    filter_warmup_steps: int = 0
    train: dict = field(default_factory=dict)
    k_max: int = 32
    n_test: int = 200
    n_val: int = 64
    val_k: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 64
    segmenter: str = "reference"
    segmenter_options: dict = field(default_factory=dict)
    read_at: Literal["before_step_token", "step_token"] = "before_step_token"
    aggregator: str = "geometric"
    seed: int = 0
    output_dir: str = "runs/study"
    #: held-out split evaluated by :func:`evaluate_tts` ("test", or "ood" for transfer)
    eval_split: Literal["test", "ood", "val"] = "test"
    #: TinyBackboneConfig overrides for the "tiny"/"micro" family (e.g. {"hidden_size": 64});
    #: a different config is a different, separately built and cached backbone
    backbone_options: dict = field(default_factory=dict)
    #: rollout cache folder (see rollout_cache); "" disables caching
    cache_dir: str = ""

    def __post_init__(self) -> None:
        check(self.k_max >= 1, f"StudyConfig.k_max must be >= 1, got {self.k_max}")
        check(self.n_test >= 1, f"StudyConfig.n_test must be >= 1, got {self.n_test}")
        check(self.n_val >= 0, f"StudyConfig.n_val must be >= 0, got {self.n_val}")
        check(self.val_k >= 1, f"StudyConfig.val_k must be >= 1, got {self.val_k}")
        check(self.train_steps >= 0, f"StudyConfig.train_steps must be >= 0, got {self.train_steps}")
        check(self.temperature > 0, f"StudyConfig.temperature must be > 0 for best-of-N sampling, "
                                    f"got {self.temperature}")
        check(self.max_new_tokens >= 1, "StudyConfig.max_new_tokens must be >= 1")
        from . import scoring, steps, tasks
        from .tasks.prompts import parse_prompt_format

        parse_prompt_format(self.prompt_format, where="StudyConfig.prompt_format")
        if self.train_mode != "none":  # the study evaluates the head the mode trains
            from .training.modes import get_head_mode

            get_head_mode(self.train_mode, where="StudyConfig.train_mode", also=("none",))
        steps.check_options(self.segmenter, self.segmenter_options, read_at=self.read_at,
                            where="StudyConfig.segmenter_options")
        scoring.AGGREGATORS.get(self.aggregator)
        tasks.TASKS.get(self.task)
        check(isinstance(self.train, dict), "StudyConfig.train must be a mapping of "
                                            "TrainConfig overrides")
        # what is evaluated must be what was trained: these are set once, at the top level
        shared = [k for k in SHARED_WITH_TRAINING if k in self.train]
        if shared:
            raise ConfigError(
                f"StudyConfig.train sets {shared}: the study evaluates with its own "
                f"{shared[0]!r}, so training would read other steps / data than the "
                f"evaluation; set {shared[0]} at the top level of the study (it goes to both)")
        self.train_config()        # unknown / ill-typed train: keys fail here, not mid-run

    def train_config(self):
        """The :class:`TrainConfig` this study trains with (``train`` overrides last)."""
        from .train import TrainConfig

        base = dict(mode=self.train_mode if self.train_mode != "none" else "head_only",
                    backbone=self.backbone, task=self.task, task_options=self.task_options,
                    prompt_format=dict(self.prompt_format),
                    steps=self.train_steps, temperature=self.temperature,
                    filter_warmup_steps=self.filter_warmup_steps,
                    max_new_tokens=self.max_new_tokens, segmenter=self.segmenter,
                    segmenter_options=dict(self.segmenter_options), read_at=self.read_at,
                    aggregator=self.aggregator, seed=self.seed,
                    output_dir=str(Path(self.output_dir) / "train"),
                    # a re-run (e.g. a sweep point retried after a crash) continues the last
                    # complete checkpoint of ITS config only: the directory is keyed by the
                    # result fingerprint, so any change to a field that changes the result
                    # trains afresh in another directory (and train() refuses a mismatch)
                    resume=True)
        base.update(self.train)
        tcfg = from_dict(TrainConfig, base, where="StudyConfig.train")
        tcfg.output_dir = str(Path(tcfg.output_dir)
                              / f"cfg-{tcfg.result_fingerprint(self.train_identity())}")
        return tcfg

    def train_identity(self) -> dict:
        """What identifies the training inputs beyond the :class:`TrainConfig` (passed
        to ``train`` as ``fingerprint_extra``): the tiny-family backbone options, when
        set (``TrainConfig.backbone`` names only the family)."""
        bcfg = backbone_config(self)
        return {"backbone_config": bcfg.key()} if bcfg is not None else {}

    def generate_config(self, k: int, seed_offset: int = 0):
        from .generate_config import GenerateConfig

        return GenerateConfig(k=k, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, segmenter=self.segmenter,
                              segmenter_options=dict(self.segmenter_options),
                              read_at=self.read_at, seed=self.seed + seed_offset)


def load_study_config(params: dict[str, Any]) -> StudyConfig:
    """Build a :class:`StudyConfig` from notebook parameters, ignoring the
    runner's reserved names (``mlflow_run_id`` ...) except ``output_dir``."""
    import dataclasses

    from .runner import RESERVED

    fields = {f.name for f in dataclasses.fields(StudyConfig)}
    return from_dict(StudyConfig, {k: v for k, v in params.items()
                                   if k in fields or k not in RESERVED})


def config_from_namespace(namespace: dict[str, Any], cls: type = None):
    """Build ``cls`` (default :class:`StudyConfig`) from the notebook's globals:
    every name that is a field of ``cls`` is taken, nothing else."""
    import dataclasses

    cls = cls or StudyConfig
    names = {f.name for f in dataclasses.fields(cls)}
    return from_dict(cls, {k: namespace[k] for k in names if k in namespace})


# ------------------------------------------------------------------ pipeline
def backbone_config(cfg: StudyConfig):
    """The :class:`TinyBackboneConfig` of a tiny-family backbone with
    ``cfg.backbone_options`` applied, or None (other backbones / no options)."""
    if not cfg.backbone_options:
        return None
    from .backbones import TinyBackboneConfig
    from .config import to_dict

    if cfg.backbone not in ("tiny", "micro"):
        raise ConfigError(f"StudyConfig.backbone_options apply to the 'tiny'/'micro' family only, "
                          f"not backbone={cfg.backbone!r}; remove backbone_options or use "
                          f"backbone: tiny")
    base = TinyBackboneConfig.micro() if cfg.backbone == "micro" else TinyBackboneConfig()
    return from_dict(TinyBackboneConfig, {**to_dict(base), **cfg.backbone_options},
                     where="StudyConfig.backbone_options")


def prepare_backbone(cfg: StudyConfig):
    """(model, tokenizer) for ``cfg.backbone``; the tiny default is built on first use
    (``backbone_options`` select another member of the tiny family, built and cached)."""
    from . import threads
    from .backbones import load_backbone

    threads.configure()  # threads sized to this process's cores (METASTONE_LAB_JOBS shares them)
    bcfg = backbone_config(cfg)
    if bcfg is not None:
        return load_backbone(cfg.backbone, config=bcfg)
    return load_backbone(cfg.backbone)


@dataclass
class Trained:
    """A trained reflective model and its training record."""

    model: Any                # ReflectiveModel (policy with LoRA + SPRM head)
    result: Any               # TrainResult, or None when train_mode == "none"
    scorer: Any = None        # separate_prm: the external PRM that scores; else None


def train_reflective(cfg: StudyConfig, model, tokenizer, tracker=None) -> Trained:
    """Train the SPRM head (and the policy, for ``joint``) on rollouts.

    ``train_mode="none"`` returns the backbone wrapped with a fresh, untrained
    head (a control for the ablations).
    """
    from .sprm import ReflectiveModel
    from .train import Trainer, train

    tcfg = cfg.train_config()
    if cfg.train_mode == "none" or cfg.train_steps == 0:
        import torch

        torch.manual_seed(cfg.seed)
        rm = ReflectiveModel(model, feature_layer=tcfg.feature_layer, grad_scale=0.0,
                             head_width_mult=tcfg.head_width_mult, head_dropout=tcfg.head_dropout,
                             head_inputs=tcfg.head_inputs)
        return Trained(rm.eval(), None)
    # The trainer wraps the backbone with LoRA in place; keep the caller's copy clean.
    result = train(tcfg, _TrainParams(tracker) if tracker is not None else None,
                   model=copy.deepcopy(model), tokenizer=tokenizer,
                   fingerprint_extra=cfg.train_identity())
    return load_trained(result.checkpoint, model, tokenizer, result=result)


class _TrainParams:
    """Delegates to a tracker, logging the trainer's params as ``train.<key>`` so
    they never collide with the study's own params on the same run."""

    def __init__(self, tracker):
        self._tracker = tracker

    def log_params(self, params) -> None:
        from .config import flatten

        self._tracker.log_params({f"train.{k}": v for k, v in flatten(params).items()})

    def __getattr__(self, name):
        return getattr(self._tracker, name)


def load_trained(checkpoint: str | Path, model, tokenizer, result=None) -> Trained:
    """Rebuild the trained reflective model from a training checkpoint directory."""
    import json

    from .train import Trainer, TrainConfig

    ckpt = Path(checkpoint)
    state_file = ckpt / "state.json"
    if not state_file.is_file():
        raise ConfigError(f"{ckpt}: not a training checkpoint (no state.json); pass a "
                          f"ckpt-<step> directory written by metastone-lab train")
    state = json.loads(state_file.read_text())
    data = dict(state["config"], init_from=str(ckpt), resume=False, steps=0,
                output_dir=str(ckpt.parent / "_load"))
    tcfg = from_dict(TrainConfig, data)
    t = Trainer(tcfg, model=copy.deepcopy(model), tokenizer=tokenizer)
    rm = _reflective(t.acc.unwrap_model(t.model)).eval()
    scorer = _reflective(t.acc.unwrap_model(t.prm)).eval() if t.prm is not None else None
    return Trained(rm, result, scorer)


def _reflective(module):
    """The ReflectiveModel inside the trainer's (possibly wrapped) training module."""
    return getattr(module, "rm", module)


def evaluate_tts(cfg: StudyConfig, trained: Trained | Any, tokenizer, *, task=None,
                 split: str | None = None, log: bool = True) -> Evaluation:
    """Sample ``k_max`` trajectories per held-out problem, score them in flight,
    and build the metric table (accuracy vs k per selector with CIs, AUROC,
    ECE, step F1 with the threshold chosen on validation)."""
    from .held_out import evaluate_held_out
    from .tasks import get_task
    from .tasks.prompts import apply_prompt_format

    model = trained.model if isinstance(trained, Trained) else trained
    scorer = trained.scorer if isinstance(trained, Trained) else None
    task = apply_prompt_format(task or get_task(cfg.task, **cfg.task_options), tokenizer,
                               cfg.prompt_format)
    ev = evaluate_held_out(
        model, tokenizer, task, task.problems(split or cfg.eval_split, cfg.n_test),
        test_config=cfg.generate_config(cfg.k_max),
        val_problems=task.problems("val", cfg.n_val) if cfg.n_val else (),
        val_config=cfg.generate_config(cfg.val_k, seed_offset=7919), scorer=scorer,
        aggregator=cfg.aggregator, seed=cfg.seed, log=log)
    test = ev.test
    if log:
        log_trajectory_view(test, tokenizer, aggregator=cfg.aggregator, read_at=cfg.read_at)
    return ev


def log_trajectory_view(problems, tokenizer=None, *, aggregator: str = "geometric",
                        read_at: str = "before_step_token", tracker=None) -> None:
    """Log ``trajectories.html`` (:mod:`metastone_lab.trajectory_view`: every sample
    with its step scores and each selector's pick, bounded in size) to ``tracker``
    (default: the active run)."""
    from . import tracking
    from .trajectory_view import render_html

    t = tracker if tracker is not None else tracking.active()
    t.log_text(render_html(problems, tokenizer, aggregator=aggregator, read_at=read_at,
                           title="Held-out test trajectories"), "trajectories.html")


def show_trajectories(ev: "Evaluation", tokenizer=None, *, n: int = 5, only: str = "mixed",
                      aggregator: str = "geometric", max_samples: int = 8,
                      read_at: str = "before_step_token"):
    """The trajectory view inline in JupyterLab: ``n`` problems of ``ev.test``
    (``only="mixed"``: problems with right and wrong samples; ``"all"``), their
    ``max_samples`` best-scored samples each. Returns an ``IPython.display.HTML``."""
    from IPython.display import HTML

    from .trajectory_view import render_html

    if only not in ("mixed", "all"):
        raise ConfigError(f"show_trajectories(only={only!r}): choose 'mixed' or 'all'")
    probs = [ps for ps in ev.test if only == "all"
             or 0 < sum(bool(t.correct) for t in ps.trajectories) < len(ps.trajectories)]
    return HTML(render_html(probs, tokenizer, aggregator=aggregator, max_problems=n,
                            max_samples=max_samples, standalone=False, read_at=read_at,
                            title=f"{min(n, len(probs))} {only} held-out problems"))


def summarize(ev: Evaluation, trained: Trained | None = None, *, aggregator: str = "geometric",
              wall_seconds: float | None = None) -> dict[str, Any]:
    """The headline numbers (:data:`SUMMARY_KEYS`) from an evaluation table.

    Keys for a k larger than the run's ``k_max`` are None. ``aha_onset_step``
    comes from the training run (None if no onset was detected).
    ``self_certainty@k`` / ``mean_logprob@k`` / ``deepconf@k``: best-of-N accuracy
    by that self-signal (None when the samples carry no signals).
    ``auroc_within``: :func:`within_problem_auroc` under ``aggregator``.
    ``bon_minus_majority@k_ci``: ``[lo, hi]``, 95% CI of sprm_bon - majority
    accuracy (:func:`metrics.selector_diff_ci`: reference grouping, problems
    resampled, paired).
    """
    from .metrics import selector_diff_ci
    from .select import SELECTORS

    t = ev.table
    out: dict[str, Any] = {"pass@1": table_value(t, "accuracy", "pass@k", 1),
                           "pass@32": table_value(t, "accuracy", "pass@k", 32)}
    for k in (2, 8, 32):
        out[f"bon@{k}"] = table_value(t, "accuracy", "sprm_bon", k)
    for k in (8, 32):
        out[f"majority@{k}"] = table_value(t, "accuracy", "majority", k)
        out[f"weighted@{k}"] = table_value(t, "accuracy", "sprm_weighted_vote", k)
    out["auroc"] = table_value(t, "auroc", aggregator=aggregator)
    out["step_f1"] = table_value(t, "step_f1")
    for key, sel, k in (("self_certainty@8", "self_certainty_bon", 8),
                        ("self_certainty@32", "self_certainty_bon", 32),
                        ("mean_logprob@32", "mean_logprob_bon", 32),
                        ("deepconf@32", "deepconf_bon", 32)):
        out[key] = table_value(t, "accuracy", sel, k)
    out["auroc_within"] = within_problem_auroc(ev.test, aggregator)[0]
    groups = [ps.trajectories for ps in ev.test]
    for k in (8, 32):
        out[f"bon_minus_majority@{k}_ci"] = selector_diff_ci(
            groups, SELECTORS.get("sprm_bon"), SELECTORS.get("majority"), k,
            aggregator=aggregator)
    res = trained.result if trained is not None else None
    out["aha_onset_step"] = getattr(res, "aha_onset_step", None)
    out["wall_seconds"] = wall_seconds
    out["n_test"] = len(ev.test)
    out["eval_seconds"] = ev.seconds
    return out


def summary_frame(summary: dict[str, Any]):
    """The summary as a one-row DataFrame with the :data:`SUMMARY_KEYS` columns."""
    import pandas as pd

    return pd.DataFrame([{k: summary.get(k) for k in SUMMARY_KEYS}])


def finish(tracker, summary: dict[str, Any], output_dir: str | None, *,
           trained: Trained | None = None, interactive: bool = True) -> dict[str, Any]:
    """Close a notebook run: write ``summary.json`` (atomically) to
    ``output_dir``, log it and the trained head and LoRA adapter as artifacts,
    and, when the notebook runs interactively (not under the runner, which logs
    the summary itself), log the summary values as metrics. Returns ``summary``.
    """
    import json
    import math

    from .io_utils import atomic_write_json

    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    if output_dir:
        atomic_write_json(Path(output_dir) / "summary.json", clean)
    tracker.log_dict(clean, "summary.json")
    if interactive:
        from .tracking import metric_key

        tracker.log_metrics({metric_key(k): float(v) for k, v in clean.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=0)
    ckpt = getattr(getattr(trained, "result", None), "checkpoint", None)
    if ckpt is not None and Path(ckpt).is_dir():
        for f in sorted(Path(ckpt).glob("*score_module.*")):
            tracker.log_artifact(f, "head")
        adapter = Path(ckpt) / "adapter"
        if adapter.is_dir():
            for f in sorted(adapter.iterdir()):
                if f.is_file():
                    tracker.log_artifact(f, "adapter")
    tracker.close()
    print(json.dumps(clean, indent=1, default=str))
    return clean


# ------------------------------------------------- ablations: cache + extended summary
def cache_content(cfg: StudyConfig) -> dict[str, Any]:
    """What produced a point's scored trajectories (hashed into its cache key):
    the backbone identity, the resolved training config and every evaluation
    field. Fields that only change how the trajectories are *read*
    (:data:`rollout_cache.READ_ONLY_FIELDS`, e.g. the aggregator) are left out."""
    from .backbones import TinyBackboneConfig
    from .config import to_dict
    from .rollout_cache import READ_ONLY_FIELDS

    bcfg = backbone_config(cfg)
    if bcfg is None and cfg.backbone == "tiny":
        bcfg = TinyBackboneConfig()
    elif bcfg is None and cfg.backbone == "micro":
        bcfg = TinyBackboneConfig.micro()
    study_fields = {k: v for k, v in to_dict(cfg).items()
                    if k not in READ_ONLY_FIELDS and k != "train"}
    # the default (task's own prompt) leaves the key of entries written before
    # prompt_format existed unchanged
    if not cfg.prompt_format:
        study_fields.pop("prompt_format")
    # segmenter_options / read_at / prompt_format / aggregator are in study_fields already
    # (or read-only); the train copy enters the key only where ``train`` overrides it, so
    # the key of every entry written before TrainConfig had them is unchanged. Bookkeeping
    # (where the checkpoints go, resume / fresh) never enters it.
    study_copy = {"aggregator": cfg.aggregator, "segmenter_options": cfg.segmenter_options,
                  "read_at": cfg.read_at, "prompt_format": cfg.prompt_format}
    train = {k: v for k, v in cfg.train_config().to_dict().items()
             if k not in ("output_dir", "resume", "fresh")
             and not (k in study_copy and v == study_copy[k])}
    if train.get("head_inputs") == "hidden":  # the reference head: keys written before it existed
        train.pop("head_inputs")
    return {"backbone": {"spec": cfg.backbone, "config": bcfg.key() if bcfg else None},
            "study": study_fields, "train": train}


def param_counts(trained: Trained) -> dict[str, int]:
    """Parameter counts of what generates and what scores: ``policy`` (backbone +
    LoRA) and ``scorer`` (the SPRM head; for ``separate_prm`` the second backbone
    and its head)."""
    pc = dict(getattr(trained.result, "param_counts", None) or {})
    if pc:
        return {"policy": int(pc.get("backbone", 0)) + int(pc.get("lora", 0)),
                "scorer": int(pc.get("extra_for_scoring", pc.get("head", 0)))}
    rm = trained.model
    if rm is None:
        return {}
    head = sum(p.numel() for p in rm.head.parameters())
    return {"policy": sum(p.numel() for p in rm.parameters()) - head, "scorer": head}


def train_and_evaluate(cfg: StudyConfig, model, tokenizer, tracker=None):
    """:func:`train_reflective` then :func:`evaluate_tts`, through the rollout cache.

    With ``cfg.cache_dir`` set, a point whose :func:`cache_content` was computed
    before reuses the stored scored trajectories and training record (no
    training, no sampling): its table is rebuilt from them, the training log is
    replayed to ``tracker`` (so every run carries its curves), and the run is
    tagged ``metastone.rollout_cache=hit``. Returns ``(trained, evaluation, hit)``;
    on a hit ``trained.model`` is None.
    """
    from .rollout_cache import CachedTrainResult, RolloutCache, content_key, train_record

    cache = RolloutCache(cfg.cache_dir) if cfg.cache_dir else None
    content = cache_content(cfg)
    key = content_key(content)
    hit = cache.load(key) if cache is not None else None
    if hit is not None:
        from .evaluation import evaluate

        t0 = time.perf_counter()
        test, val, rec = hit
        table = evaluate(test, aggregator=cfg.aggregator, val_samples=val or None,
                         seed=cfg.seed, log=True)
        log_trajectory_view(test, tokenizer, aggregator=cfg.aggregator, read_at=cfg.read_at)
        result = CachedTrainResult(**{k: rec.get(k) for k in (
            "aha_onset_step", "evals", "param_counts", "log_rows", "steps_done")},
            last_metrics=rec.get("last_metrics") or {})
        result.param_counts = result.param_counts or {}
        if tracker is not None:
            # the config of the cached result, as a trained run logs it (train.*)
            _TrainParams(tracker).log_params({**cfg.train_config().to_dict(),
                                              "param_counts": result.param_counts})
            for row in result.log_rows or []:
                vals = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                        and not isinstance(v, bool)}
                if vals:
                    tracker.log_metrics(vals, step=int(row.get("step", 0)))
            tracker.set_tags({"metastone.rollout_cache": "hit", "metastone.rollout_key": key})
        return (Trained(None, result), Evaluation(test, val, table, time.perf_counter() - t0),
                True)
    trained = train_reflective(cfg, model, tokenizer, tracker)
    ev = evaluate_tts(cfg, trained, tokenizer)
    if cache is not None:
        rec = train_record(trained.result)
        rec["param_counts"] = rec["param_counts"] or {
            "backbone": param_counts(trained).get("policy", 0),
            "head": param_counts(trained).get("scorer", 0)}
        cache.store(key, content, ev.test, ev.val, rec)
        if tracker is not None:
            tracker.set_tags({"metastone.rollout_cache": "miss", "metastone.rollout_key": key})
    return trained, ev, False


def _log_rows(trained: Trained | None) -> list[dict]:
    res = getattr(trained, "result", None)
    rows = getattr(res, "log_rows", None)
    if rows is not None:
        return list(rows)
    lp = getattr(res, "log_path", None)
    if lp is not None and Path(lp).is_file():
        from .plots import read_jsonl

        return read_jsonl(lp)
    return []


def within_problem_auroc(samples, aggregator: str = "geometric") -> tuple[float | None, int]:
    """Mean over problems of the AUROC of trajectory scores (correct vs incorrect)
    among the k samples of the SAME problem, over the problems that have both
    (ties count 1/2). This is what best-of-N needs; the pooled AUROC also rewards
    a head that only recognises easy problems. Returns (value or None, n problems)."""
    from .metrics import within_group_auroc

    scores, labels, groups = [], [], []
    for pi, ps in enumerate(samples):
        for t in ps.trajectories:
            scores.append(t.scores.get(aggregator, 0.0))
            labels.append(bool(t.correct))
            groups.append(pi)
    value, n = within_group_auroc(scores, labels, groups)
    return (value if n else None), n


#: training-curve series copied into the ablation summary as ``curve.<name>@<step>``
CURVE_SERIES = ("score_correct", "score_incorrect", "eval_auroc")


def ablation_summary(cfg: StudyConfig, ev: Evaluation, trained: Trained | None, *,
                     wall_seconds: float | None = None) -> dict[str, Any]:
    """:func:`summarize` plus what the ablation report needs, all numeric:

    - ``acc.<selector>@<k>``: accuracy of every selector at every k (the curves);
    - ``auroc.<agg>``, ``bon@<k>.<agg>``, ``weighted@<k>.<agg>`` for every aggregator
      (k in 2/8/32 up to ``k_max``), computed on the SAME scored trajectories;
    - ``auroc_within.<agg>`` / ``auroc_within`` (:func:`within_problem_auroc`, the
      ranking among one problem's samples that best-of-N relies on) and
      ``n_mixed_problems`` (problems with both correct and incorrect samples);
    - ``auroc_within.<signal>`` for the training-free signals (mean_logprob,
      self_certainty, deepconf; None without signals) on the same samples, and
      ``bon_minus_majority@<k>_ci.lo`` / ``.hi`` (the summary's CI pair as numbers);
    - ``params_policy``, ``params_scorer``, ``gen_tokens_mean`` (generated tokens per
      trajectory, prompt excluded) and ``compute@<k>`` = (policy + scorer params) x
      generated tokens x k, the thinking compute per problem at effort k;
    - ``curve.<series>@<step>``: the training curves (aha-moment figure).
    """
    from .evaluation import evaluate
    from .scoring import AGGREGATORS

    out = summarize(ev, trained, aggregator=cfg.aggregator, wall_seconds=wall_seconds)
    t = ev.table
    acc = t[(t.metric == "accuracy")]
    ks = sorted({int(k) for k in acc.k.dropna()})
    for _, r in acc.iterrows():
        out[f"acc.{r.selector}@{int(r.k)}"] = float(r.value)
    read_ks = [k for k in (2, 8, 32) if k in ks]
    for agg in AGGREGATORS.names():
        out[f"auroc.{agg}"] = table_value(t, "auroc", aggregator=agg)
        if read_ks:
            ta = evaluate(ev.test, aggregator=agg, selectors=["sprm_bon", "sprm_weighted_vote"],
                          ks=read_ks, n_boot=20, seed=cfg.seed, log=False)
            for k in read_ks:
                out[f"bon@{k}.{agg}"] = table_value(ta, "accuracy", "sprm_bon", k)
                out[f"weighted@{k}.{agg}"] = table_value(ta, "accuracy", "sprm_weighted_vote", k)
    for agg in AGGREGATORS.names():
        out[f"auroc_within.{agg}"], n_mixed = within_problem_auroc(ev.test, agg)
    out["auroc_within"] = out.get(f"auroc_within.{cfg.aggregator}")
    out["n_mixed_problems"] = n_mixed
    from .token_signals import SIGNALS
    from .metrics import within_group_auroc

    for sig in SIGNALS:   # the same within-problem ranking by each training-free signal
        rows = [(t.signals[sig], t.correct, pi) for pi, ps in enumerate(ev.test)
                for t in ps.trajectories if sig in (t.signals or {})]
        v, n = within_group_auroc(*zip(*rows)) if rows else (None, 0)
        out[f"auroc_within.{sig}"] = v if n else None
    for k in (8, 32):     # the CI pair as two numbers (metric stores keep numbers only)
        ci = out.get(f"bon_minus_majority@{k}_ci")
        if ci is not None:
            out[f"bon_minus_majority@{k}_ci.lo"], out[f"bon_minus_majority@{k}_ci.hi"] = ci
    pc = param_counts(trained) if trained is not None else {}
    lens = [len(tr.token_ids) for ps in ev.test for tr in ps.trajectories]
    out["gen_tokens_mean"] = sum(lens) / len(lens) if lens else None
    if pc:
        out["params_policy"], out["params_scorer"] = pc["policy"], pc["scorer"]
        if lens:
            for k in ks:
                out[f"compute@{k}"] = float((pc["policy"] + pc["scorer"])
                                            * out["gen_tokens_mean"] * k)
    for row in _log_rows(trained):
        for s in CURVE_SERIES:
            if isinstance(row.get(s), (int, float)) and "step" in row:
                out[f"curve.{s}@{int(row['step'])}"] = float(row[s])
    return out
