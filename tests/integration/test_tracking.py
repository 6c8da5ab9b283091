"""metastone_lab.tracking against an isolated SQLite store (no server needed)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from metastone_lab import tracking
from metastone_lab.errors import TrackingError


@dataclass
class _Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class _Cfg:
    name: str = "demo"
    opt: _Inner = field(default_factory=_Inner)


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: nothing listens


def test_import_is_cheap_and_lazy():
    code = "import sys, metastone_lab.tracking; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_resolve_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("METASTONE_LAB_HOME", str(tmp_path))
    uri = tracking.resolve_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlruns.db'}"
    assert tracking.artifact_root(uri) == tmp_path.resolve() / "mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:1"
    assert tracking.artifact_root("http://127.0.0.1:1") is None


def test_metric_key_sanitises():
    assert tracking.metric_key("pass@1") == "pass_at_1"
    assert tracking.metric_key("bon@32") == "bon_at_32"
    assert tracking.metric_key("a(b)") == "a_b_"
    assert tracking.metric_key("train/loss") == "train/loss"


def test_active_is_noop_outside_runs():
    t = tracking.active()
    assert t.enabled is False
    t.log_metrics({"x": 1.0}, step=3)  # must not raise
    t.log_figure(None, "x.png")


def test_run_logs_params_metrics_artifacts(mlflow_sqlite, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = tracking.Tracker(flush_every=500, flush_interval_s=1e9)
    with tr.run("exp-a", run_name="r1", params=_Cfg(), tags={"spec": "s"}) as t:
        assert tracking.active() is t
        for step in range(1200):
            tracking.active().log_metrics({"loss": 1.0 / (step + 1), "pass@1": 0.5}, step=step)
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        t.log_figure(fig, "curve.png")
        t.log_table({"k": [1, 2], "acc": [0.1, 0.2]}, "table.json")
        t.log_dict({"a": 1}, "sub/d.json")
        run_id = t.run_id
    assert tracking.active().enabled is False
    # 2400 values -> 4 size-triggered flushes of 500 + 1 at run end, not 2400 calls
    assert tr.n_flushes == 5
    c = _client(mlflow_sqlite)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["opt.lr"] == "0.001" and run.data.params["name"] == "demo"
    assert run.data.tags["spec"] == "s"
    assert run.data.tags[tracking.TAG_GIT] == tracking.git_commit()
    hist = c.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in hist) == list(range(1200))
    assert len(c.get_metric_history(run_id, "pass_at_1")) == 1200
    arts = {a.path for a in c.list_artifacts(run_id)}
    assert {"curve.png", "table.json", "sub"} <= arts
    assert [a.path for a in c.list_artifacts(run_id, "sub")] == ["sub/d.json"]
    # artifacts live under the store's folder, not ./mlruns of the cwd
    assert run.info.artifact_uri.startswith((tracking.artifact_root(mlflow_sqlite)).as_uri())
    local = c.download_artifacts(run_id, "table.json", str(tmp_path))
    assert json.load(open(local)) == {"columns": ["k", "acc"], "data": [[1, 0.1], [2, 0.2]]}
    # the experiment opens as a model-training experiment in the UI, not the GenAI view
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an empty dict is no parameter (its keys, when set, are)
    assert tracking._flatten_params({"train": {}, "k": 2, "o": {"a": 1}}) == {"k": "2", "o.a": "1"}
    # registered as MLflow registers a logged table: the UI lists it, load_table reads it
    assert json.loads(run.data.tags["mlflow.loggedArtifacts"]) == [{"path": "table.json",
                                                                   "type": "table"}]
    got = c.load_table(run.info.experiment_id, "table.json", run_ids=[run_id])
    assert got[["k", "acc"]].values.tolist() == [[1, 0.1], [2, 0.2]]


def test_exception_marks_failed_with_traceback(mlflow_sqlite, tmp_path):
    tr = tracking.Tracker()
    with pytest.raises(ZeroDivisionError):
        with tr.run("exp-b") as t:
            run_id = t.run_id
            t.log_metrics({"x": 1.0}, step=0)
            1 / 0
    c = _client(mlflow_sqlite)
    run = c.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics["x"] == 1.0  # buffered metric flushed before failing
    tb = open(c.download_artifacts(run_id, "traceback.txt", str(tmp_path))).read()
    assert "ZeroDivisionError" in tb
    assert tracking.active().enabled is False


def test_nested_runs_get_parent_tag(mlflow_sqlite):
    tr = tracking.Tracker()
    with tr.run("exp-c", run_name="parent") as t:
        parent = t.run_id
        with tr.run("exp-c", run_name="child", nested=True) as t2:
            child = t2.run_id
            assert tracking.active().run_id == child
        assert tracking.active().run_id == parent
    run = _client(mlflow_sqlite).get_run(child)
    assert run.data.tags[tracking.TAG_PARENT] == parent


def test_unreachable_server_errors_fast(monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as ei:
        with tracking.Tracker().run("exp"):
            pass
    elapsed = time.monotonic() - t0
    assert elapsed < 10, elapsed
    msg = str(ei.value)
    assert uri in msg and "MLFLOW_TRACKING_URI" in msg and "mlflow server" in msg


def test_unwritable_sqlite_folder_is_clear(tmp_path):
    uri = f"sqlite:///{tmp_path / 'missing' / 'db.sqlite'}"
    with pytest.raises(TrackingError, match="does not exist or is not writable"):
        tracking.Tracker(uri).start("exp")


def test_local_only_mode_writes_ops(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # must not be touched
    tr = tracking.Tracker(local_dir=tmp_path / "local")
    with tr.run("exp", params={"k": 8}) as t:
        t.log_metrics({"acc": 0.5}, step=2)
        t.log_dict({"a": 1}, "d.json")
        run_id = t.run_id
    ops = [json.loads(l) for l in (tmp_path / "local" / "ops.jsonl").read_text().splitlines()]
    kinds = [o["op"] for o in ops]
    assert kinds[0] == "create_run" and kinds[-1] == "terminate"
    assert ops[-1]["status"] == "FINISHED"
    assert any(o.get("params") == {"k": "8"} for o in ops)
    assert any(o.get("metrics") and o["metrics"][0][:3] == ["acc", 0.5, 2] for o in ops)
    assert (tmp_path / "local" / "artifacts" / run_id / "d.json").is_file()


def test_outage_spools_then_replays(mlflow_sqlite, tmp_path):
    """A tracker whose server is gone keeps working into its spool; replay logs it."""
    c = _client(mlflow_sqlite)
    exp = c.create_experiment("spool", artifact_location=(tmp_path / "art").as_uri())
    run_id = c.create_run(exp).info.run_id
    dead = f"http://127.0.0.1:{_closed_port()}"
    spool = tmp_path / "spool"
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="spooling"):
        t = tracking.Tracker.resume(run_id, dead, spool_dir=spool)
        for s in range(3):
            t.log_metrics({"loss": float(s)}, step=s)
        t.log_dict({"x": 1}, "x.json")
        t.close()
    assert time.monotonic() - t0 < 10
    assert t.spooling
    assert tracking.replay_spool(spool, run_id, mlflow_sqlite) == 2
    assert sorted(m.step for m in c.get_metric_history(run_id, "loss")) == [0, 1, 2]
    assert [a.path for a in c.list_artifacts(run_id)] == ["x.json"]
    assert c.get_run(run_id).info.status == "RUNNING"  # the owner terminates it
    assert tracking.replay_spool(spool, run_id, mlflow_sqlite) == 0  # never twice


def test_notebook_tracker_interactive_owns_its_run(mlflow_sqlite):
    """Outside the runner (mlflow_run_id None) a notebook starts and closes its own run."""
    t = tracking.notebook_tracker(None, mlflow_sqlite, None, experiment="nb",
                                  params={"k": 4}, notebook="quickstart.ipynb")
    assert tracking.active() is t
    run_id = t.run_id
    t.log_metrics({"acc": 0.25}, step=1)
    t.close()
    assert tracking.active().enabled is False
    run = _client(mlflow_sqlite).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"k": "4"} and run.data.metrics == {"acc": 0.25}
    assert run.data.tags[tracking.TAG_NOTEBOOK] == "quickstart.ipynb"


def test_reading_a_store_does_not_redirect_later_mlflow_calls(tmp_path, monkeypatch):
    """runs_frame (the report's reader) must leave mlflow's global tracking URI and
    MLFLOW_TRACKING_URI as it found them (it once leaked them into later calls)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as uri_state

    from metastone_lab import tracking

    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mine)
    monkeypatch.setattr(uri_state, "_tracking_uri", None)
    tracking.runs_frame("anything", other)
    assert os.environ["MLFLOW_TRACKING_URI"] == mine and mlflow.get_tracking_uri() == mine
    mlflow.set_tracking_uri(mine)
    tracking.runs_frame("anything", other)
    assert mlflow.get_tracking_uri() == mine
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(None)
    tracking.runs_frame("anything", other)
    assert "MLFLOW_TRACKING_URI" not in os.environ and uri_state._tracking_uri is None
