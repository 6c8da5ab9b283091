"""``arith``: procedurally generated multi-step arithmetic with step-level truth.

Prompt:   ``"Start with 7. Add 5. Multiply by 3. Subtract 4. What is the result?\\n<think>"``
Solution: ``"7 + 5 = 12.\\n\\n12 * 3 = 36.\\n\\n36 - 4 = 32.\\n\\n</think> The answer is 32."``

Difficulty knobs live in :class:`ArithConfig`. Splits are deterministic by
seed and disjoint by construction: a problem's split bucket is a hash of its
question text (train 80%, val 10%, test 10% of the problem space), and the
``ood`` split draws from a held-out family (``ArithConfig.ood`` overrides,
default 5-6 operations) restricted to non-train buckets.

Step checker: steps are the ``'.\\n\\n'``-terminated segments of the reasoning
(:meth:`Task.split_steps`). Step ``i`` is wrong if it does not parse as
``a <op> b = c``, if ``a`` is not the correct running value, if ``<op> b`` is
not the problem's ``i``-th operation (missing, reordered or extra step) or if
``c`` is wrong. If every written step is right but steps are missing or the
final answer does not match, the returned index is ``len(split_steps(text))``
(the conclusion is wrong); -1 when the whole trajectory is right.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import check
from ..errors import ConfigError
from .base import STEP_MARKER, THINK_CLOSE, THINK_OPEN, GeneratedTask, Problem, response_part


@dataclass(frozen=True)
class Operator:
    symbol: str
    phrase: str  # format with {n}
    apply: Callable[[int, int], int | None]  # None: not applicable (e.g. inexact division)


OPERATORS: dict[str, Operator] = {
    "add": Operator("+", "Add {n}", lambda a, b: a + b),
    "sub": Operator("-", "Subtract {n}", lambda a, b: a - b),
    "mul": Operator("*", "Multiply by {n}", lambda a, b: a * b),
    "div": Operator("/", "Divide by {n}", lambda a, b: a // b if b and a % b == 0 else None),
}
_SYMBOL_ALIASES = {"+": "+", "-": "-", "\u2212": "-", "*": "*", "x": "*", "\u00d7": "*",
                   "/": "/", "\u00f7": "/"}
_BY_SYMBOL = {op.symbol: op for op in OPERATORS.values()}
_STEP_RE = re.compile(r"^\s*(-?\d+)\s*([+\-\u2212*x\u00d7/\u00f7])\s*(-?\d+)\s*=\s*(-?\d+)\s*\.?\s*$")
_ANSWER_RE = re.compile(r"The answer is\s*(-?\d+)")
_BUCKETS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0), "ood": (0.8, 1.0)}
DIFFICULTY_KEYS = ("n_ops_min", "n_ops_max", "start_min", "start_max", "operand_min",
                   "operand_max", "mul_operand_max", "operators", "operator_weights",
                   "value_min", "value_max")


@dataclass
class ArithConfig:
    """Difficulty knobs and split sizes of the ``arith`` task.

    Every intermediate value stays in ``[value_min, value_max]`` (operations
    that would leave it are redrawn), so numbers stay small whole tokens.
    ``ood`` holds overrides of the difficulty keys for the held-out family.
    """

    n_ops_min: int = 2
    n_ops_max: int = 4
    start_min: int = 1
    start_max: int = 20
    operand_min: int = 1
    operand_max: int = 9
    mul_operand_max: int | None = 5  # None: same as operand_max
    operators: list[str] = field(default_factory=lambda: ["add", "sub", "mul"])
    operator_weights: list[float] | None = None
    value_min: int = 0
    value_max: int = 199
    seed: int = 0
    n_train: int = 20000
    n_val: int = 500
    n_test: int = 500
    n_ood: int = 500
    ood: dict[str, Any] = field(default_factory=lambda: {"n_ops_min": 5, "n_ops_max": 6})

    def __post_init__(self) -> None:
        check(1 <= self.n_ops_min <= self.n_ops_max <= 32,
              f"ArithConfig: need 1 <= n_ops_min <= n_ops_max <= 32, got "
              f"{self.n_ops_min}..{self.n_ops_max}")
        check(self.start_min <= self.start_max, "ArithConfig: start_min must be <= start_max")
        check(1 <= self.operand_min <= self.operand_max,
              "ArithConfig: need 1 <= operand_min <= operand_max")
        check(self.mul_operand_max is None or self.mul_operand_max >= self.operand_min,
              "ArithConfig: mul_operand_max must be >= operand_min (or null)")
        check(self.value_min <= self.start_min and self.start_max <= self.value_max,
              "ArithConfig: the start range must lie inside [value_min, value_max]")
        check(len(self.operators) > 0, "ArithConfig.operators: give at least one operator")
        for name in self.operators:
            check(name in OPERATORS, f"ArithConfig.operators: unknown operator {name!r}; "
                                     f"choose from {sorted(OPERATORS)}")
        if self.operator_weights is not None:
            check(len(self.operator_weights) == len(self.operators)
                  and all(w >= 0 for w in self.operator_weights) and sum(self.operator_weights) > 0,
                  "ArithConfig.operator_weights: one non-negative weight per operator, not all 0")
        for k in ("n_train", "n_val", "n_test", "n_ood"):
            check(getattr(self, k) >= 0, f"ArithConfig.{k} must be >= 0")
        bad = [k for k in self.ood if k not in DIFFICULTY_KEYS]
        check(not bad, f"ArithConfig.ood: unknown key {bad[0] if bad else ''!r}; valid keys: "
                       f"{', '.join(DIFFICULTY_KEYS)}")

    def family(self, split: str) -> "ArithConfig":
        """The config that generates ``split`` (the ood overrides for ``ood``)."""
        if split != "ood" or not self.ood:
            return self
        return dataclasses.replace(self, **self.ood, ood={})


def _bucket(question: str) -> float:
    h = hashlib.sha1(question.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _draw(cfg: ArithConfig, rng: random.Random) -> tuple[int, list[tuple[str, int]], list[int]] | None:
    n_ops = rng.randint(cfg.n_ops_min, cfg.n_ops_max)
    value = rng.randint(cfg.start_min, cfg.start_max)
    start, ops, values = value, [], []
    for _ in range(n_ops):
        for _attempt in range(50):
            name = rng.choices(cfg.operators, weights=cfg.operator_weights)[0]
            hi = cfg.mul_operand_max if (name == "mul" and cfg.mul_operand_max) else cfg.operand_max
            b = rng.randint(cfg.operand_min, max(cfg.operand_min, hi))
            new = OPERATORS[name].apply(value, b)
            if new is not None and cfg.value_min <= new <= cfg.value_max:
                break
        else:
            return None
        ops.append((OPERATORS[name].symbol, b))
        values.append(new)
        value = new
    return start, ops, values


def render(start: int, ops: list[tuple[str, int]], values: list[int]) -> tuple[str, str, str]:
    """(question, prompt, solution) texts for a problem."""
    phrases = [_BY_SYMBOL[s].phrase.format(n=b) for s, b in ops]
    question = f"Start with {start}. " + ". ".join(phrases) + ". What is the result?"
    prompt = question + "\n" + THINK_OPEN
    lefts = [start] + values[:-1]
    steps = [f"{a} {s} {b} = {c}{STEP_MARKER}" for a, (s, b), c in zip(lefts, ops, values)]
    solution = "".join(steps) + f"{THINK_CLOSE} The answer is {values[-1]}."
    return question, prompt, solution


class IntegerAnswerTask(GeneratedTask):
    """A generated task answered by ``"The answer is <integer>."`` after ``</think>``
    (the last such phrase counts), compared as integers (``arith``, ``expr``)."""

    def extract_answer(self, text: str) -> str | None:
        hits = _ANSWER_RE.findall(response_part(text).split(THINK_CLOSE)[-1]) if THINK_CLOSE in text \
            else _ANSWER_RE.findall(text)
        return hits[-1] if hits else None

    def answers_equal(self, predicted: str, gold: str) -> bool:
        try:
            return int(predicted) == int(gold)
        except ValueError:
            return False


class ArithTask(IntegerAnswerTask):
    """Multi-step arithmetic; see the module docstring."""

    name = "arith"
    config_class = ArithConfig

    def _generate(self, split: str, n: int) -> list[Problem]:
        fam = self.config.family(split)
        lo, hi = _BUCKETS[split]
        rng = random.Random(f"arith:{self.config.seed}:{split}")
        out: list[Problem] = []
        seen: set[str] = set()
        misses = 0
        while len(out) < n:
            drawn = _draw(fam, rng)
            if drawn is None:
                continue
            question, prompt, solution = render(*drawn)
            if question in seen or not (lo <= _bucket(question) < hi):
                misses += 1
                if misses > 200 * n + 10000:
                    raise ConfigError(
                        f"arith: could not draw {n} distinct {split!r} problems; the problem "
                        f"space is too small. Widen the operand/start ranges or n_ops, or ask for fewer.")
                continue
            seen.add(question)
            start, ops, values = drawn
            out.append(Problem(
                id=f"arith-{self.config.seed}-{split}-{len(out)}", question=question,
                answer=str(values[-1]), prompt=prompt, solution=solution,
                meta={"start": start, "ops": [list(o) for o in ops], "values": values,
                      "n_ops": len(ops), "split": split},
            ))
        return out

    def first_wrong_step(self, text: str, problem: Problem) -> int:
        steps = self.split_steps(text)
        start, ops = problem.meta["start"], problem.meta["ops"]
        value = start
        for i, step in enumerate(steps):
            if i >= len(ops):
                return i  # extra step: does not follow from the problem
            m = _STEP_RE.match(step.replace(STEP_MARKER, "", 1) if step.endswith(STEP_MARKER) else step)
            if m is None:
                return i
            a, sym, b, c = int(m[1]), _SYMBOL_ALIASES[m[2]], int(m[3]), int(m[4])
            want_sym, want_b = ops[i]
            if a != value or sym != want_sym or b != want_b:
                return i
            true = _BY_SYMBOL[sym].apply(a, b)
            if true is None or c != true:
                return i
            value = c
        if len(steps) < len(ops):
            return len(steps)
        pred = self.extract_answer(text)
        if pred is None or not self.answers_equal(pred, problem.answer):
            return len(steps)
        return -1
