"""What a researcher sees, checked in a real browser (headless Chromium): a micro
study's MLflow run page, its ``trajectories.html`` artifact, and JupyterLab with the
quickstart notebook. Assertions read the DOM after the pages' JavaScript ran.

Skipped, with the reason, where Chromium is not installed (Debian: ``apt-get install
chromium``; ``.ci/run`` installs it when it runs as root).

Cost: one micro backbone build and one micro quickstart point (~40-60 s on 2 cores),
JupyterLab start-up (~10 s), three page loads (~10-20 s each).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import _wait_health, free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium; "
                             ".ci/run installs it when it runs as root)")


def dom(url: str, budget_ms: int = 20000) -> str:
    """The page's DOM after ``budget_ms`` of (virtual) time for its scripts."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def micro_study(tmp_path_factory, mlflow_server):
    from mlflow.tracking import MlflowClient

    from metastone_lab import runner
    from metastone_lab.backbones import TinyBackboneConfig, build_tiny_backbone

    home = tmp_path_factory.mktemp("browser")
    backbone = home / "micro"
    build_tiny_backbone(TinyBackboneConfig.micro(), backbone, log=lambda *_: None)
    spec = {"name": "browser-quickstart", "notebook": str(REPO / "notebooks" / "quickstart.ipynb"),
            "parameters": {"backbone": str(backbone), "train_steps": 2, "k_max": 4, "n_test": 4,
                           "n_val": 4, "val_k": 2, "max_new_tokens": 40,
                           "train": {"prompts_per_step": 2, "n": 4, "eval_every": 1,
                                     "eval_val_problems": 4, "eval_test_problems": 4,
                                     "eval_samples": 2}}}
    path = home / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    rep = runner.run_spec(path, root=REPO, runs_dir=home / "runs", tracking_uri=mlflow_server,
                          progress=False)
    assert rep["exit_code"] == 0, rep["points"]
    (res,) = rep["points"].values()
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(res["run_id"])
    local = client.download_artifacts(run.info.run_id, "trajectories.html", str(home))
    return {"uri": mlflow_server, "run": run, "view": Path(local), "home": home}


def test_run_page_shows_the_description_and_the_headline_metrics(micro_study):
    run = micro_study["run"]
    from metastone_lab import tracking

    page = dom(tracking.run_url(micro_study["uri"], run.info.experiment_id, run.info.run_id))
    assert "This point (default)" in page            # the run description
    assert "bon_at_2" in page and "pass_at_1" in page  # metrics on the run page


def test_the_printed_runs_table_link_opens_the_model_training_view(micro_study):
    """MLflow 3 opens an experiment in its GenAI view (traces, 'No data available');
    the link the runner prints (tracking.experiment_url) opens the runs table."""
    from metastone_lab import tracking

    run = micro_study["run"]
    plain = dom(f"{micro_study['uri']}/#/experiments/{run.info.experiment_id}")
    assert "No data available" in plain               # what a bare link shows (measured)
    page = dom(tracking.experiment_url(micro_study["uri"], run.info.experiment_id))
    assert "No data available" not in page
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(
        r"<script.*?</script>|<style.*?</style>", "", page, flags=re.S)))
    assert "Run Name" in text and "2 matching runs" in text   # the runs table: sweep + point
    assert "browser-quickstart" in text


def test_trajectory_view_artifact_renders(micro_study):
    page = dom(micro_study["view"].as_uri(), budget_ms=3000)
    n = page.count('class="problem"')
    m = re.search(r"Showing (\d+) of (\d+) problems", page)
    assert m and int(m.group(1)) == n == 4            # the view's problem count
    assert 'class="pick bon"' in page                 # a selector mark
    assert re.search(r'class="step[^"]*" style="background:hsl\(\d+, 70%, 82%\)" '
                     r'title="step 1: score \d\.\d{3}"', page)  # a step-score cell
    assert '<span id="n-shown">4</span>' in page     # the filter script ran


def test_jupyterlab_opens_the_quickstart_notebook(tmp_path):
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser",
           f"--port={port}", "--ServerApp.ip=127.0.0.1", "--ServerApp.token=",
           "--ServerApp.password=", f"--ServerApp.root_dir={REPO}",
           "--ServerApp.disable_check_xsrf=True", "--allow-root"]
    log = open(tmp_path / "lab.log", "wb")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        assert _wait_health(f"{base}/api/status", proc, 60), \
            (tmp_path / "lab.log").read_text(errors="replace")[-2000:]
        page = dom(f"{base}/lab/tree/notebooks/quickstart.ipynb", budget_ms=30000)
        assert "quickstart.ipynb" in page                              # the notebook's tab
        assert "Quickstart" in page or "quickstart" in page.lower()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
