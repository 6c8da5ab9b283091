"""Content-addressed cache of scored evaluation rollouts (JSON only, no pickle).

A study point = (backbone, training config, evaluation config, seed). Its
held-out samples (every trajectory with its step scores and the scores of
*every* aggregator) and the training record (aha onset, the training log, the
parameter counts) are stored under ``<root>/<sha256 of that content>/``.
Points that differ only in what is computed *from* the scored trajectories
(the aggregator used for the headline numbers, the selectors, the k at which
accuracy is read) hash to the same key and reuse the same files.

Layout of an entry (written atomically; ``COMPLETE`` last)::

    <root>/<key>/key.json       the content that was hashed (for humans)
    <root>/<key>/samples.json   {"test": [...ProblemSamples...], "val": [...]}
    <root>/<key>/train.json     {"aha_onset_step", "evals", "param_counts", "log_rows", ...}
    <root>/<key>/COMPLETE

Clear the cache by deleting the folder; nothing else refers to it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError
from .io_utils import atomic_dir, atomic_write_json, atomic_write_text

VERSION = 2   # 2: inverse-CDF sampling (sampling.draw) replaced torch.multinomial
#: StudyConfig fields that only change how scored trajectories are *read*, never
#: how they are produced: excluded from the key.
READ_ONLY_FIELDS = ("aggregator", "output_dir", "cache_dir")


def content_key(content: Any) -> str:
    """sha256 (hex, 24 chars) of ``content`` as canonical JSON."""
    blob = json.dumps({"v": VERSION, "content": content}, sort_keys=True, default=str,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ------------------------------------------------------------- (de)serialise
def samples_to_json(samples: Sequence[Any]) -> list[dict]:
    """``list[ProblemSamples]`` -> JSON-able list (Problem and Trajectory fields)."""
    out = []
    for ps in samples:
        out.append({"problem": dataclasses.asdict(ps.problem),
                    "gen_seconds": ps.gen_seconds,
                    "trajectories": [dataclasses.asdict(t) for t in ps.trajectories]})
    return out


def samples_from_json(rows: Sequence[dict]) -> list[Any]:
    """Inverse of :func:`samples_to_json`. Entries written before a Trajectory
    field existed load with that field's default (the token stats and ``signals``
    of older entries are empty, so ``generate.evaluate`` leaves the self-signal
    selectors out). -inf signals round-trip (JSON ``-Infinity``)."""
    from .generate import ProblemSamples, Trajectory
    from .tasks.base import Problem

    out = []
    for r in rows:
        trajs = [Trajectory(**t) for t in r["trajectories"]]
        out.append(ProblemSamples(Problem(**r["problem"]), trajs, r.get("gen_seconds", 0.0)))
    return out


@dataclasses.dataclass
class CachedTrainResult:
    """What a study needs from a training run that was not re-run (cache hit).
    Mirrors the fields of ``TrainResult`` that ``study`` reads."""

    aha_onset_step: int | None
    evals: list
    param_counts: dict
    log_rows: list
    steps_done: int = 0
    checkpoint: Any = None
    log_path: Any = None
    last_metrics: dict = dataclasses.field(default_factory=dict)


def train_record(result: Any, log_rows: list[dict] | None = None) -> dict:
    """JSON record of a ``TrainResult`` (or None for an untrained head)."""
    if result is None:
        return {"aha_onset_step": None, "evals": [], "param_counts": {}, "log_rows": [],
                "steps_done": 0}
    if log_rows is None:
        log_rows = []
        lp = getattr(result, "log_path", None)
        if lp is not None and Path(lp).is_file():
            from .plots import read_jsonl

            log_rows = read_jsonl(lp)
    return {"aha_onset_step": getattr(result, "aha_onset_step", None),
            "evals": list(getattr(result, "evals", []) or []),
            "param_counts": dict(getattr(result, "param_counts", {}) or {}),
            "log_rows": log_rows, "steps_done": getattr(result, "steps_done", 0),
            "last_metrics": {k: v for k, v in (getattr(result, "last_metrics", {}) or {}).items()
                             if isinstance(v, (int, float, str, bool)) or v is None}}


# ------------------------------------------------------------------- cache
class RolloutCache:
    """A folder of content-addressed entries (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"rollout cache {str(self.root)!r} is a file, not a folder; "
                              f"delete it or choose another cache_dir")

    def entry(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        return (self.entry(key) / "COMPLETE").is_file()

    def load(self, key: str) -> tuple[list, list, dict] | None:
        """(test samples, val samples, train record) or None when absent/corrupt."""
        d = self.entry(key)
        if not self.has(key):
            return None
        try:
            samples = json.loads((d / "samples.json").read_text(encoding="utf-8"))
            record = json.loads((d / "train.json").read_text(encoding="utf-8"))
            return (samples_from_json(samples["test"]), samples_from_json(samples["val"]),
                    record)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a damaged entry is recomputed, never trusted

    def store(self, key: str, content: Any, test: Sequence[Any], val: Sequence[Any],
              record: dict) -> Path:
        """Write the entry in a temporary folder that replaces ``entry(key)`` only when
        complete: a failed write (full disk, kill) leaves any earlier entry as it was."""
        d = self.entry(key)
        with atomic_dir(d) as tmp:
            atomic_write_json(tmp / "key.json", content)
            atomic_write_text(tmp / "samples.json", json.dumps(
                {"test": samples_to_json(test), "val": samples_to_json(val)},
                separators=(",", ":"), default=str))
            atomic_write_json(tmp / "train.json", record)
            atomic_write_json(tmp / "COMPLETE", {"key": key})
        return d
