"""The runs folder: one new folder per execution of a point (``<run-id>``, never
overwritten), a ``latest`` pointer per point, and the JSON records read back from it."""
from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path

from ..io_utils import atomic_write_text


def numeric_values(summary: dict) -> dict[str, float]:
    """The finite numeric values of a summary (bools as 0/1): what is logged as metrics."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def read_json(path: Path) -> dict | None:
    """A JSON object read from ``path``; None if it is missing, torn or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


LATEST_LINK, LATEST_FILE, RUN_RECORD, SWEEPS_DIR, TRAIN_DIR = (
    "latest", "LATEST", "run.json", "_sweeps", "train")
#: what the kernel reports on its long loops (metastone_lab.progress), in a point's run folder
PROGRESS_FILE = "progress.json"


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-<6 hex>``: sorts by start time, unique without coordination."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def set_latest(folder: Path, name: str) -> None:
    """Point ``folder/latest`` at ``folder/name``: a relative symlink replaced
    atomically, or (where symlinks fail) the text file ``folder/LATEST``."""
    link = folder / LATEST_LINK
    tmp = folder / f".{LATEST_LINK}.{secrets.token_hex(4)}"
    try:
        os.symlink(name, tmp, target_is_directory=True)
        os.replace(tmp, link)
        (folder / LATEST_FILE).unlink(missing_ok=True)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write_text(folder / LATEST_FILE, name + "\n")


def latest_dir(folder: Path) -> Path | None:
    """The folder ``folder/latest`` (or ``folder/LATEST``) points at, if it exists."""
    link = folder / LATEST_LINK
    if link.is_symlink() or link.is_dir():
        return link.resolve() if link.resolve().is_dir() else None
    try:
        name = (folder / LATEST_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return folder / name if name and (folder / name).is_dir() else None
