"""metastone_lab.runner: spec validation, papermill sweeps tracked in MLflow, resume, outage.

Papermill executions are the cost here (~5-7 s each); this file runs 8 of them.
"""
from __future__ import annotations

import http.client
import http.server
import json
import threading
from pathlib import Path

import pytest
import yaml

from metastone_lab import runner, tracking
from metastone_lab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
NB = Path(__file__).resolve().parents[1] / "data" / "notebooks" / "tiny_study.ipynb"


def _spec(tmp_path, name, **kw) -> Path:
    data = {"name": name, "notebook": str(NB), **kw}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _run(spec, tmp_path, uri, **kw):
    return runner.run_spec(spec, root=REPO, runs_dir=tmp_path / "runs", tracking_uri=uri,
                           progress=False, **kw)


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _latest(tmp_path, spec_name, point):
    """The newest run folder of a point: runs/<spec>/<point>/latest."""
    d = runner.latest_dir(tmp_path / "runs" / spec_name / point)
    assert d is not None, f"no latest run folder for {spec_name}/{point}"
    return d


def _runs(uri, spec_name, role):
    c = _client(uri)
    exp = c.get_experiment_by_name(spec_name)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id],
                         filter_string=f"tags.`{tracking.TAG_ROLE}` = '{role}'")


# ------------------------------------------------------ validation (no kernel) --
def test_spec_errors_name_key_and_fix(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'gird'.*Did you mean 'grid'"):
        runner.load_spec(_spec(tmp_path, "s1", gird={"a": [1]}), root=REPO)
    with pytest.raises(ConfigError, match=r"grid\.a is an empty list"):
        runner.load_spec(_spec(tmp_path, "s2", grid={"a": []}), root=REPO)
    bad_nb = _spec(tmp_path, "s3")
    bad_nb.write_text(yaml.safe_dump({"name": "s3", "notebook": "notebooks/nope.ipynb"}))
    with pytest.raises(ConfigError, match=r"notebook 'notebooks/nope.ipynb' does not exist"):
        runner.load_spec(bad_nb, root=REPO)
    with pytest.raises(ConfigError, match="reserved"):
        runner.load_spec(_spec(tmp_path, "s4", parameters={"output_dir": "x"}), root=REPO)


@pytest.mark.parametrize("params, pattern", [
    ({"aa": 1}, r"parameter 'aa' is not declared.*Did you mean 'a'.*Valid names: a, b, fail_if_exists, kill_at_a, kill_if_exists, label, seed\."),
    ({"a": 1.5}, r"parameter 'a' = 1.5 is a float, but the notebook declares int"),
    ({"b": "x"}, r"parameter 'b' = 'x' is a str, but the notebook declares float"),
    ({"label": True}, r"declares str"),
])
def test_bad_parameters_refused_before_anything_runs(tmp_path, params, pattern):
    spec = _spec(tmp_path, "badparam", parameters=params)
    uri = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with pytest.raises(ConfigError, match=pattern):
        _run(spec, tmp_path, uri)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "db.sqlite").exists()


def test_int_for_float_is_accepted_and_set_overrides(tmp_path, capsys):
    spec = _spec(tmp_path, "dry", parameters={"b": 1}, grid={"a": [1, 2], "label": ["p", "q"]},
                 seeds=[0, 1])
    rep = _run(spec, tmp_path, None, dry_run=True)
    names = list(rep["points"])
    assert len(names) == 8 and names[0] == "a-1_label-p_seed-0"
    rep = _run(spec, tmp_path, None, dry_run=True, overrides=["a=5", "b=0.25"], only=["1", "0"])
    assert [p.params for p in rep["points"].values()] == [
        {"b": 0.25, "a": 5, "label": "p", "seed": 0}, {"b": 0.25, "a": 5, "label": "p", "seed": 1}]
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="no such point"):
        _run(spec, tmp_path, None, dry_run=True, only=["nope"])
    assert runner.cli_main([str(spec), "--dry-run", "--set", "a=3"]) == 0
    assert "a-3_label-q_seed-1" in capsys.readouterr().out


