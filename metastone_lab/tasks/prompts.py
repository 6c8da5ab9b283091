"""Prompt formats: how a problem's question is shown to a backbone.

A task's problems carry a ``prompt`` for models trained on its own format (the
tiny default: ``"<question>\\n<think>"``). A pretrained instruction model such
as SmolLM2-135M-Instruct does not follow that raw text (pass@1 0.0 on ``arith``);
it needs its chat template and a few worked examples. :func:`apply_prompt_format`
wraps a task so that every problem it hands out (training, validation, test)
carries the formatted prompt; judging (answers, step labels) is unchanged,
because the model's response has the same form: steps, ``</think>``, the answer.

Styles (registry :data:`PROMPT_STYLES`):

``plain``  the task's own prompt, after ``shots`` worked examples
           (``prompt + solution``, separated by a blank line). The model must
           stop by itself (eos) after the answer.
``chat``   the tokenizer's chat template: an optional system ``instruction``,
           ``shots`` worked examples as user/assistant turns, the question as the
           last user turn, then ``"<think>"`` to open the response. The model
           ends its turn with its eos token (``<|im_end|>`` for SmolLM2).

Worked examples are the first ``shots`` problems of the ``train`` split, so
they never overlap validation, test or ood problems; the wrapped task's
``train`` split starts after them (no problem is shown its own solution).

Usage (``prompt_format`` in a study or training config)::

    prompt_format: {style: chat, shots: 2}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..config import check, from_dict
from ..errors import ConfigError
from ..registry import Registry
from .base import THINK_OPEN, Problem, Task

DEFAULT_INSTRUCTION = ("Solve the arithmetic problem step by step, one operation per line, "
                       "then give the final answer.")


@dataclass
class PromptFormat:
    """``style``: a :data:`PROMPT_STYLES` name; ``shots``: worked train examples
    shown first; ``instruction``: the chat system message ("" for none)."""

    style: str = "plain"
    shots: int = 0
    instruction: str = DEFAULT_INSTRUCTION

    def __post_init__(self) -> None:
        PROMPT_STYLES.get(self.style)
        check(0 <= self.shots <= 16, f"PromptFormat.shots must be in [0, 16], got {self.shots}")

    @property
    def is_identity(self) -> bool:
        return self.style == "plain" and self.shots == 0


#: style name -> fn(problem, examples, fmt, tokenizer) -> prompt text (ends with "<think>")
PROMPT_STYLES: Registry[Callable[[Problem, list[Problem], PromptFormat, Any], str]] = \
    Registry("prompt style")


@PROMPT_STYLES.register("plain")
def plain_prompt(problem: Problem, examples: list[Problem], fmt: PromptFormat,
                 tokenizer: Any) -> str:
    shown = "".join(f"{ex.prompt}{ex.solution}\n\n" for ex in examples)
    return shown + problem.prompt


@PROMPT_STYLES.register("chat")
def chat_prompt(problem: Problem, examples: list[Problem], fmt: PromptFormat,
                tokenizer: Any) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("prompt_format style 'chat' needs a tokenizer with a chat template; "
                          "this backbone's tokenizer has none. Use style: plain (optionally "
                          "with shots) for base models")
    messages = [{"role": "system", "content": fmt.instruction}] if fmt.instruction else []
    for ex in examples:
        messages += [{"role": "user", "content": ex.question},
                     {"role": "assistant", "content": THINK_OPEN + (ex.solution or "")}]
    messages.append({"role": "user", "content": problem.question})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + THINK_OPEN


class PromptedTask(Task):
    """``task`` with every problem's ``prompt`` rewritten by a :class:`PromptFormat`.

    Judging is delegated to the wrapped task (its ``stats`` are the ones counted).
    """

    def __init__(self, task: Task, fmt: PromptFormat, tokenizer: Any) -> None:
        super().__init__()
        self.inner, self.fmt, self.tokenizer = task, fmt, tokenizer
        self.name = task.name
        self.stats = task.stats
        examples = task.problems("train", fmt.shots) if fmt.shots else []
        if len(examples) < fmt.shots:
            raise ConfigError(f"prompt_format.shots={fmt.shots}, but task {task.name!r} has only "
                              f"{len(examples)} train problems to show; lower shots")
        if any(ex.solution is None for ex in examples):
            raise ConfigError(f"prompt_format.shots needs worked solutions, and task "
                              f"{task.name!r} has train problems without one; set shots: 0")
        self.examples = examples
        self._render = PROMPT_STYLES.get(fmt.style)

    def problems(self, split: str, n: int | None = None) -> list[Problem]:
        skip = len(self.examples) if split == "train" else 0
        if n is None:
            n = self.default_size(split)
        raw = self.inner.problems(split, n + skip)[skip:]
        return [dataclasses.replace(p, prompt=self._render(p, self.examples, self.fmt,
                                                           self.tokenizer)) for p in raw]

    def default_size(self, split: str) -> int:
        skip = len(self.examples) if split == "train" else 0
        return max(0, self.inner.default_size(split) - skip)

    def extract_answer(self, text: str) -> str | None:
        return self.inner.extract_answer(text)

    def answers_equal(self, predicted: str, gold: str) -> bool:
        return self.inner.answers_equal(predicted, gold)

    def is_correct(self, text: str, problem: Problem) -> bool:
        return self.inner.is_correct(text, problem)

    def first_wrong_step(self, text: str, problem: Problem) -> int | None:
        return self.inner.first_wrong_step(text, problem)

    def split_steps(self, text: str) -> list[str]:
        return self.inner.split_steps(text)


def parse_prompt_format(options: PromptFormat | Mapping[str, Any] | None,
                        where: str = "prompt_format") -> PromptFormat:
    """A :class:`PromptFormat` from itself or its dict; unknown keys, wrong types
    and unknown styles raise ConfigError naming ``where`` (configs call this in
    ``__post_init__`` so a bad format fails on load)."""
    if isinstance(options, PromptFormat):
        return options
    return from_dict(PromptFormat, dict(options or {}), where=where)


def apply_prompt_format(task: Task, tokenizer: Any,
                        options: PromptFormat | Mapping[str, Any] | None) -> Task:
    """``task`` itself for the identity format (plain, no shots), else a
    :class:`PromptedTask`. A task that is already formatted is re-formatted from
    its unformatted problems (formats never stack)."""
    fmt = parse_prompt_format(options)
    base = task.inner if isinstance(task, PromptedTask) else task
    return base if fmt.is_identity else PromptedTask(base, fmt, tokenizer)
