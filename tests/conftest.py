"""Shared fixtures.

* ``mlflow_sqlite``: an isolated SQLite MLflow store in ``tmp_path``; sets
  ``MLFLOW_TRACKING_URI`` and ``METASTONE_LAB_HOME`` for the test and returns the URI.
* ``mlflow_server``: one real ``mlflow server`` process per test session on a free
  loopback port (``--workers 1``, job execution off); yields its ``http://`` URI.
  Start-up takes 10-30 s on 2 cores, so only tests that need a server use it.
  Stopped by PID at session end (start-up has finished by then).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(__file__).resolve().parent / "data"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch) -> str:
    store = tmp_path / "mlflow_store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("METASTONE_LAB_HOME", str(tmp_path))
    return uri


def _wait_health(url: str, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow_bin), "server",
           "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
           "--artifacts-destination", str(root / "art"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        if not _wait_health(uri + "/health", proc, 90):
            tail = (root / "server.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"mlflow server did not come up on {uri}:\n{tail}")
        yield uri
    finally:
        # Stop by PID (its process group holds only the server and its uvicorn worker).
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