# --------------------------------------------------------- real mlflow server --
def test_terminal_values_are_rounded_with_cis_and_readable_seconds():
    import pandas as pd

    assert runner.format_value("bon@8", 0.583512) == "0.584"
    assert runner.format_value("bon_minus_majority@8_ci", [0.0855, 0.123]) == "[0.086, 0.123]"
    assert runner.format_value("wall_seconds", 329.5) == "5m 30s"
    assert runner.format_value("wall_seconds", 42.2) == "42s"
    assert runner.format_value("aha_onset_step", None) == "-"
    assert runner.format_value("n_test", 500) == "500"
    one = pd.DataFrame([{"point": "default", "status": "ok", "bon@8": 0.583512,
                         "bon_minus_majority@8_ci": [0.0855, 0.123], "wall_seconds": 329.5}])
    text = runner.terminal_table(one)
    assert text.splitlines()[0] == "point default (ok)"
    assert "  bon@8                    0.584" in text and "[0.086, 0.123]" in text
    assert "5m 30s" in text and "0.583512" not in text


def test_grid_2x2_against_server_then_resume_skips(tmp_path, mlflow_server, capsys):
    uri = mlflow_server
    spec = _spec(tmp_path, "grid2x2", parameters={"label": "g"},
                 grid={"a": [1, 2], "b": [0.5, 1.0]}, summary_keys=["score", "pass@1"])
    rep = _run(spec, tmp_path, uri)
    assert rep["exit_code"] == 0
    out = capsys.readouterr().out      # the closing table says where every result is
    exp_id = _client(uri).get_experiment_by_name("grid2x2").experiment_id
    for name, r in rep["points"].items():
        assert f"{name}: {r['run_dir']}" in out
        assert (f"MLflow run {r['run_id']}: {uri}/#/experiments/{exp_id}/runs/{r['run_id']}"
                f"?workflowType=machine_learning") in out
    assert f"{uri}/#/experiments/{exp_id}/runs?workflowType=machine_learning" in out
    assert f"sweep summary: {tmp_path / 'runs' / 'grid2x2' / 'summary.json'}" in out
    assert list(rep["table"].columns) == ["point", "status", "score", "pass@1"]
    assert list(rep["table"]["point"])[-1] == "mean" and len(rep["table"]) == 5
    parents, children = _runs(uri, "grid2x2", "sweep"), _runs(uri, "grid2x2", "point")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["label"] == "g" and json.loads(parent.data.params["grid.a"]) == [1, 2]
    assert "4 points, differing in: a, b." in parent.data.tags["mlflow.note.content"]
    c = _client(uri)
    scores = []
    for ch in children:
        assert ch.info.status == "FINISHED"
        assert ch.data.tags[tracking.TAG_PARENT] == parent.info.run_id
        a, b = int(ch.data.params["a"]), float(ch.data.params["b"])
        assert ch.data.tags[tracking.TAG_POINT] == f"a-{a}_b-{b:g}"
        assert ch.data.metrics["score"] == pytest.approx(a * b)
        assert ch.data.metrics["pass_at_1"] == pytest.approx(b / (1 + a))
        hist = c.get_metric_history(ch.info.run_id, "loss")  # logged by the notebook itself
        assert sorted(m.step for m in hist) == [0, 1, 2, 3, 4]
        arts = {x.path for x in c.list_artifacts(ch.info.run_id)}
        assert {"notebook", "summary.json", "info.json"} <= arts
        name = ch.data.tags[tracking.TAG_POINT]
        assert [x.path for x in c.list_artifacts(ch.info.run_id, "notebook")] == [
            f"notebook/{name}.html", f"notebook/{name}.ipynb"]
        # the description says what the run measured and what sets it apart
        note = ch.data.tags["mlflow.note.content"]
        assert f"This point ({name}): a = {a}, b = {b:g}." in note
        # ... and, once finished, leads with its headline numbers (summary_keys, rounded)
        assert note.endswith(f"| result | value |\n|---|---|\n| score | {a * b:.3f} |\n"
                             f"| pass@1 | {b / (1 + a):.3f} |")
        assert (_latest(tmp_path, "grid2x2", name) / f"{name}.ipynb").is_file()
        scores.append(a * b)
    assert parent.data.metrics["score"] == pytest.approx(sum(scores) / 4)
    summary = json.loads((tmp_path / "runs" / "grid2x2" / "summary.json").read_text())
    assert summary["mean"]["score"] == pytest.approx(sum(scores) / 4)
    assert set(summary["points"]) == {"a-1_b-0.5", "a-1_b-1", "a-2_b-0.5", "a-2_b-1"}

    # --resume: everything is FINISHED in MLflow -> nothing executes, no new runs
    nb = _latest(tmp_path, "grid2x2", "a-1_b-0.5") / "a-1_b-0.5.ipynb"
    mtime = nb.stat().st_mtime_ns
    rep2 = _run(spec, tmp_path, uri, resume=True)
    assert rep2["exit_code"] == 0
    assert {r["status"] for r in rep2["points"].values()} == {"skipped"}
    assert len(_runs(uri, "grid2x2", "point")) == 4 and len(_runs(uri, "grid2x2", "sweep")) == 1
    assert nb.stat().st_mtime_ns == mtime
    # a changed parameter is a different point: --resume would run it again
    rep3 = _run(spec, tmp_path, uri, resume=True, dry_run=True, overrides=["label=h"])
    assert rep3["exit_code"] == 0


