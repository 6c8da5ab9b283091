"""``solve``: find the start of an arithmetic chain from its result, by guess and check.

Prompt:   ``"Start with x. Add 5. Multiply by 3. The result is 36. What is x?\\n<think>"``
Solution: ``"x = 7.\\n\\n7 + 5 = 12.\\n\\n12 * 3 = 36.\\n\\n</think> The answer is 7."``

The first step is a guess: the model must invert the whole chain in one
token, which is hard. The later steps CHECK the guess by running the chain
forward, which is as easy as ``arith``. This is the asymmetry process reward
models rely on (checking a step is easier than producing it), and a wrong
guess leaves a visible trace: in every training solution the last value equals
the result given in the prompt, so after a wrong guess the last step must
either break the arithmetic or miss the stated result. Either way the policy
writes a token it finds unlikely, which a head reading the policy's
confidence can learn from outcome labels alone (``docs/testbed.md``).

Problems are ``arith`` problems (the same generator and difficulty knobs,
:class:`SolveConfig` only changes defaults) with the start hidden and the
result shown. The answer (the start) is unique: ``+``, ``-`` and ``*`` by a
positive number are invertible. Splits are deterministic by seed and disjoint
by construction, as in ``arith`` (a hash of the question text picks the split
bucket; ``ood`` is a held-out family, default 4-5 operations).

Step checker: step 0 is wrong unless it is ``x = <the answer>``; step ``i >= 1``
is checked like ``arith``'s step ``i - 1``, starting from the true start. If
every written step is right but steps are missing or the final answer does
not match, the index is ``len(split_steps(text))``; -1 when all is right.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import check
from ..errors import ConfigError
from .arith import (_BUCKETS, _BY_SYMBOL, _STEP_RE, _SYMBOL_ALIASES, ArithConfig,
                    IntegerAnswerTask, _bucket, _draw)
from .base import STEP_MARKER, THINK_CLOSE, THINK_OPEN, Problem

_GUESS_RE = re.compile(r"^\s*x\s*=\s*(-?\d+)\s*\.?\s*$")


@dataclass
class SolveConfig(ArithConfig):
    """``arith``'s knobs (see :class:`~metastone_lab.tasks.arith.ArithConfig`) with
    defaults for the inverse task (1-3 operations, the answer in 1..20), plus how the
    canonical solutions search: ``retry_weights[i]`` is the weight of solutions with
    ``i`` wrong guesses before the right one (``[1.0]``: always guess right at once);
    a first wrong guess is within ``guess_offset_max`` of the answer and every later
    one strictly closer."""

    n_ops_min: int = 1
    n_ops_max: int = 3
    retry_weights: list[float] = field(default_factory=lambda: [1.0])
    guess_offset_max: int = 3
    ood: dict[str, Any] = field(default_factory=lambda: {"n_ops_min": 4, "n_ops_max": 5})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(1 <= len(self.retry_weights) <= 4 and all(w >= 0 for w in self.retry_weights)
              and sum(self.retry_weights) > 0,
              "SolveConfig.retry_weights: 1-4 non-negative weights (index = wrong guesses), not all 0")
        check(self.guess_offset_max >= 1, "SolveConfig.guess_offset_max must be >= 1")


def _chain(x: int, ops: list[tuple[str, int]]) -> list[int]:
    values = []
    for s, b in ops:
        x = _BY_SYMBOL[s].apply(x, b)
        values.append(x)
    return values


def verdict(value: int, result: int) -> str:
    """The check step after a chain: ``"36 = 36"``, ``"33 < 36"`` or ``"40 > 36"``."""
    return f"{value} {'=' if value == result else '<' if value < result else '>'} {result}"


def render(start: int, ops: list[tuple[str, int]], values: list[int],
           wrong_guesses: tuple[int, ...] = ()) -> tuple[str, str, str]:
    """(question, prompt, solution) texts for a problem; the solution tries each of
    ``wrong_guesses`` (checked and rejected) before ``start``."""
    phrases = [_BY_SYMBOL[s].phrase.format(n=b) for s, b in ops]
    result = values[-1]
    question = "Start with x. " + ". ".join(phrases) + f". The result is {result}. What is x?"
    prompt = question + "\n" + THINK_OPEN
    steps: list[str] = []
    for guess in (*wrong_guesses, start):
        chain = _chain(guess, ops)
        steps.append(f"x = {guess}{STEP_MARKER}")
        steps += [f"{a} {s} {b} = {c}{STEP_MARKER}"
                  for a, (s, b), c in zip([guess] + chain[:-1], ops, chain)]
        steps.append(verdict(chain[-1], result) + STEP_MARKER)
    solution = "".join(steps) + f"{THINK_CLOSE} The answer is {start}."
    return question, prompt, solution


def _wrong_guesses(cfg: SolveConfig, rng: random.Random, start: int,
                   ops: list[tuple[str, int]]) -> tuple[int, ...]:
    """A converging search: ``n`` wrong guesses (n drawn by ``retry_weights``), each
    strictly closer to ``start`` than the one before, all with in-range chains."""
    n = rng.choices(range(len(cfg.retry_weights)), weights=cfg.retry_weights)[0]
    out: list[int] = []
    bound = cfg.guess_offset_max
    for _ in range(n):
        offsets = [d for d in range(-bound, bound + 1) if d != 0
                   and cfg.value_min <= start + d
                   and all(cfg.value_min <= v <= cfg.value_max for v in _chain(start + d, ops))]
        if not offsets:
            break
        d = rng.choice(offsets)
        out.append(start + d)
        bound = abs(d) - 1
    return tuple(out)


class SolveTask(IntegerAnswerTask):
    """Guess the start of a chain, then check it forward; see the module docstring."""

    name = "solve"
    config_class = SolveConfig
    phrases = (". The result is ", ". What is x?\n", "x = ", " < ", " > ")

    def _generate(self, split: str, n: int) -> list[Problem]:
        fam = self.config.family(split)
        lo, hi = _BUCKETS[split]
        rng = random.Random(f"solve:{self.config.seed}:{split}")
        out: list[Problem] = []
        seen: set[str] = set()
        misses = 0
        while len(out) < n:
            drawn = _draw(fam, rng)
            if drawn is not None:
                start, ops, values = drawn
                question, prompt, _ = render(start, ops, values)
                if question not in seen and lo <= _bucket(question) < hi:
                    seen.add(question)
                    # its own stream, so the problems do not depend on retry_weights
                    wrong = _wrong_guesses(fam, random.Random(f"solve-search:{question}"), start, ops)
                    _, _, solution = render(start, ops, values, wrong)
                    out.append(Problem(
                        id=f"solve-{self.config.seed}-{split}-{len(out)}", question=question,
                        answer=str(start), prompt=prompt, solution=solution,
                        meta={"start": start, "ops": [list(o) for o in ops], "values": values,
                              "result": values[-1], "wrong_guesses": list(wrong),
                              "n_ops": len(ops), "split": split}))
                    continue
            misses += 1
            if misses > 200 * n + 10000:
                raise ConfigError(
                    f"solve: could not draw {n} distinct {split!r} problems; the problem "
                    f"space is too small. Widen the operand/start ranges or n_ops, or ask for fewer.")
        return out

    def first_wrong_step(self, text: str, problem: Problem) -> int:
        """Attempts are read in turn: a guess ``x = g`` (any integer, but none after a
        check that found the result), the chain run forward from ``g`` (each step as in
        ``arith``) and the check ``verdict(last value, result)``. The first step that
        breaks this is wrong; a rejected guess is not. All steps right but the last
        check not ``=`` or the answer not the last guess (or the gold answer): the
        conclusion is wrong (``len(steps)``)."""
        steps = [_strip_marker(s) for s in self.split_steps(text)]
        ops, result = problem.meta["ops"], problem.meta["result"]
        per_attempt = len(ops) + 2
        solved = False
        guess = value = None
        for i, step in enumerate(steps):
            pos = i % per_attempt
            if pos == 0:
                m = _GUESS_RE.match(step)
                if m is None or solved:
                    return i
                guess = value = int(m[1])
            elif pos <= len(ops):
                m = _STEP_RE.match(step)
                if m is None:
                    return i
                a, sym, b, c = int(m[1]), _SYMBOL_ALIASES[m[2]], int(m[3]), int(m[4])
                want_sym, want_b = ops[pos - 1]
                true = _BY_SYMBOL[sym].apply(a, b)
                if a != value or sym != want_sym or b != want_b or true is None or c != true:
                    return i
                value = c
            else:
                if step.strip().rstrip(".").strip() != verdict(value, result):
                    return i
                solved = value == result
        if not steps or len(steps) % per_attempt or not solved:
            return len(steps)
        pred = self.extract_answer(text)
        if pred is None or not self.answers_equal(pred, problem.answer) or int(pred) != guess:
            return len(steps)
        return -1


def _strip_marker(step: str) -> str:
    return step.replace(STEP_MARKER, "", 1) if step.endswith(STEP_MARKER) else step
