"""The task contract: a :class:`Problem` record and the :class:`Task` interface.

A task yields problems per split and judges generated text: it extracts the
final answer, checks it, splits the reasoning into steps and (where the task
has step-level ground truth) finds the first wrong step (ProcessBench
convention: ``-1`` when no step is wrong).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import ConfigError

SPLITS = ("train", "val", "test", "ood")
STEP_MARKER = ".\n\n"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Problem:
    """One problem.

    ``prompt`` is the text fed to the model and ends with ``"<think>"``;
    ``solution`` is the canonical response (what follows the prompt, no eos).
    """

    id: str
    question: str
    answer: str
    prompt: str
    solution: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def response_part(text: str) -> str:
    """The response of ``text``: everything after the first ``<think>`` if the
    prompt was included, else ``text`` unchanged."""
    i = text.find(THINK_OPEN)
    return text[i + len(THINK_OPEN):] if i >= 0 else text


def think_part(text: str) -> str:
    """The reasoning of a response: between ``<think>`` (if any) and ``</think>``
    (or the end of the text when it is missing)."""
    r = response_part(text)
    j = r.find(THINK_CLOSE)
    return r if j < 0 else r[:j]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")


class Task:
    """Base class; subclasses implement ``problems`` and ``extract_answer``.

    ``stats`` counts judged texts: ``judged`` and ``unparsable`` (texts with
    no extractable answer, scored incorrect rather than raising).
    """

    name: str = "task"
    #: fixed phrases of the task's texts; the tiny backbone's tokenizer makes each one token
    phrases: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.stats: Counter = Counter()

    def problems(self, split: str, n: int | None = None) -> list[Problem]:
        raise NotImplementedError

    def extract_answer(self, text: str) -> str | None:
        raise NotImplementedError

    def answers_equal(self, predicted: str, gold: str) -> bool:
        return predicted.strip() == gold.strip()

    def is_correct(self, text: str, problem: Problem) -> bool:
        """True iff the answer extracted from ``text`` equals ``problem.answer``.
        An unparsable answer is False and counted in ``stats['unparsable']``."""
        self.stats["judged"] += 1
        pred = self.extract_answer(text)
        if pred is None:
            self.stats["unparsable"] += 1
            return False
        return self.answers_equal(pred, problem.answer)

    def first_wrong_step(self, text: str, problem: Problem) -> int | None:
        """Index of the first wrong step, -1 if none; None when the task has no
        step labels (the default)."""
        return None

    def split_steps(self, text: str) -> list[str]:
        """The reasoning steps of a response: segments of the ``<think>`` part
        that end with the step marker ``'.\\n\\n'`` (marker kept), plus a
        non-empty unterminated tail. Paragraph breaks split too when no
        marker occurs (free-form text)."""
        body = think_part(text)
        parts: list[str] = []
        sep = STEP_MARKER if STEP_MARKER in body else "\n\n"
        rest = body
        while True:
            i = rest.find(sep)
            if i < 0:
                break
            parts.append(rest[: i + len(sep)])
            rest = rest[i + len(sep):]
        if rest.strip():
            parts.append(rest)
        return [p for p in parts if p.strip()]


class GeneratedTask(Task):
    """A task whose problems come from a seeded generator (``arith``, ``expr``): the
    config (``config=`` or keyword options, validated by ``from_dict``), split sizes
    (``config.n_<split>``) and a per-split cache, so a shorter list is always a prefix
    of a longer one. Subclasses set ``config_class`` (a dataclass with ``n_<split>``
    fields and ``family(split)``) and implement ``_generate(split, n)``."""

    config_class: type = object

    def __init__(self, config=None, **options) -> None:
        from ..config import from_dict

        super().__init__()
        if config is not None and options:
            raise ConfigError(f"{self.name}: pass either config= or keyword options, not both")
        self.config = config if config is not None else from_dict(self.config_class, options)
        self.config.family("ood").__post_init__()  # validate the ood family early
        self._cache: dict[str, list[Problem]] = {}

    def default_size(self, split: str) -> int:
        return getattr(self.config, f"n_{split}")

    def problems(self, split: str, n: int | None = None) -> list[Problem]:
        """The first ``n`` problems of ``split`` (default: the configured size).
        Deterministic in ``config.seed``; a shorter list is a prefix of a longer one."""
        check_split(split)
        n = self.default_size(split) if n is None else n
        if n < 0:
            raise ConfigError(f"problems: n must be >= 0, got {n}")
        have = self._cache.get(split, [])
        if len(have) < n:
            have = self._generate(split, n)
            self._cache[split] = have
        return have[:n]

    def _generate(self, split: str, n: int) -> list[Problem]:
        raise NotImplementedError