def test_unreachable_server_fails_fast_before_running(tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = _spec(tmp_path, "dead")
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=f"127.0.0.1:{port}.*not reachable"):
        _run(spec, tmp_path, f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10
    assert not list((tmp_path / "runs" / "dead").rglob("*.ipynb"))


# ------------------------------------------------------------ failure + resume --
def test_failing_point_is_failed_kept_and_resume_reruns_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'db.sqlite'}"
    marker = tmp_path / "fail-now"
    marker.write_text("x")
    spec = _spec(tmp_path, "failing", parameters={"fail_if_exists": str(marker)})
    rep = _run(spec, tmp_path, uri)
    assert rep["exit_code"] == 1
    nb = _latest(tmp_path, "failing", "default") / "default.ipynb"
    assert "requested failure" in nb.read_text()  # executed notebook with the traceback kept
    assert "requested failure" in (nb.parent / "traceback.txt").read_text()
    (child,) = _runs(uri, "failing", "point")
    assert child.info.status == "FAILED"
    c = _client(uri)
    tb = Path(c.download_artifacts(child.info.run_id, "traceback.txt", str(tmp_path)))
    assert "requested failure" in tb.read_text()
    assert "notebook" in {x.path for x in c.list_artifacts(child.info.run_id)}
    assert _runs(uri, "failing", "sweep")[0].info.status == "FAILED"

    marker.unlink()
    rep2 = _run(spec, tmp_path, uri, resume=True)  # FAILED is not FINISHED: runs again
    assert rep2["exit_code"] == 0 and rep2["points"]["default"]["status"] == "ok"
    statuses = sorted(r.info.status for r in _runs(uri, "failing", "point"))
    assert statuses == ["FAILED", "FINISHED"]
    assert len(_runs(uri, "failing", "sweep")) == 1  # the sweep run was resumed
    assert _runs(uri, "failing", "sweep")[0].info.status == "FINISHED"
    # the re-run has its own folder: the failed run's notebook is still there, unchanged
    assert _latest(tmp_path, "failing", "default") != nb.parent
    assert "requested failure" in nb.read_text()
    assert sorted(json.loads((d / "run.json").read_text())["status"]
                  for d in nb.parent.parent.iterdir()
                  if (d / "run.json").is_file() and not d.is_symlink()) == ["failed", "ok"]
    # single-point spec: runs/<spec>/summary.json is the point's summary
    summ = json.loads((tmp_path / "runs" / "failing" / "summary.json").read_text())
    assert summ["score"] == pytest.approx(0.5) and summ["aha_onset_step"] is None


