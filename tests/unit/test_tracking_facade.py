"""The runner reaches tracking only through its public façade (``tracking.Tracker`` and
the package's public functions), and the façade's runs-by-id calls do what the runner
needs, against an isolated SQLite store."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from metastone_lab import tracking
from metastone_lab.errors import TrackingError

PKG = Path(__file__).resolve().parents[2] / "metastone_lab"
RUNNER_FILES = sorted((PKG / "runner").glob("*.py"))


def _private_tracking_uses(path: Path) -> list[str]:
    """Every place ``path`` reaches past the tracking façade: ``tracking._x``, a
    ``from ...tracking(.sub) import``, an import of mlflow, or MlflowClient plumbing
    (``.client``, ``._call``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "tracking" \
                    and node.attr.startswith("_"):
                found.append(f"{where} tracking.{node.attr}")
            if node.attr in ("client", "_call", "_backend", "_get_backend"):
                found.append(f"{where} .{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if "tracking" in mod.split(".") or mod.startswith("mlflow"):
                found.append(f"{where} from {'.' * node.level}{mod} import ...")
        elif isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "mlflow" or "tracking" in a.name.split(".")]
    return found


def test_runner_uses_only_the_public_tracking_interface():
    assert len(RUNNER_FILES) > 1, "the runner is a package of small modules"
    leaks = [u for f in RUNNER_FILES for u in _private_tracking_uses(f)]
    assert leaks == [], leaks
    # and it does use the façade (a guard against the check above passing vacuously)
    assert any("tracking.Tracker(" in f.read_text(encoding="utf-8") for f in RUNNER_FILES)


def test_the_leak_check_finds_leaks(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from . import tracking\nbe = tracking._MlflowBackend('x')\n"
                   "be._call('x', be.client.get_run)\ntracking._flatten_params({})\n"
                   "from .tracking.backend import MlflowBackend\nimport mlflow\n")
    assert len(_private_tracking_uses(bad)) == 6


@pytest.mark.parametrize("package", ["tracking", "runner"])
def test_no_module_over_600_lines(package):
    sizes = {f.name: len(f.read_text(encoding="utf-8").splitlines())
             for f in sorted((PKG / package).glob("*.py"))}
    assert sizes and max(sizes.values()) <= 600, sizes


def test_old_import_paths_still_work():
    from metastone_lab import runner

    for name in ("Tracker", "run_url", "experiment_url", "metric_key", "flatten_params",
                 "replay_spool", "spool_dir_for", "notebook_tracker", "runs_frame", "active",
                 "check_reachable", "resolve_tracking_uri", "TrackingError", "OFFLINE"):
        assert hasattr(tracking, name), name
    assert tracking._flatten_params is tracking.flatten_params   # kept for old callers
    for name in ("run_spec", "cli_main", "load_spec", "Spec", "format_value", "terminal_table",
                 "latest_dir", "expand_points", "validate_points", "resolve_spec_path",
                 "RESERVED", "SWEEPS_DIR", "TAG_FAILURE"):
        assert hasattr(runner, name), name
    # bare spec names still resolve to this checkout's experiments/
    assert runner.resolve_spec_path("quickstart").parent == PKG.parent / "experiments"


def test_tracker_runs_by_id(mlflow_sqlite, tmp_path):
    from mlflow.tracking import MlflowClient

    t = tracking.Tracker(mlflow_sqlite).connect()
    assert t.find_experiment("facade") is None and t.find_runs("facade", {"a": "b"}) == []
    parent = t.create_run("facade", "sweep", {tracking.TAG_ROLE: "sweep", "none": None})
    child = t.create_run("facade", "p1", {tracking.TAG_ROLE: "point", tracking.TAG_PARENT: parent})
    assert t.run_id is None and tracking.active().enabled is False   # not the current run
    t.log_batch(child, metrics={"pass@1": 0.5}, params={"k": "8"}, tags={"n": 3})
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"pass@1": 0.5}))
    t.log_run_artifact(child, summary)
    t.terminate(child, "FINISHED")

    exp_id = t.find_experiment("facade")
    assert exp_id == t.experiment_id("facade")
    points = t.find_runs("facade", {tracking.TAG_ROLE: "point"}, status="FINISHED")
    assert [(r.run_id, r.status, r.tags["n"]) for r in points] == [(child, "FINISHED", "3")]
    assert t.find_runs("facade", {tracking.TAG_ROLE: "point"}, status="RUNNING") == []
    newest = t.find_runs("facade", {tracking.TAG_ROLE: "sweep"}, newest_first=True, max_results=1)
    assert [r.run_id for r in newest] == [parent] and "none" not in newest[0].tags

    c = MlflowClient(tracking_uri=mlflow_sqlite)
    run = c.get_run(child)
    assert run.data.metrics == {"pass_at_1": 0.5} and run.data.params == {"k": "8"}
    assert [a.path for a in c.list_artifacts(child)] == ["summary.json"]
    t.terminate(parent, "FAILED")
    t.set_status(parent, "RUNNING")                    # --resume reopens a sweep run
    assert c.get_run(parent).info.status == "RUNNING"

    # a spool written offline is replayed into the run through the same tracker
    spool = tmp_path / "spool"
    offline = tracking.Tracker.resume(tracking.OFFLINE, spool_dir=spool)
    offline.log_metrics({"loss": 1.5}, step=2)
    offline.close()
    assert t.replay_spool(spool, parent) == 1 and t.replay_spool(spool, parent) == 0
    assert [(m.step, m.value) for m in c.get_metric_history(parent, "loss")] == [(2, 1.5)]


def test_queries_need_an_mlflow_store(tmp_path):
    local = tracking.Tracker(local_dir=tmp_path / "local")
    run_id = local.create_run("x", "r", {"a": 1})     # writes work: ops.jsonl
    local.terminate(run_id)
    assert (tmp_path / "local" / "ops.jsonl").is_file()
    with pytest.raises(TrackingError, match="needs an MLflow store"):
        local.find_runs("x", {"a": "1"})


def test_probe_names_a_dead_server():
    t = tracking.Tracker("http://127.0.0.1:1", probe_timeout_s=1.0)
    with pytest.raises(TrackingError, match="not reachable"):
        t.probe()
    with pytest.raises(TrackingError, match="not reachable"):
        t.connect()
