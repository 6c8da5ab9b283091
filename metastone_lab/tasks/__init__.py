"""Tasks: problems with verifiable answers (and, for ``arith`` / ``expr`` / ``solve``, step labels).

>>> task = get_task("arith", n_ops_max=3)
>>> p = task.problems("test", 1)[0]
>>> task.is_correct(p.solution, p), task.first_wrong_step(p.solution, p)
(True, -1)
"""
from __future__ import annotations

from typing import Any, Callable

from ..registry import Registry
from .arith import ArithConfig, ArithTask
from .base import SPLITS, Problem, Task
from .expr import ExprConfig, ExprTask
from .jsonl import JsonlConfig, JsonlTask
from .solve import SolveConfig, SolveTask

TASKS: Registry[Callable[..., Task]] = Registry("task")
TASKS.register("arith")(ArithTask)
TASKS.register("expr")(ExprTask)
TASKS.register("jsonl")(JsonlTask)
TASKS.register("solve")(SolveTask)


def get_task(name: str, **options: Any) -> Task:
    """Build task ``name`` with its config options (unknown keys -> ConfigError)."""
    return TASKS.get(name)(**options)


__all__ = ["TASKS", "get_task", "Task", "Problem", "SPLITS", "ArithTask", "ArithConfig",
           "ExprTask", "ExprConfig", "SolveTask", "SolveConfig", "JsonlTask", "JsonlConfig"]
