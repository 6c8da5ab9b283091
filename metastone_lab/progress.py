"""Progress of the work inside a notebook kernel, for the runner's terminal.

A papermill kernel's output goes into the executed notebook, not to the terminal of
``metastone-lab run``. So the long loops (the backbone build, training steps,
sampling best-of-N) call :func:`report`, which writes one small JSON file, the path
in ``$METASTONE_LAB_PROGRESS`` (set by the runner for each point; without it
:func:`report` does nothing). The runner reads it about once a second
(:class:`Watcher`) and shows :func:`describe` of it beside its progress bar::

    quickstart:  0%|   | 0/1 [01:12<?, default | sampling 120/500 problems, 900 tok/s, ETA 2m 05s]

Writes are atomic and throttled (at most one per :data:`MIN_INTERVAL_S` within a
phase; a new phase and a loop's last item are always written).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

ENV = "METASTONE_LAB_PROGRESS"
MIN_INTERVAL_S = 0.5
_last: dict[str, float] = {}


def report(phase: str, done: int, total: int | None = None, unit: str = "", **info: Any) -> None:
    """Record that ``phase`` has ``done`` of ``total`` ``unit`` done (``info``: a few
    numbers to show, e.g. ``loss``, ``tokens_per_s``). A no-op outside the runner."""
    path = os.environ.get(ENV)
    if not path:
        return
    now = time.monotonic()
    key = f"start:{phase}:{total}"
    if done <= 1 or key not in _last:    # a new loop (e.g. the validation samples after test)
        _last[key] = now
    start = _last[key]
    same_phase = _last.get("phase") == hash(phase)
    if same_phase and now - _last.get("write", 0.0) < MIN_INTERVAL_S \
            and (total is None or done < total):
        return   # throttled; a new phase and the last item are always written
    _last["write"], _last["phase"] = now, hash(phase)
    state = {"phase": phase, "done": int(done), "total": None if total is None else int(total),
             "unit": unit, "elapsed_s": now - start,
             "info": {k: v for k, v in info.items() if isinstance(v, (int, float, str))}}
    try:
        from .io_utils import atomic_write_json

        atomic_write_json(Path(path), state)
    except OSError:
        pass   # progress is best effort: it never fails the work it reports on


def _duration(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m {sec:02d}s" if m else f"{sec}s"


def describe(state: dict | None) -> str:
    """One line for a progress state: phase, count, the info numbers, and an ETA."""
    if not state:
        return ""
    done, total = state.get("done", 0), state.get("total")
    text = f"{state.get('phase', '')} {done}" + (f"/{total}" if total else "")
    if state.get("unit"):
        text += f" {state['unit']}"
    for k, v in (state.get("info") or {}).items():
        text += f", {k} {v:.3g}" if isinstance(v, float) else f", {k} {v}"
    el = float(state.get("elapsed_s") or 0.0)
    if total and 0 < done < total and el > 0:
        text += f", ETA {_duration(el / done * (total - done))}"
    return text


def read(path: str | os.PathLike) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class Watcher:
    """Polls a progress file in a thread and calls ``show(describe(state))`` when it
    changes; ``with Watcher(path, show): run()``."""

    def __init__(self, path: str | os.PathLike, show: Callable[[str], None],
                 interval_s: float = 1.0):
        self.path, self.show, self.interval_s = Path(path), show, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._seen: str | None = None

    def _poll(self) -> None:
        text = describe(read(self.path))
        if text and text != self._seen:
            self._seen = text
            self.show(text)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


__all__ = ["ENV", "report", "describe", "read", "Watcher"]
