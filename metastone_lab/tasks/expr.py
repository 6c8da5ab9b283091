"""``expr``: arithmetic expressions with two evaluation orders (a systematic trap).

Two kinds of problem share the same surface operators:

* PLAIN ``"Compute 3 + 4 * 5.\\n<think>"`` is evaluated with precedence (every
  ``*`` first, leftmost first; then ``+`` / ``-`` left to right):
  ``"4 * 5 = 20.\\n\\n3 + 20 = 23.\\n\\n</think> The answer is 23."``
* BRACKETED ``"Compute ((3 + 4) * 5).\\n<think>"`` is left-nested, so it is
  evaluated strictly left to right:
  ``"3 + 4 = 7.\\n\\n7 * 5 = 35.\\n\\n</think> The answer is 35."``

``ExprConfig.paren_fraction`` mixes the kinds; with ``require_order_matters``
(default) only problems whose two orders give different final answers are
kept, so taking the other kind's order is always wrong and its answer
(``meta["trap_answer"]``) is a visible, systematic error, unlike ``arith``'s
independent slips. Steps use ``arith``'s format (one ``a <op> b = c`` per
operation, ended by the step marker) and the same answer sentence.

Splits are deterministic by seed and disjoint by construction, as in ``arith``:
a problem's split bucket is a hash of its question text (train 80%, val 10%,
test 10%), and ``ood`` draws from a held-out family (``ExprConfig.ood``
overrides, default 5 terms) restricted to non-train buckets.

Step checker: step ``i`` is wrong if it does not parse as ``a <op> b = c`` or
is not the problem's canonical ``i``-th reduction (``meta["steps"]``: wrong
operands or operator, i.e. a wrong order, a missing, reordered or extra step)
or if ``c`` is wrong. If every written step is right but steps are missing or
the final answer does not match, the returned index is
``len(split_steps(text))``; -1 when the whole trajectory is right.

Measured (tiny backbone defaults with ``task_name="expr"``, 200 test problems x
32 samples, T=0.8): 350 steps: pass@1 0.10, pass@32 0.75; 700 steps: pass@1
0.76, pass@32 0.99, majority@32 0.88. Only 0.2-1.5% of the wrong answers equal
``trap_answer`` (either kind): the model reads the bracket cue reliably and its
errors are operand-copy and arithmetic slips, not the wrong order. On ``ood``
(5 terms) the 700-step model fails almost always (pass@1 0.02), again not by
the trap (0.7-2.4% of wrong answers).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

from ..config import check
from ..errors import ConfigError
from .arith import _BUCKETS, _STEP_RE, _SYMBOL_ALIASES, IntegerAnswerTask, _bucket
from .base import STEP_MARKER, THINK_CLOSE, THINK_OPEN, Problem

SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
KINDS = ("plain", "bracketed")
DIFFICULTY_KEYS = ("n_terms_min", "n_terms_max", "first_min", "first_max", "operand_min",
                   "operand_max", "mul_operand_max", "operators", "operator_weights",
                   "value_min", "value_max", "paren_fraction", "require_order_matters",
                   "trap_in_range")

Step = tuple[int, str, int, int]  # a, symbol, b, c


@dataclass
class ExprConfig:
    """Difficulty knobs and split sizes of the ``expr`` task.

    The first term is in ``[first_min, first_max]``, the others in
    ``[operand_min, operand_max]`` (at most ``mul_operand_max`` right of a
    ``*``). Every intermediate value of the problem's own evaluation order stays
    in ``[value_min, value_max]`` (problems that would leave it are redrawn).
    ``paren_fraction`` is the share of bracketed (left-to-right) problems;
    ``require_order_matters`` keeps only problems whose precedence and
    left-to-right answers differ, and ``trap_in_range`` keeps only problems whose
    other order (the trap) also stays in the value range, so the trap's steps and
    answer are made of numbers the model has seen. ``ood`` holds overrides of the difficulty keys
    for the held-out family.
    """

    n_terms_min: int = 3
    n_terms_max: int = 4
    first_min: int = 1
    first_max: int = 20
    operand_min: int = 1
    operand_max: int = 9
    mul_operand_max: int | None = 5  # None: same as operand_max
    operators: list[str] = field(default_factory=lambda: ["add", "sub", "mul"])
    operator_weights: list[float] | None = None
    value_min: int = 0
    value_max: int = 199
    paren_fraction: float = 0.5
    require_order_matters: bool = True
    trap_in_range: bool = True
    seed: int = 0
    n_train: int = 20000
    n_val: int = 500
    n_test: int = 500
    n_ood: int = 500
    ood: dict[str, Any] = field(default_factory=lambda: {"n_terms_min": 5, "n_terms_max": 5})

    def __post_init__(self) -> None:
        check(2 <= self.n_terms_min <= self.n_terms_max <= 32,
              f"ExprConfig: need 2 <= n_terms_min <= n_terms_max <= 32, got "
              f"{self.n_terms_min}..{self.n_terms_max}")
        check(0 <= self.first_min <= self.first_max,
              "ExprConfig: need 0 <= first_min <= first_max")
        check(1 <= self.operand_min <= self.operand_max,
              "ExprConfig: need 1 <= operand_min <= operand_max")
        check(self.mul_operand_max is None or self.mul_operand_max >= self.operand_min,
              "ExprConfig: mul_operand_max must be >= operand_min (or null)")
        check(self.value_min <= self.value_max, "ExprConfig: value_min must be <= value_max")
        check(0.0 <= self.paren_fraction <= 1.0, "ExprConfig.paren_fraction must be in [0, 1]")
        check(len(self.operators) > 0, "ExprConfig.operators: give at least one operator")
        for name in self.operators:
            check(name in SYMBOLS, f"ExprConfig.operators: unknown operator {name!r}; "
                                   f"choose from {sorted(SYMBOLS)}")
        if self.operator_weights is not None:
            check(len(self.operator_weights) == len(self.operators)
                  and all(w >= 0 for w in self.operator_weights) and sum(self.operator_weights) > 0,
                  "ExprConfig.operator_weights: one non-negative weight per operator, not all 0")
        if self.require_order_matters:
            check("mul" in self.operators and len(set(self.operators)) > 1,
                  "ExprConfig: require_order_matters needs 'mul' and 'add' or 'sub' in operators "
                  "(otherwise both evaluation orders always agree); set it to false or add them")
        for k in ("n_train", "n_val", "n_test", "n_ood"):
            check(getattr(self, k) >= 0, f"ExprConfig.{k} must be >= 0")
        bad = [k for k in self.ood if k not in DIFFICULTY_KEYS]
        check(not bad, f"ExprConfig.ood: unknown key {bad[0] if bad else ''!r}; valid keys: "
                       f"{', '.join(DIFFICULTY_KEYS)}")

    def family(self, split: str) -> "ExprConfig":
        """The config that generates ``split`` (the ood overrides for ``ood``)."""
        if split != "ood" or not self.ood:
            return self
        return dataclasses.replace(self, **self.ood, ood={})


def reduce_precedence(terms: list[int], ops: list[str]) -> list[Step]:
    """The reductions of ``terms[0] ops[0] terms[1] ...`` with precedence: every
    ``*`` first (leftmost first), then ``+`` / ``-`` left to right."""
    terms, ops = list(terms), list(ops)
    steps: list[Step] = []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        a, s, b = terms[i], ops[i], terms[i + 1]
        c = _APPLY[s](a, b)
        steps.append((a, s, b, c))
        terms[i:i + 2] = [c]
        del ops[i]
    return steps


def reduce_left_to_right(terms: list[int], ops: list[str]) -> list[Step]:
    """The reductions of the left-nested ``((t0 op t1) op t2) ...``."""
    steps: list[Step] = []
    value = terms[0]
    for s, b in zip(ops, terms[1:]):
        c = _APPLY[s](value, b)
        steps.append((value, s, b, c))
        value = c
    return steps


def reduce(terms: list[int], ops: list[str], kind: str) -> list[Step]:
    """The canonical reductions of a ``kind`` problem (see :data:`KINDS`)."""
    return reduce_precedence(terms, ops) if kind == "plain" else reduce_left_to_right(terms, ops)


def _draw(cfg: ExprConfig, rng: random.Random, kind: str
          ) -> tuple[tuple[list[int], list[str]] | None, int]:
    """((terms, ops) of one ``kind`` problem that passes the value and order filters,
    or None when 200 attempts failed; the number of attempts)."""
    for attempt in range(1, 201):
        n_terms = rng.randint(cfg.n_terms_min, cfg.n_terms_max)
        terms = [rng.randint(cfg.first_min, cfg.first_max)]
        ops: list[str] = []
        for _ in range(n_terms - 1):
            s = SYMBOLS[rng.choices(cfg.operators, weights=cfg.operator_weights)[0]]
            hi = cfg.mul_operand_max if (s == "*" and cfg.mul_operand_max) else cfg.operand_max
            ops.append(s)
            terms.append(rng.randint(cfg.operand_min, max(cfg.operand_min, hi)))
        steps = reduce(terms, ops, kind)
        if not all(cfg.value_min <= c <= cfg.value_max for *_, c in steps):
            continue
        trap = reduce(terms, ops, _other(kind))
        if cfg.require_order_matters and trap[-1][3] == steps[-1][3]:
            continue
        if cfg.trap_in_range and not all(cfg.value_min <= c <= cfg.value_max for *_, c in trap):
            continue
        return (terms, ops), attempt
    return None, 200


def _other(kind: str) -> str:
    return "plain" if kind == "bracketed" else "bracketed"


def render_expression(terms: list[int], ops: list[str], kind: str) -> str:
    """``"3 + 4 * 5"`` (plain) or ``"((3 + 4) * 5)"`` (bracketed)."""
    if kind == "plain":
        return str(terms[0]) + "".join(f" {s} {b}" for s, b in zip(ops, terms[1:]))
    return "(" * len(ops) + str(terms[0]) + "".join(f" {s} {b})" for s, b in zip(ops, terms[1:]))


def render(terms: list[int], ops: list[str], kind: str) -> tuple[str, str, str]:
    """(question, prompt, solution) texts for a problem."""
    check(kind in KINDS, f"expr: unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    question = f"Compute {render_expression(terms, ops, kind)}."
    prompt = question + "\n" + THINK_OPEN
    steps = reduce(terms, ops, kind)
    body = "".join(f"{a} {s} {b} = {c}{STEP_MARKER}" for a, s, b, c in steps)
    solution = body + f"{THINK_CLOSE} The answer is {steps[-1][3]}."
    return question, prompt, solution


class ExprTask(IntegerAnswerTask):
    """Expressions with precedence vs left-to-right evaluation; see the module docstring."""

    name = "expr"
    config_class = ExprConfig

    def _generate(self, split: str, n: int) -> list[Problem]:
        fam = self.config.family(split)
        lo, hi = _BUCKETS[split]
        rng = random.Random(f"expr:{self.config.seed}:{split}")
        out: list[Problem] = []
        seen: set[str] = set()
        misses = 0
        while len(out) < n:
            kind = "bracketed" if rng.random() < fam.paren_fraction else "plain"
            drawn, attempts = _draw(fam, rng, kind)
            misses += attempts - 1  # rejected draws
            if drawn is None:
                misses += 1
            else:
                terms, ops = drawn
                question, prompt, solution = render(terms, ops, kind)
                if question in seen or not (lo <= _bucket(question) < hi):
                    misses += 1
                else:
                    seen.add(question)
                    steps = reduce(terms, ops, kind)
                    trap = reduce(terms, ops, _other(kind))
                    out.append(Problem(
                        id=f"expr-{self.config.seed}-{split}-{len(out)}", question=question,
                        answer=str(steps[-1][3]), prompt=prompt, solution=solution,
                        meta={"kind": kind, "terms": terms, "ops": ops,
                              "steps": [list(s) for s in steps],
                              "trap_answer": str(trap[-1][3]),
                              "trap_steps": [list(s) for s in trap],
                              "n_terms": len(terms), "n_ops": len(ops), "split": split},
                    ))
                    continue
            if misses > 200 * n + 10000:
                raise ConfigError(
                    f"expr: could not draw {n} distinct {split!r} problems; the problem "
                    f"space is too small. Widen the operand/first-term/value ranges or "
                    f"n_terms, or ask for fewer.")
        return out

    def first_wrong_step(self, text: str, problem: Problem) -> int:
        steps = self.split_steps(text)
        canonical = problem.meta["steps"]
        for i, step in enumerate(steps):
            if i >= len(canonical):
                return i  # extra step: does not follow from the problem
            m = _STEP_RE.match(step.replace(STEP_MARKER, "", 1) if step.endswith(STEP_MARKER) else step)
            if m is None:
                return i
            a, sym, b, c = int(m[1]), _SYMBOL_ALIASES[m[2]], int(m[3]), int(m[4])
            if [a, sym, b, c] != list(canonical[i]):
                return i
        if len(steps) < len(canonical):
            return len(steps)
        pred = self.extract_answer(text)
        if pred is None or not self.answers_equal(pred, problem.answer):
            return len(steps)
        return -1
