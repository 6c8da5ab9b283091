"""The local JSONL metrics log: one JSON object per training step, appended
and flushed (fsync) as soon as the step is done, so it survives crashes.

On resume the trainer calls :meth:`JsonlLog.truncate_after` with the step of
the checkpoint it restarts from: rows written after that checkpoint (work the
crash threw away) are dropped, so the resumed run continues the same curve
with no gaps and no duplicate step numbers. A torn last line (killed mid
write) is dropped too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..io_utils import atomic_write_text


class JsonlLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """All complete rows (a torn trailing line is skipped)."""
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def truncate_after(self, step: int) -> int:
        """Keep only rows with ``row['step'] <= step``; return how many were dropped."""
        if not self.path.exists():
            return 0
        rows = self.read()
        keep = [r for r in rows if int(r.get("step", 0)) <= step]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep)
        atomic_write_text(self.path, text)
        return len(rows) - len(keep)

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, sort_keys=True, default=_jsonable) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _jsonable(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
