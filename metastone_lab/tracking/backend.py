"""The MLflow backend: a thin wrapper over ``MlflowClient`` in which every failure
becomes :class:`~metastone_lab.errors.TrackingError`, plus the SQLite locking that
lets several processes share one store. Only :class:`~.tracker.Tracker` uses it.
"""
from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from ..errors import TrackingError
from .names import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, slug
from .store import artifact_root, configure_http_env, fix_hint

# SQLite serialises writers with a file lock, so concurrent writers (several sweeps,
# their kernels) can see "database is locked": such a write did not commit and is
# retried with exponential backoff, up to this many seconds in all.
SQLITE_LOCK_RETRY_S = 60.0


@dataclass(frozen=True)
class RunRecord:
    """A run found in the store (:meth:`~.tracker.Tracker.find_runs`): its id, status
    (``RUNNING``, ``FINISHED``, ``FAILED``, ``KILLED``) and tags."""

    run_id: str
    status: str
    tags: Mapping[str, str] = field(default_factory=dict)


def is_sqlite_lock_error(e: BaseException) -> bool:
    """True if ``e`` (or an exception it was raised from) is SQLite's writer lock."""
    while e is not None:
        if "database is locked" in str(e) or "database table is locked" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def store_init_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on ``<db>.lock`` while a SQLite store is opened: MLflow creates
    the schema of a new store without one, and two processes creating it at once fail
    with ``table ... already exists``. No-op for other stores (and where ``fcntl`` is
    missing, e.g. Windows)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock_path = Path(uri[len("sqlite:///"):] + ".lock")
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class MlflowBackend:
    """Thin wrapper over ``MlflowClient``; every failure becomes TrackingError.

    SQLite stores are opened under :func:`store_init_lock` (one process creates the
    schema, the others wait and reuse it), and a write that fails with ``database is
    locked`` is retried with backoff for up to :data:`SQLITE_LOCK_RETRY_S` seconds."""

    def __init__(self, uri: str):
        self.uri = uri
        configure_http_env()
        from mlflow.tracking import MlflowClient

        with store_init_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)
            if uri.startswith("sqlite:///"):
                # opens the store now (creating its schema if new), while the lock is held
                self._call("open the store", self.client.search_experiments, max_results=1)

    def _call(self, what: str, fn, *a, **kw):
        """``fn(*a, **kw)``; a locked SQLite store is retried, any failure re-raised
        as TrackingError naming ``what``, the store and the fix."""
        delay, waited = 0.05, 0.0
        while True:
            try:
                return fn(*a, **kw)
            except TrackingError:
                raise
            except Exception as e:  # MlflowException, requests errors, sqlite errors
                if (self.uri.startswith("sqlite:///") and is_sqlite_lock_error(e)
                        and waited < SQLITE_LOCK_RETRY_S):
                    time.sleep(delay)
                    waited += delay
                    delay = min(delay * 2, 2.0)
                    continue
                raise TrackingError(
                    f"tracking store {self.uri}: {what} failed: {type(e).__name__}: {e}. "
                    f"{fix_hint(self.uri)}"
                ) from e

    def experiment_id(self, name: str) -> str:
        def get_or_create():
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
                    self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG,
                                                   EXPERIMENT_KIND)
                return exp.experiment_id
            root = artifact_root(self.uri)
            loc = None
            if root is not None:
                s = slug(name)
                if s != name:
                    s += "-" + uuid.uuid5(uuid.NAMESPACE_URL, name).hex[:8]
                loc = (root / s).as_uri()
            return self.client.create_experiment(name, artifact_location=loc,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})

        return self._call(f"get/create experiment {name!r}", get_or_create)

    def create_run(self, experiment: str, run_name: str | None, tags: dict[str, str]) -> str:
        exp_id = self.experiment_id(experiment)
        run = self._call("create_run", self.client.create_run, exp_id,
                         run_name=run_name, tags=tags)
        return run.info.run_id

    def log_batch(self, run_id: str, metrics=(), params=None, tags=None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        ms = [Metric(k, float(v), int(ts), int(step)) for k, v, step, ts in metrics]
        ps = [Param(k, v) for k, v in (params or {}).items()]
        ts_ = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        # MLflow limits: 1000 metrics, 100 params, 100 tags per batch.
        for i in range(0, max(len(ms), 1), 1000):
            if ms[i:i + 1000]:
                self._call("log_batch(metrics)", self.client.log_batch, run_id,
                           metrics=ms[i:i + 1000])
        for i in range(0, len(ps), 100):
            self._call("log_batch(params)", self.client.log_batch, run_id, params=ps[i:i + 100])
        for i in range(0, len(ts_), 100):
            self._call("log_batch(tags)", self.client.log_batch, run_id, tags=ts_[i:i + 100])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None) -> None:
        self._call(f"log_artifact({str(path)!r})", self.client.log_artifact, run_id,
                   str(path), artifact_path)

    def terminate(self, run_id: str, status: str) -> None:
        self._call(f"set_terminated({status})", self.client.set_terminated, run_id, status)


    def find_experiment(self, name: str) -> str | None:
        """The id of experiment ``name`` (deleted ones included), or None."""
        exp = self._call("get_experiment", self.client.get_experiment_by_name, name)
        return None if exp is None else exp.experiment_id

    def search_runs(self, experiment_id: str, filter_string: str, *,
                    order_by: list[str] | None = None,
                    max_results: int = 5000) -> list[RunRecord]:
        """The runs of one experiment matching an MLflow filter string."""
        runs = self._call("search_runs", self.client.search_runs, [experiment_id],
                          filter_string=filter_string, order_by=order_by,
                          max_results=max_results)
        return [RunRecord(r.info.run_id, r.info.status, dict(r.data.tags)) for r in runs]

    def set_status(self, run_id: str, status: str) -> None:
        """Set a run's status without ending it (``RUNNING`` reopens a closed run)."""
        self._call("update_run", self.client.update_run, run_id, status=status)
