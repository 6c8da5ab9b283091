"""``jsonl``: real GSM8K/MATH-style data from ``{question, answer}`` rows.

The gold answer is taken from the answer field: the text after GSM8K's
``####``, else the last ``\\boxed{}``, else the whole field. Generated text is
judged with :func:`answers.extract_math_answer` + :func:`answers.math_equal`
(math-verify, sympy fallback). No step labels: ``first_wrong_step`` is None.

Bad rows (invalid JSON, missing/empty question or answer) are reported with
their line number. ``on_bad_row="skip"`` (default) skips and counts them in
``task.bad_rows`` / ``task.stats['bad_rows']``; ``on_bad_row="fail"`` raises
:class:`DataError` at the first one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import check, from_dict
from ..errors import ConfigError, DataError
from .answers import extract_boxed, extract_math_answer, math_equal
from .base import SPLITS, THINK_OPEN, Problem, Task, check_split


@dataclass
class JsonlConfig:
    """``files`` maps split -> path; ``path`` is shorthand for ``{path_split: path}``."""

    path: str | None = None
    path_split: str = "test"
    files: dict[str, str] = field(default_factory=dict)
    question_key: str = "question"
    answer_key: str = "answer"
    on_bad_row: Literal["skip", "fail"] = "skip"
    prompt_template: str = "{question}\n" + THINK_OPEN

    def __post_init__(self) -> None:
        check(self.path is not None or bool(self.files),
              "jsonl task: give path=<file.jsonl> or files={split: file}")
        check(self.path_split in SPLITS,
              f"jsonl task: path_split {self.path_split!r} is not one of {', '.join(SPLITS)}")
        for s in self.files:
            check(s in SPLITS, f"jsonl task: files has unknown split {s!r}; "
                               f"choose from {', '.join(SPLITS)}")
        check(self.prompt_template.endswith(THINK_OPEN) and "{question}" in self.prompt_template,
              "jsonl task: prompt_template must contain {question} and end with <think>")

    def split_files(self) -> dict[str, str]:
        out = dict(self.files)
        if self.path is not None:
            out.setdefault(self.path_split, self.path)
        return out


def gold_answer(answer_field: str) -> str:
    """The final answer inside a dataset's answer field (GSM8K ``####`` / boxed / raw)."""
    if "####" in answer_field:
        return answer_field.rsplit("####", 1)[1].strip()
    boxed = extract_boxed(answer_field)
    return boxed if boxed is not None else answer_field.strip()


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, config: JsonlConfig | None = None, **options: Any) -> None:
        super().__init__()
        if config is not None and options:
            raise ConfigError("jsonl: pass either config= or keyword options, not both")
        self.config = config if config is not None else from_dict(JsonlConfig, options)
        self.bad_rows: list[tuple[str, int, str]] = []  # (file, line number, reason)
        self._cache: dict[str, list[Problem]] = {}

    def problems(self, split: str, n: int | None = None) -> list[Problem]:
        check_split(split)
        files = self.config.split_files()
        if split not in files:
            raise ConfigError(f"jsonl task has no file for split {split!r}; it has "
                              f"{sorted(files) or 'none'}. Add files={{'{split}': path}}")
        if split not in self._cache:
            self._cache[split] = self._read(Path(files[split]), split)
        rows = self._cache[split]
        return rows if n is None else rows[:n]

    def _bad(self, path: Path, lineno: int, reason: str) -> None:
        msg = f"{path}:{lineno}: {reason}"
        if self.config.on_bad_row == "fail":
            raise DataError(f"{msg}. Fix the row, or pass on_bad_row='skip' to skip and count bad rows")
        self.bad_rows.append((str(path), lineno, reason))
        self.stats["bad_rows"] += 1

    def _read(self, path: Path, split: str) -> list[Problem]:
        if not path.is_file():
            raise DataError(f"jsonl task: data file {str(path)!r} does not exist; check the path")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e}); re-encode the file as UTF-8") from None
        if not text.strip():
            raise DataError(f"{path}: the file is empty; it must hold one JSON object per line "
                            f"with {self.config.question_key!r} and {self.config.answer_key!r}")
        qk, ak = self.config.question_key, self.config.answer_key
        out: list[Problem] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                self._bad(path, lineno, f"invalid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                self._bad(path, lineno, "expected a JSON object")
                continue
            missing = [k for k in (qk, ak) if not isinstance(row.get(k), (str, int, float))
                       or str(row.get(k)).strip() == ""]
            if missing:
                self._bad(path, lineno, f"missing or empty field(s) {missing}")
                continue
            question, answer_field = str(row[qk]), str(row[ak])
            rid = row.get("id") or hashlib.sha1(question.encode()).hexdigest()[:12]
            has_reasoning = "####" in answer_field
            out.append(Problem(
                id=f"{split}-{rid}", question=question, answer=gold_answer(answer_field),
                prompt=self.config.prompt_template.format(question=question),
                solution=answer_field if has_reasoning else None,
                meta={"file": str(path), "line": lineno,
                      **{k: v for k, v in row.items() if k not in (qk, ak)}},
            ))
        if not out:
            raise DataError(f"{path}: no usable rows ({len(self.bad_rows)} bad); "
                            f"each line needs {qk!r} and {ak!r}")
        return out

    def extract_answer(self, text: str) -> str | None:
        return extract_math_answer(text)

    def answers_equal(self, predicted: str, gold: str) -> bool:
        return math_equal(predicted, gold)
