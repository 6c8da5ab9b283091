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
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import check, composes, field_names, from_dict, subconfig, to_dict
from .config_tree import FilterConfig, SamplingConfig, StepsConfig, TaskConfig
from .errors import ConfigError
from .held_out import Evaluation, table_value  # noqa: F401  (re-exported)
from .summary import (CURVE_SERIES, SUMMARY_KEYS, ablation_summary, param_counts,  # noqa: F401
                      summarize, summary_frame, within_problem_auroc)

#: StudyConfig names that training and evaluation must share (never set in ``train:``):
#: the ``segmentation`` and ``workload`` sub-configs and their flat names. Derived from
#: the sub-config dataclasses; ``sampling`` may differ for training (``train:
#: {temperature: 1.0}`` samples the rollouts hotter than the evaluation).
SHARED_WITH_TRAINING = tuple(
    ["segmentation", "workload"]
    + [f.name for f in dataclasses.fields(StepsConfig) + dataclasses.fields(TaskConfig)])


@composes
@dataclass
class StudyConfig:
    """One study run: which backbone, how to train the head, how to evaluate.

    ``train_mode``: ``head_only`` (frozen policy, cheap), ``joint`` (GRPO + SPR,
    the paper's form), ``separate_prm`` (external-PRM baseline) or ``none``
    (untrained head, a control). ``train``: extra :class:`TrainConfig` keys.
    ``k_max`` samples per held-out test problem; accuracy at every k <= k_max
    comes from that one run (reference grouping). The step-error threshold is
    chosen on ``n_val`` validation problems, never on test.

    The shared knobs live in the composed sub-configs (:mod:`metastone_lab.config_tree`;
    flat names work everywhere): ``workload`` (backbone, task, task_options,
    prompt_format), ``sampling`` (temperature, top_p, max_new_tokens, seed) and
    ``segmentation`` (segmenter, segmenter_options, read_at, aggregator); ``spr_filter``
    (filter_warmup_steps) goes to training. Training and evaluation get the same
    ``workload`` and ``segmentation``, and ``sampling`` unless ``train`` overrides a
    sampling key.
    """

    workload: TaskConfig = subconfig(TaskConfig)
    #: a registered training mode that trains the scoring head (training.modes.MODES), or "none"
    train_mode: str = "head_only"
    train_steps: int = 40
    spr_filter: FilterConfig = subconfig(FilterConfig)
    train: dict = field(default_factory=dict)
    k_max: int = 32
    n_test: int = 200
    n_val: int = 64
    val_k: int = 8
    sampling: SamplingConfig = subconfig(SamplingConfig)
    segmentation: StepsConfig = subconfig(StepsConfig)
    output_dir: str = "runs/study"
    #: held-out split evaluated by :func:`evaluate_tts` ("test", or "ood" for transfer)
    eval_split: Literal["test", "ood", "val"] = "test"
    #: TinyBackboneConfig overrides for the "tiny"/"micro" family (e.g. {"hidden_size": 64});
    #: a different config is a different, separately built and cached backbone
    backbone_options: dict = field(default_factory=dict)
    #: rollout cache folder (see rollout_cache); "" disables caching
    cache_dir: str = ""
    #: the backbone's dtype for the whole study (training rollouts and features, then
    #: evaluation): null = as loaded (float32), "float32", "bfloat16" or "float16". The
    #: scoring head stays float32 (engine.place_model). bfloat16 decodes SmolLM2 ~2.5x
    #: faster on a CPU with AVX512-BF16 (decode_attention). Half precision is for modes
    #: that train the head only: a trained policy's weights are not trained in it.
    dtype: str | None = None

    def __post_init__(self) -> None:
        check(self.k_max >= 1, f"StudyConfig.k_max must be >= 1, got {self.k_max}")
        check(self.n_test >= 1, f"StudyConfig.n_test must be >= 1, got {self.n_test}")
        check(self.n_val >= 0, f"StudyConfig.n_val must be >= 0, got {self.n_val}")
        check(self.val_k >= 1, f"StudyConfig.val_k must be >= 1, got {self.val_k}")
        check(self.train_steps >= 0, f"StudyConfig.train_steps must be >= 0, got {self.train_steps}")
        self.sampling.check("StudyConfig")
        self.workload.check("StudyConfig")
        self.spr_filter.check("StudyConfig")
        if self.train_mode != "none":  # the study evaluates the head the mode trains
            from .training.modes import get_head_mode

            get_head_mode(self.train_mode, where="StudyConfig.train_mode", also=("none",))
        self.segmentation.check("StudyConfig")
        check(self.dtype in (None, "float32", "bfloat16", "float16"),
              f"StudyConfig.dtype must be float32, bfloat16, float16 or null, got "
              f"{self.dtype!r}")
        if self.dtype in ("bfloat16", "float16") and self.train_mode != "none":
            from .training.modes import get_mode

            if get_mode(self.train_mode, where="StudyConfig.train_mode").trains_policy:
                raise ConfigError(
                    f"StudyConfig.dtype={self.dtype!r} with train_mode={self.train_mode!r}: "
                    f"this mode trains the policy, whose weights would be trained in "
                    f"{self.dtype}; use dtype: null (float32) or a mode that trains the head "
                    f"only (head_only, none)")
        check(isinstance(self.train, dict), "StudyConfig.train must be a mapping of "
                                            "TrainConfig overrides")
        # what is evaluated must be what was trained: these are set once, at the top level
        shared = [k for k in self.train if str(k).partition(".")[0] in SHARED_WITH_TRAINING]
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
                    workload=to_dict(self.workload), sampling=to_dict(self.sampling),
                    segmentation=to_dict(self.segmentation),
                    steps=self.train_steps, spr_filter=to_dict(self.spr_filter),
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
        out = {"backbone_config": bcfg.key()} if bcfg is not None else {}
        if self.dtype is not None:      # a float32 checkpoint is not resumed in bfloat16
            out["dtype"] = self.dtype
        return out

    def generate_config(self, k: int, seed_offset: int = 0):
        """The :class:`GenerateConfig` of ``k`` samples per problem: the study's
        ``sampling`` (seed + ``seed_offset``) and ``segmentation``."""
        from .generate_config import GenerateConfig

        return GenerateConfig(k=k, sampling=dataclasses.replace(self.sampling,
                                                                seed=self.seed + seed_offset),
                              segmentation=copy.deepcopy(self.segmentation), dtype=self.dtype)