# ------------------------------------------------------------------- outage --
class _Proxy:
    """HTTP forwarder in front of the session MLflow server that can be cut and restored."""

    def __init__(self, upstream: str):
        self.up_host, up_port = upstream.split("//", 1)[1].split(":")
        self.up_port = int(up_port)
        self.port = None
        self.httpd = None

    def _handler(self):
        proxy = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def _fwd(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                conn = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _fwd

        return H

    def start(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port or 0),
                                                     self._handler())
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_outage_mid_sweep_keeps_results_and_resume_logs_them(tmp_path, mlflow_server):
    proxy = _Proxy(mlflow_server)
    uri = proxy.start()
    spec = _spec(tmp_path, "outage", grid={"a": [1, 2]})

    def cut_after_first(point, result):
        if point.index == 0:
            proxy.stop()

    try:
        with pytest.warns(RuntimeWarning, match="continuing offline|Continuing offline"):
            rep = _run(spec, tmp_path, uri, on_point_done=cut_after_first)
        assert rep["exit_code"] == 3  # all ran, something unlogged
        out = tmp_path / "runs" / "outage"
        assert rep["points"]["a-1"]["logged"] and not rep["points"]["a-2"]["logged"]
        for name in ("a-1", "a-2"):  # nothing finished is lost
            run = _latest(tmp_path, "outage", name)
            assert (run / "summary.json").is_file() and (run / f"{name}.ipynb").is_file()
        assert not (out / "a-1.unlogged.json").exists()
        mark = json.loads((out / "a-2.unlogged.json").read_text())
        assert mark["status"] == "ok" and uri in mark["reason"]
        run2 = _latest(tmp_path, "outage", "a-2")
        assert mark["run_dir"] == run2.name
        assert (run2 / tracking.SPOOL_DIRNAME / "ops.jsonl").is_file()  # notebook spooled
        status = json.loads((out / "status.json").read_text())
        assert status["offline"] is True
        mtime = (run2 / "a-2.ipynb").stat().st_mtime_ns

        proxy.start()  # the server is back (same port)
        rep2 = _run(spec, tmp_path, uri, resume=True)
        assert rep2["exit_code"] == 0
        assert rep2["points"]["a-1"]["status"] == "skipped"
        assert rep2["points"]["a-2"].get("resumed_from_disk") is True
        assert (run2 / "a-2.ipynb").stat().st_mtime_ns == mtime  # not re-executed
        assert _latest(tmp_path, "outage", "a-2") == run2  # no new run folder
        assert not (out / "a-2.unlogged.json").exists()
    finally:
        if proxy.httpd is not None:
            try:
                proxy.stop()
            except Exception:
                pass
    children = {r.data.tags[tracking.TAG_POINT]: r for r in _runs(mlflow_server, "outage", "point")}
    assert set(children) == {"a-1", "a-2"}
    ch2 = children["a-2"]
    assert ch2.info.status == "FINISHED" and ch2.data.metrics["score"] == pytest.approx(1.0)
    c = _client(mlflow_server)
    # the notebook's own step metrics, spooled offline, were replayed
    assert sorted(m.step for m in c.get_metric_history(ch2.info.run_id, "loss")) == [0, 1, 2, 3, 4]
    assert {"notebook", "summary.json", "info.json"} <= {
        x.path for x in c.list_artifacts(ch2.info.run_id)}
    (parent,) = _runs(mlflow_server, "outage", "sweep")
    assert parent.info.status == "FINISHED"
    assert ch2.data.tags[tracking.TAG_PARENT] == parent.info.run_id
    assert parent.data.metrics["score"] == pytest.approx((0.5 + 1.0) / 2)
