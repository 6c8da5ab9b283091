"""The spool: a folder where tracking calls are appended to ``ops.jsonl`` (artifacts
copied to ``artifacts/``) instead of reaching MLflow.

It backs local-only mode (``Tracker(local_dir=DIR)``) and a tracker that lost its
server mid-run (``Tracker(spool_dir=DIR)``); :func:`replay_spool` later logs what a
spool holds into an existing run (``metastone-lab run --resume`` does).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from .backend import MlflowBackend
from .names import SPOOL_DIRNAME
from .store import resolve_tracking_uri


class LocalBackend:
    """Append-only ``ops.jsonl`` + ``artifacts/`` in a folder (local mode / spool)."""

    def __init__(self, folder: str | Path, per_run_artifacts: bool = False):
        self.folder = Path(folder)
        self.per_run_artifacts = per_run_artifacts
        self.uri = f"local:{self.folder}"

    def _append(self, rec: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "ops.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def create_run(self, experiment: str, run_name: str | None, tags: dict[str, str]) -> str:
        run_id = "local-" + uuid.uuid4().hex[:16]
        self._append({"op": "create_run", "run_id": run_id, "experiment": experiment,
                      "run_name": run_name, "tags": tags, "time": time.time()})
        return run_id

    def log_batch(self, run_id: str, metrics=(), params=None, tags=None) -> None:
        rec: dict[str, Any] = {"op": "batch", "run_id": run_id}
        if metrics:
            rec["metrics"] = [list(m) for m in metrics]
        if params:
            rec["params"] = dict(params)
        if tags:
            rec["tags"] = {k: str(v) for k, v in tags.items()}
        if len(rec) > 2:
            self._append(rec)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None) -> None:
        src = Path(path)
        base = self.folder / "artifacts"
        if self.per_run_artifacts:
            base = base / run_id
        dst_dir = base / (artifact_path or "")
        dst_dir.mkdir(parents=True, exist_ok=True)
        dst = dst_dir / src.name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.resolve() != dst.resolve():
            shutil.copy2(src, dst)
        self._append({"op": "artifact", "run_id": run_id,
                      "file": str(dst.relative_to(self.folder)), "artifact_path": artifact_path})

    def terminate(self, run_id: str, status: str) -> None:
        self._append({"op": "terminate", "run_id": run_id, "status": status})


def spool_dir_for(output_dir: str | Path) -> Path:
    """Where a point's tracker spools what it could not log: ``<output_dir>/tracking_spool``."""
    return Path(output_dir) / SPOOL_DIRNAME


def replay_spool(folder: str | Path, run_id: str, tracking_uri: str | None = None,
                 *, include_terminate: bool = False, backend: Any = None) -> int:
    """Log the spooled ops of ``folder`` into existing run ``run_id``; return the op count.

    ``create_run`` records are skipped (the caller owns the run), as is
    ``terminate`` unless ``include_terminate``. The spool is renamed to
    ``ops.replayed.jsonl`` afterwards so it is never replayed twice. ``backend`` (an
    open MLflow backend, as :meth:`Tracker.replay_spool` passes) saves opening the
    store ``tracking_uri`` again.
    """
    folder = Path(folder)
    ops_file = folder / "ops.jsonl"
    if not ops_file.is_file():
        return 0
    if backend is None:
        backend = MlflowBackend(tracking_uri or resolve_tracking_uri())
    n = 0
    for line in ops_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from a killed process
            continue
        op = rec.get("op")
        if op == "batch":
            backend.log_batch(run_id, [tuple(m) for m in rec.get("metrics", [])],
                              rec.get("params"), rec.get("tags"))
        elif op == "artifact":
            backend.log_artifact(run_id, folder / rec["file"], rec.get("artifact_path"))
        elif op == "terminate" and include_terminate:
            backend.terminate(run_id, rec["status"])
        else:
            continue
        n += 1
    os.replace(ops_file, folder / "ops.replayed.jsonl")
    return n
