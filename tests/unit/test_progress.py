"""metastone_lab.progress: the kernel's loops report to a file the runner shows."""
from __future__ import annotations

import time

from metastone_lab import progress


def test_report_is_a_noop_outside_the_runner(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    progress.report("sampling", 1, 10)
    assert list(tmp_path.iterdir()) == []


def test_report_describe_and_watcher(tmp_path, monkeypatch):
    path = tmp_path / "progress.json"
    monkeypatch.setenv(progress.ENV, str(path))
    progress.report("sampling", 1, 4, "problems", tok_per_s=900)
    time.sleep(0.6)
    progress.report("sampling", 2, 4, "problems", tok_per_s=950)
    state = progress.read(path)
    assert state["phase"] == "sampling" and state["done"] == 2 and state["total"] == 4
    text = progress.describe(state)
    assert text.startswith("sampling 2/4 problems, tok_per_s 950, ETA ")
    progress.report("sampling", 3, 4)            # throttled: too soon after the last write
    assert progress.read(path)["done"] == 2
    progress.report("sampling", 4, 4)            # the last one is always written
    assert progress.read(path)["done"] == 4 and "ETA" not in progress.describe(progress.read(path))
    seen = []
    with progress.Watcher(path, seen.append, interval_s=0.05):
        time.sleep(0.3)
        progress.report("training", 1, 20, "steps", loss=0.5)   # a new phase: written
        time.sleep(0.3)
    assert seen[0] == "sampling 4/4" and seen[-1].startswith("training 1/20 steps, loss 0.5")
    assert progress.describe(None) == "" and progress.read(tmp_path / "none") is None
