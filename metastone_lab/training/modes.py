"""Training modes: a registry of what each ``TrainConfig.mode`` trains, on which data.

The trainer never compares mode names; it looks the mode up once
(``MODES.get(cfg.mode)``) and asks the :class:`TrainingMode` it gets. A new mode
is one registration, here or in the user's own code, before the config is
built::

    from metastone_lab.training.modes import TrainingMode, register_mode

    @register_mode("policy_only")
    class PolicyOnly(TrainingMode):
        \"\"\"GRPO on the policy; the head is never trained (a control).\"\"\"
        trains_policy = True

    TrainConfig(mode="policy_only")   # validated against MODES

The flags decide every place the modes differ (``trainer`` and ``checkpoint``):

=================  =====================================================================
``trains_policy``  the LoRA adapters get gradients and an optimiser step (GRPO on
                   rollouts, or SFT on solutions); otherwise the head's features carry
                   no gradient to the backbone (``grad_scale`` 0)
``trains_head``    the scoring head learns with the SPR loss; ``init_from`` restores it
``separate_prm``   the scoring head reads a frozen *copy* of the backbone (the
                   external-PRM baseline); the policy's own head stays frozen and
                   unsaved, the checkpoint holds ``prm_score_module.pt``
``data``           ``"rollouts"`` (sampled by the policy, GRPO advantages) or
                   ``"solutions"`` (the task's canonical solutions, supervised NLL)
``eval_at_start``  evaluate the starting model as step 0 of the curves
=================  =====================================================================
"""
from __future__ import annotations

from typing import Callable, Literal, TypeVar

from ..errors import ConfigError, UnknownNameError
from ..registry import Registry

DATA_KINDS = ("rollouts", "solutions")


class TrainingMode:
    """What a training mode trains and on which data; subclass it and register the
    subclass with :func:`register_mode` (the registry holds one instance)."""

    name: str = ""                                   # set by register_mode
    trains_policy: bool = False
    trains_head: bool = False
    separate_prm: bool = False
    data: Literal["rollouts", "solutions"] = "rollouts"
    eval_at_start: bool = True

    @property
    def grpo(self) -> bool:
        """The policy learns from the clipped GRPO surrogate (+ KL) on rollouts."""
        return self.trains_policy and self.data == "rollouts"

    @property
    def trains_policy_head(self) -> bool:
        """The head on the policy's own features learns (not in ``separate_prm``)."""
        return self.trains_head and not self.separate_prm

    @property
    def checkpoint_layout(self) -> str:
        """The ``mode`` entry of the checkpoint fingerprint: which tensors a checkpoint
        holds (``"policy"``: adapter + the policy's head; ``"separate_prm"``: adapter +
        the PRM copy's head). Modes with the same layout load each other's checkpoints."""
        return "separate_prm" if self.separate_prm else "policy"

    def check(self) -> None:
        """Raise ConfigError when the flags contradict each other."""
        where = f"training mode {self.name!r}"
        if self.data not in DATA_KINDS:
            raise ConfigError(f"{where}: data={self.data!r}; choose one of {list(DATA_KINDS)}")
        if not (self.trains_policy or self.trains_head):
            raise ConfigError(f"{where} trains nothing; set trains_policy and/or trains_head")
        if self.data == "solutions" and (self.trains_head or not self.trains_policy):
            raise ConfigError(f"{where}: data='solutions' (SFT) trains the policy only; set "
                              f"trains_policy=True, trains_head=False")
        if self.separate_prm and not self.trains_head:
            raise ConfigError(f"{where}: separate_prm=True trains the PRM copy's head; set "
                              f"trains_head=True")

    def __repr__(self) -> str:
        return (f"TrainingMode({self.name!r}, trains_policy={self.trains_policy}, "
                f"trains_head={self.trains_head}, separate_prm={self.separate_prm}, "
                f"data={self.data!r}, eval_at_start={self.eval_at_start})")


MODES: Registry[TrainingMode] = Registry("training mode")

M = TypeVar("M", bound=type)


def register_mode(name: str) -> Callable[[M], M]:
    """Class decorator: register an instance of a :class:`TrainingMode` subclass as
    ``name`` (checked with :meth:`TrainingMode.check`; a taken name raises)."""

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, TrainingMode)):
            raise TypeError(f"register_mode({name!r}) decorates a TrainingMode subclass, "
                            f"got {cls!r}")
        cls.name = name
        mode = cls()
        mode.check()
        MODES.register(name)(mode)
        return cls

    return deco


def get_mode(name: str, where: str = "TrainConfig.mode") -> TrainingMode:
    """The registered mode ``name``; UnknownNameError (a ConfigError) lists the valid ones."""
    try:
        return MODES.get(name)
    except UnknownNameError as e:
        raise UnknownNameError(f"{where}: {e}") from None


def get_head_mode(name: str, where: str, also: tuple[str, ...] = ()) -> TrainingMode:
    """:func:`get_mode` for a caller that evaluates the trained head (the study): a mode
    with ``trains_head`` False is refused too, listing the valid names (+ ``also``)."""
    mode = get_mode(name, where)
    if not mode.trains_head:
        heads = [m for m in MODES if MODES.get(m).trains_head] + list(also)
        raise ConfigError(f"{where}={name!r} trains no scoring head, and it is evaluated "
                          f"here; choose one of: {', '.join(heads)}")
    return mode


# ----------------------------------------------------------------------------- built-in modes

@register_mode("joint")
class Joint(TrainingMode):
    """The paper's form: one forward, policy GRPO loss + KL + SPR loss on its head."""

    trains_policy = True
    trains_head = True


@register_mode("head_only")
class HeadOnly(TrainingMode):
    """Frozen policy; only the head learns from rollouts (cheap ablation)."""

    trains_head = True


@register_mode("sft")
class Sft(TrainingMode):
    """Supervised warm start of the LoRA adapters on canonical solutions."""

    trains_policy = True
    data = "solutions"
    eval_at_start = False


@register_mode("separate_prm")
class SeparatePrm(TrainingMode):
    """GRPO on the policy, and the SPR loss on a *second* frozen copy of the backbone
    with its own head (the external-PRM baseline)."""

    trains_policy = True
    trains_head = True
    separate_prm = True