def load_study_config(params: dict[str, Any]) -> StudyConfig:
    """Build a :class:`StudyConfig` from notebook parameters, ignoring the
    runner's reserved names (``mlflow_run_id`` ...) except ``output_dir``."""
    from .runner import RESERVED

    fields = field_names(StudyConfig)
    return from_dict(StudyConfig, {k: v for k, v in params.items()
                                   if k in fields or k not in RESERVED})


def config_from_namespace(namespace: dict[str, Any], cls: type = None):
    """Build ``cls`` (default :class:`StudyConfig`) from the notebook's globals:
    every name that is a field of ``cls`` (or a flat name of its sub-configs,
    :func:`config.field_names`) is taken, nothing else."""
    cls = cls or StudyConfig
    names = field_names(cls)
    return from_dict(cls, {k: namespace[k] for k in names if k in namespace})


def setup_notebook(namespace: dict[str, Any], notebook: str, experiment: str):
    """The setup cell of a study notebook: ``(cfg, tracker, output_dir)``.

    ``cfg`` is :func:`config_from_namespace` of the notebook's globals, written to
    ``output_dir`` (the runner's, or a fresh ``runs/interactive/...`` folder when the
    notebook runs interactively); ``tracker`` is its MLflow run
    (:func:`tracking.notebook_tracker`, experiment ``experiment`` unless the runner
    injected a run), with ``cfg`` as params."""
    from . import tracking

    output_dir = namespace.get("output_dir")
    if output_dir is None:
        output_dir = str(tracking.interactive_output_dir(notebook))  # <repo>/runs/interactive/...
    cfg = config_from_namespace({**namespace, "output_dir": output_dir})
    tracker = tracking.notebook_tracker(namespace.get("mlflow_run_id"),
                                        namespace.get("tracking_uri"), output_dir,
                                        experiment=experiment, params=cfg, notebook=notebook)
    return cfg, tracker, output_dir


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
    model, tokenizer = (load_backbone(cfg.backbone, config=bcfg) if bcfg is not None
                        else load_backbone(cfg.backbone))
    if cfg.dtype is not None:
        from .engine import place_model
        from .generate_config import GenerateConfig

        place_model(model, GenerateConfig(k=1, dtype=cfg.dtype))
    return model, tokenizer


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
    from .train import train

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
    # the trained model stays in memory: no rebuild from the checkpoint just written
    # (load_trained does that for a checkpoint from another session)
    rm, scorer = result.model.eval(), (result.scorer.eval() if result.scorer is not None
                                       else None)
    result.model = result.scorer = None      # the Trained holds them; the record stays light
    return Trained(rm, result, scorer)


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
    ECE, step F1 with the threshold chosen on validation). Under ``accelerate launch``
    the problems are sharded across the processes (:func:`evaluate_held_out`)."""
    from .held_out import evaluate_held_out
    from .shard import is_main_process
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
    if log and is_main_process():   # under accelerate launch: process 0 logs (shard.py)
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
    from .training.config import OMITTED_AT_DEFAULT

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
    if cfg.dtype is None:        # likewise for the backbone as loaded (before dtype existed)
        study_fields.pop("dtype")
    # segmenter_options / read_at / prompt_format / aggregator are in study_fields already
    # (or read-only); the train copy enters the key only where ``train`` overrides it, so
    # the key of every entry written before TrainConfig had them is unchanged. Bookkeeping
    # (where the checkpoints go, resume / fresh) never enters it.
    study_copy = {"aggregator": cfg.aggregator, "segmenter_options": cfg.segmenter_options,
                  "read_at": cfg.read_at, "prompt_format": cfg.prompt_format}
    train = {k: v for k, v in cfg.train_config().to_dict().items()
             if k not in ("output_dir", "resume", "fresh")
             and not (k in study_copy and v == study_copy[k])
             # fields TrainConfig gained later, at the value runs had before (top_p 1.0)
             and not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])}
    if train.get("head_inputs") == "hidden":  # the reference head: keys written before it existed
        train.pop("head_inputs")
    return {"backbone": {"spec": cfg.backbone, "config": bcfg.key() if bcfg else None},
            "study": study_fields, "train": train}


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
