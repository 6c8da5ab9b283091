"""The shared sub-configs: each knob that more than one config needs is declared
here once, with its one default and its one explanation.

:class:`~metastone_lab.study.StudyConfig`, :class:`~metastone_lab.train.TrainConfig`,
:class:`~metastone_lab.generate_config.GenerateConfig` and
:class:`~metastone_lab.probe.ProbeConfig` *compose* them (``config.subconfig``
fields) under the same field names everywhere:

* ``segmentation``: :class:`StepsConfig`, how steps are found and scored (named
  ``segmentation``, not ``steps``: ``TrainConfig.steps`` is the number of training steps);
* ``sampling``: :class:`SamplingConfig`, how trajectories are sampled;
* ``workload``: :class:`TaskConfig`, which backbone solves which task, shown how;
* ``spr_filter``: :class:`FilterConfig`, the pseudo-label filter's warm-up (study, trainer).

The public surface stays flat (``config.composes``): notebook parameters,
experiment grids, ``--set`` flags, MLflow params, checkpoints and cache keys use
``temperature``, ``segmenter`` ...; ``from_dict`` also loads the nested form
(``sampling: {temperature: 1.2}``), and :func:`config.flat_names` maps a flat name to
its sub-config. A sub-config is validated by the config that composes it
(``check(where)``), so a message names that config: ``StudyConfig.temperature must
be > 0``.

>>> from metastone_lab.config import from_dict
>>> from metastone_lab.study import StudyConfig
>>> from_dict(StudyConfig, {"temperature": 1.2}).sampling.temperature
1.2
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from .config import check
from .errors import ConfigError


@dataclass
class StepsConfig:
    """Where a trajectory's steps are, where the head reads each one, and how step
    scores become a trajectory score (``steps.step_mask`` / ``scoring.aggregate``)."""

    #: step segmenter (``steps.SEGMENTERS``); "reference" = the paper's step token
    segmenter: str = "reference"
    #: that segmenter's options plus the common rules (``steps.COMMON_OPTIONS``),
    #: e.g. {"n": 4} for ``fixed`` or {"conclusion": true}; checked when the config loads
    segmenter_options: dict[str, Any] = field(default_factory=dict)
    #: the position a step is scored at: just before its step token (the reference) or on it
    read_at: Literal["before_step_token", "step_token"] = "before_step_token"
    #: trajectory score from step scores (``scoring.AGGREGATORS``; "geometric" = the
    #: reference): what training's metrics, the study's selector and the probe read
    #: (``GenerateConfig.aggregators`` lists what generation computes beside it)
    aggregator: str = "geometric"

    def check(self, where: str, span: str = "inference") -> None:
        """Validate names and options (UnknownNameError / ConfigError naming ``where``)."""
        from . import scoring, steps

        steps.check_options(self.segmenter, self.segmenter_options, read_at=self.read_at,
                            span=span, where=f"{where}.segmenter_options")
        scoring.AGGREGATORS.get(self.aggregator)


@dataclass
class SamplingConfig:
    """How trajectories are sampled (training rollouts, evaluation, the probe)."""

    #: softmax temperature; 0 = greedy (only ``GenerateConfig`` allows it)
    temperature: float = 0.8
    #: nucleus sampling mass; 1.0 = plain sampling (the reference)
    top_p: float = 1.0
    #: tokens per response at most (a row stops earlier at EOS)
    max_new_tokens: int = 64
    #: RNG seed (training: the run's seed; evaluation adds a per-split offset)
    seed: int = 0

    def check(self, where: str, greedy_ok: bool = False) -> None:
        """Range checks; ``greedy_ok``: temperature 0 (greedy decoding) is allowed."""
        t = self.temperature
        if greedy_ok:
            check(t >= 0, f"{where}.temperature must be >= 0, got {t}; use temperature=0 "
                          f"for greedy decoding or > 0 (e.g. 0.8) for sampling")
        else:
            check(t > 0, f"{where}.temperature must be > 0, got {t}")
        check(0.0 < self.top_p <= 1.0, f"{where}.top_p must be in (0, 1], got {self.top_p}")
        check(self.max_new_tokens >= 1,
              f"{where}.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class TaskConfig:
    """Which backbone solves which task, and how problems are shown to it."""

    #: tiny | micro | smollm2 | an HF id or path (``backbones.load_backbone``)
    backbone: str = "tiny"
    #: a registered task (``tasks.TASKS``)
    task: str = "arith"
    #: that task's config keys, e.g. {"n_ops_min": 3}
    task_options: dict[str, Any] = field(default_factory=dict)
    #: how problems are shown to the backbone (``tasks.prompts.PromptFormat`` keys):
    #: {} = the task's own prompt; {style: chat, shots: 2} for an instruction model
    prompt_format: dict[str, Any] = field(default_factory=dict)

    def check(self, where: str) -> None:
        from . import tasks
        from .tasks.prompts import parse_prompt_format

        parse_prompt_format(self.prompt_format, where=f"{where}.prompt_format")
        tasks.TASKS.get(self.task)


@dataclass
class FilterConfig:
    """The schedule of the SPR loss's pseudo-label filter (the study and the trainer)."""

    #: Named deviation from the reference (0 = reference): the head's first N training
    #: steps are trained without the pseudo-label filter. From a cold head the filter can
    #: lock in a constant prediction (every step scored 1 once all logits are > 0, because
    #: the y=0 steps it would learn from are exactly the ones it filters out). Measured on
    #: the tiny default (head_only, 60 steps, 64 test problems x 4 samples): with the
    #: reference filter from step 1 the head collapses to scoring every step 1.0 and
    #: held-out AUROC falls from 0.63 to 0.44; with 20 warm-up steps it reaches 0.84. The
    #: quickstart, train_reflective and test_time_scaling notebooks default to 20.
    filter_warmup_steps: int = 0

    def check(self, where: str) -> None:
        check(self.filter_warmup_steps >= 0, f"{where}.filter_warmup_steps must be >= 0 "
                                             f"(0 = the reference: filter from the first step)")


#: the sub-config classes, by the field name every config composes them under
SUBCONFIGS = {"segmentation": StepsConfig, "sampling": SamplingConfig, "workload": TaskConfig,
              "spr_filter": FilterConfig}


def flat_params(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``params`` with nested sub-config entries written under their flat names:
    ``{"sampling": {"temperature": 1.2}}`` and ``{"sampling.temperature": 1.2}`` both
    become ``{"temperature": 1.2}`` (what notebook parameter cells declare and MLflow
    params record). The runner applies it to a spec's parameters, grid and points.
    A key that is not a field of its sub-config raises ConfigError naming the path."""
    import dataclasses

    out: dict[str, Any] = {}

    def put(sub: str, name: str, value: Any) -> None:
        names = [f.name for f in dataclasses.fields(SUBCONFIGS[sub])]
        if name not in names:
            raise ConfigError(f"{where}: {sub}.{name} is not a {SUBCONFIGS[sub].__name__} "
                              f"field; its fields are {', '.join(names)}")
        out[name] = value

    for key, value in params.items():
        head, _, tail = str(key).partition(".")
        if head in SUBCONFIGS and tail:
            put(head, tail, value)
        elif key in SUBCONFIGS and isinstance(value, Mapping):
            for name, v in value.items():
                put(key, name, v)
        else:
            out[key] = value
    return out


__all__ = ["StepsConfig", "SamplingConfig", "TaskConfig", "FilterConfig", "SUBCONFIGS",
           "flat_params"]
