"""Atomic writes never leave a half-written file behind."""
from __future__ import annotations

import json
import os

import pytest

from metastone_lab.errors import MetastoneError
from metastone_lab.io_utils import atomic_dir, atomic_path, atomic_write_json, atomic_write_text


def test_atomic_write_replaces(tmp_path):
    p = tmp_path / "a" / "x.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]


def test_failure_keeps_old_file(tmp_path):
    p = tmp_path / "x.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_dir_swap_and_failure(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "f").write_text("2")
            raise RuntimeError("boom")
    assert (d / "f").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_file_in_the_way_is_a_clear_error(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("not a dir")
    with pytest.raises(MetastoneError, match="a file is in the way"):
        atomic_write_text(blocker / "x.txt", "hi")


def test_unwritable_dir(tmp_path):
    # /sys refuses new entries even for root, so this works under CI (root) too.
    with pytest.raises(MetastoneError, match="not writable"):
        atomic_write_text("/sys/metastone-lab-test/x.txt", "hi")
