"""Atomic file writes: write to a temporary file in the same directory, fsync,
then ``os.replace``. A process killed mid-write leaves the old file intact."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import MetastoneError, StorageError

#: errno values meaning "no room to write": full disk, quota, file too large
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def is_no_space(e: BaseException) -> bool:
    """True if ``e`` (or what caused it) is a full-disk / quota error. torch.save
    reports one as a RuntimeError ("file write failed") and safetensors as its own error
    type ("No space left on device" / "StorageFull"); both count."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if isinstance(e, RuntimeError) and "file write failed" in str(e):
            return True
        # safetensors (Rust) reports it in its own exception type
        if "No space left on device" in str(e) or "StorageFull" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def storage_error(path: str | os.PathLike, e: BaseException | str, kept: str) -> StorageError:
    """The error for a write to ``path`` that ran out of space; ``kept`` says what survived."""
    return StorageError(
        errno.ENOSPC,
        f"cannot write {str(path)!r}: no space left on the device ({e}). {kept} Free disk "
        f"space, or write elsewhere (--runs-dir, output_dir, METASTONE_LAB_CACHE), and run again")


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise MetastoneError(
            f"cannot create directory {str(path)!r}: a file is in the way ({str(blocker)!r}); "
            f"remove it or choose another output/cache directory"
        ) from None
    except OSError as e:
        raise MetastoneError(
            f"cannot create directory {str(path)!r} ({e.strerror or e}); it is not writable: "
            f"choose a writable output/cache directory (e.g. set METASTONE_LAB_CACHE)"
        ) from None
    if not os.access(path, os.W_OK):
        raise MetastoneError(
            f"directory {str(path)!r} is not writable; choose a writable output/cache directory"
        )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path``."""
    path = Path(path)
    _ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise MetastoneError(
            f"cannot write {str(path)!r} ({e.strerror or e}); free disk space or choose "
            f"another output/cache directory"
        ) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if is_no_space(e) and not isinstance(e, StorageError):
            raise storage_error(path, e, "The previous version of the file (if any) is "
                                         "unchanged.") from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory; on success it atomically replaces ``path``.

    The old directory (if any) is moved aside and deleted only after the new
    one is in place, so a crash never leaves ``path`` half-written.
    """
    path = Path(path)
    _ensure_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(e):  # also a StorageError of a file inside: name the folder
            raise storage_error(path, os.strerror(errno.ENOSPC) if isinstance(e, StorageError) else e,
                                "The previous version of the folder (if any) is unchanged.") from e
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
