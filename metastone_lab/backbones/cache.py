"""The backbone cache: ``$METASTONE_LAB_CACHE`` (default
``platformdirs.user_cache_dir("metastone-lab")``), layout
``<cache>/backbones/<name>-<config-hash>/``.

A directory counts as built only when its ``COMPLETE`` manifest (written last)
exists and every file it lists is present with the recorded size and sha256.
Builds go into a temporary sibling directory that is renamed into place
(:func:`io_utils.atomic_dir`), so a killed build never leaves a usable-looking
half-written directory; anything incomplete or corrupt is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..io_utils import atomic_write_json

MANIFEST = "COMPLETE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$METASTONE_LAB_CACHE``, else the user cache dir."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("METASTONE_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("metastone-lab"))


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-able config."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def entry_dir(name: str, obj: Any, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "backbones" / f"{name}-{config_hash(obj)}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, extra: dict | None = None) -> dict:
    """Record every file's size and sha256 in ``COMPLETE``; call it LAST."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(directory))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"files": files, **(extra or {})}
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path, verify_hashes: bool = True) -> dict | None:
    """The manifest if ``directory`` is complete and intact, else None."""
    m = directory / MANIFEST
    if not m.is_file():
        return None
    try:
        manifest = json.loads(m.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    if not files:
        return None
    for rel, info in files.items():
        p = directory / rel
        if not p.is_file() or p.stat().st_size != info["size"]:
            return None
        if verify_hashes and _sha256(p) != info["sha256"]:
            return None
    return manifest
