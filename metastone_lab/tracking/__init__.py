"""Experiment tracking: the one package of metastone-lab that talks to MLflow.

``import mlflow`` happens lazily inside functions, so importing this package is
cheap. Library code logs unconditionally through :func:`active`::

    from metastone_lab import tracking
    tracking.active().log_metrics({"loss": 0.3}, step=10)   # no-op outside a run

and drivers open runs with a :class:`Tracker`::

    tracker = tracking.Tracker()                       # URI from resolve_tracking_uri()
    with tracker.run("ablate-scoring", params=cfg) as t:
        t.log_metrics({"auroc": 0.81}, step=0)
        t.log_figure(fig, "roc.png")

and a driver that holds many runs at once (the runner) names them::

    tracker = tracking.Tracker(uri).connect()          # clear error if the store is down
    run_id = tracker.create_run("ablations", "point-a", tags={tracking.TAG_ROLE: "point"})
    tracker.log_batch(run_id, metrics={"auroc": 0.81}, params={"k": "8"})
    tracker.terminate(run_id, "FINISHED")

Everything goes through :class:`Tracker`; the backends behind it are not part of
the interface.

Where the data goes (:func:`resolve_tracking_uri`)
    1. ``MLFLOW_TRACKING_URI`` when set (e.g. ``http://127.0.0.1:5000``);
    2. otherwise the local SQLite store ``sqlite:///<home>/mlruns.db`` with
       artifacts under ``<home>/mlartifacts/<experiment>``, where ``<home>`` is
       ``$METASTONE_LAB_HOME`` if set, else the current working directory
       (``make study`` runs from the repo root, so the store is ``./mlruns.db``,
       which is what ``make mlflow-ui`` opens).

Modes
    * MLflow mode (default): runs, params, metrics, tags and artifacts go to
      the store. An HTTP server is probed before the first run; an unreachable
      one raises :class:`TrackingError` naming the URI and the fix within ~5 s.
    * Local-only mode (``Tracker(local_dir=DIR)``): nothing touches MLflow;
      every call is appended to ``DIR/ops.jsonl`` (artifacts are copied to
      ``DIR/artifacts/<run_id>/``). The same format is the *spool*: a tracker
      created with ``spool_dir=...`` that loses its server mid-run keeps
      working and writes what it could not log there, and :func:`replay_spool`
      logs it later (``metastone-lab run --resume`` does this).

Metric and param names: MLflow allows only ``[A-Za-z0-9_.- :/]``; other
characters are rewritten by :func:`metric_key` (``pass@1`` -> ``pass_at_1``).

Metrics are buffered and sent with ``MlflowClient.log_batch`` (at most
``flush_every`` metrics or ``flush_interval_s`` seconds apart, and at run end),
never one HTTP request per scalar.

The package, one concept a module: :mod:`.names` (tags, keys, UI addresses),
:mod:`.store` (which store, is it up), :mod:`.backend` (MLflow behind the façade,
SQLite locking), :mod:`.spool` (offline ops and their replay), :mod:`.tracker` (the
façade) and :mod:`.query` (runs as a DataFrame).
"""
from __future__ import annotations

from ..errors import TrackingError
from .backend import SQLITE_LOCK_RETRY_S, RunRecord
from .names import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, LOCAL_UI, OFFLINE, SPOOL_DIRNAME,
                    TAG_GIT, TAG_NOTE, TAG_NOTEBOOK, TAG_PARENT, TAG_POINT, TAG_POINT_HASH,
                    TAG_ROLE, TAG_SPEC, TAG_SWEEP, UI_WORKFLOW, experiment_url,
                    flatten_params, metric_key, run_url, slug)
from .query import runs_frame
from .spool import replay_spool, spool_dir_for
from .store import (HOME_ENV, HTTP_ENV_DEFAULTS, PROBE_TIMEOUT_S, artifact_root,
                    check_reachable, configure_http_env, git_commit, interactive_output_dir,
                    project_home, project_root, resolve_tracking_uri)
from .tracker import NULL, NullTracker, Tracker, active, notebook_tracker

#: the old private name of :func:`flatten_params` (kept for existing callers)
_flatten_params = flatten_params

__all__ = [
    "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "HOME_ENV", "HTTP_ENV_DEFAULTS", "LOCAL_UI",
    "NULL", "NullTracker", "OFFLINE", "PROBE_TIMEOUT_S", "RunRecord", "SPOOL_DIRNAME",
    "SQLITE_LOCK_RETRY_S", "TAG_GIT", "TAG_NOTE", "TAG_NOTEBOOK", "TAG_PARENT", "TAG_POINT",
    "TAG_POINT_HASH", "TAG_ROLE", "TAG_SPEC", "TAG_SWEEP", "Tracker", "TrackingError",
    "UI_WORKFLOW", "active", "artifact_root", "check_reachable", "configure_http_env",
    "experiment_url", "flatten_params", "git_commit", "interactive_output_dir", "metric_key",
    "notebook_tracker", "project_home", "project_root", "replay_spool", "resolve_tracking_uri",
    "run_url", "runs_frame", "slug", "spool_dir_for",
]
