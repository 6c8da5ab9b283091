"""A full disk (ENOSPC) during a checkpoint, a rollout-cache entry or an atomic file write:
the previous version stays valid and the error names the path and the fix.

The failure is injected at the write call: the OS error a full disk raises,
``OSError(ENOSPC)``, and the ``RuntimeError("... file write failed")`` torch.save raises for
it. The last two tests do the same on a real 8 MB tmpfs filled to the last byte (they need
root to mount it and are skipped elsewhere)."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _accel_worker import make_micro, make_trainer  # noqa: E402

from metastone_lab.errors import StorageError  # noqa: E402
from metastone_lab.io_utils import atomic_write_json  # noqa: E402
from metastone_lab.rollout_cache import RolloutCache  # noqa: E402
from metastone_lab.training import checkpoint as ck  # noqa: E402

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return make_micro(tmp_path_factory.mktemp("micro"))


def _full_disk(monkeypatch):
    def write_bytes(self, data):
        raise ENOSPC
    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "summary.json"
    atomic_write_json(f, {"v": 1})
    _full_disk(monkeypatch)
    with pytest.raises(StorageError, match="no space left") as ei:
        atomic_write_json(f, {"v": 2})
    assert str(f) in str(ei.value) and "Free disk space" in str(ei.value)
    assert ei.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert json.loads(f.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]   # no temp file left


@pytest.mark.parametrize("error", [ENOSPC, RuntimeError(
    "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
    "data/0: file write failed")], ids=["OSError", "torch-RuntimeError"])
def test_checkpoint_on_a_full_disk_keeps_the_last_one_resumable(micro, tmp_path, monkeypatch,
                                                                error):
    t = make_trainer(micro)
    t.step = 1
    t.save(tmp_path)
    real_save = torch.save

    def save(obj, f, *a, **kw):
        if "optim-" in str(f):   # the adapter and the head are already in the temp dir
            raise error
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ck.torch, "save", save)
    t.step = 2
    with pytest.raises(StorageError) as ei:
        t.save(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path / "ckpt-2") in msg and "ckpt-1" in msg and "Free disk space" in msg
    monkeypatch.undo()
    assert not list(tmp_path.glob(".ckpt-*"))          # the partial checkpoint is removed
    assert (tmp_path / "latest").read_text().strip() == "ckpt-1"
    assert ck.find_resume_checkpoint(tmp_path).name == "ckpt-1"
    make_trainer(micro).load(tmp_path / "ckpt-1")        # still loads


def test_a_kill_mid_checkpoint_is_not_reported_as_a_full_disk(micro, tmp_path, monkeypatch):
    t = make_trainer(micro)
    monkeypatch.setattr(ck, "_AFTER_WRITE", lambda name: (_ for _ in ()).throw(
        KeyboardInterrupt()) if name == "score_module.pt" else None)
    t.step = 1
    with pytest.raises(KeyboardInterrupt):
        t.save(tmp_path)


def test_rollout_cache_entry_on_a_full_disk_keeps_the_earlier_entry(tmp_path, monkeypatch):
    cache = RolloutCache(tmp_path / "cache")
    cache.store("k1", {"c": 1}, [], [], {"steps_done": 3})
    assert cache.load("k1") == ([], [], {"steps_done": 3})
    _full_disk(monkeypatch)
    with pytest.raises(StorageError) as ei:
        cache.store("k1", {"c": 1}, [], [], {"steps_done": 4})
    assert str(tmp_path / "cache") in str(ei.value)
    monkeypatch.undo()
    assert cache.load("k1") == ([], [], {"steps_done": 3})   # the earlier entry, intact
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k1"]


# ------------------------------------------------------- the same on a real full file system
def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def small_fs(tmp_path):
    """A real 8 MB tmpfs (root only; skipped elsewhere), and a function that fills it."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if not _can_mount() or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                                           str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")

    def fill():
        with open(mnt / "filler", "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    try:
        yield mnt, fill
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_real_full_disk_keeps_the_old_file_and_cache_entry(small_fs):
    mnt, fill = small_fs
    f = mnt / "summary.json"
    atomic_write_json(f, {"v": 1})
    cache = RolloutCache(mnt / "cache")
    cache.store("k1", {"c": 1}, [], [], {"steps_done": 3})
    fill()
    with pytest.raises(StorageError, match="no space left") as ei:
        atomic_write_json(f, {"v": "x" * 300_000})
    assert str(f) in str(ei.value)
    with pytest.raises(StorageError):
        cache.store("k1", {"c": 1}, [], [], {"steps_done": 4, "pad": "x" * 300_000})
    assert json.loads(f.read_text()) == {"v": 1}
    assert cache.load("k1") == ([], [], {"steps_done": 3})
    assert sorted(p.name for p in mnt.iterdir()) == ["cache", "filler", "summary.json"]


def test_real_full_disk_during_a_checkpoint_keeps_the_last_one(micro, small_fs):
    mnt, fill = small_fs
    t = make_trainer(micro)
    t.step = 1
    t.save(mnt / "train")
    fill()
    t.step = 2
    with pytest.raises(StorageError) as ei:
        t.save(mnt / "train")
    assert "ckpt-1" in str(ei.value) and str(mnt / "train") in str(ei.value)
    assert not list((mnt / "train").glob(".ckpt-*"))
    assert ck.find_resume_checkpoint(mnt / "train").name == "ckpt-1"
    (mnt / "filler").unlink()
    make_trainer(micro).load(mnt / "train" / "ckpt-1")
