"""Experiment tracking: the one module of metastone-lab that talks to MLflow.

``import mlflow`` happens lazily inside functions, so importing this module is
cheap. Library code logs unconditionally through :func:`active`::

    from metastone_lab import tracking
    tracking.active().log_metrics({"loss": 0.3}, step=10)   # no-op outside a run

and drivers open runs with a :class:`Tracker`::

    tracker = tracking.Tracker()                       # URI from resolve_tracking_uri()
    with tracker.run("ablate-scoring", params=cfg) as t:
        t.log_metrics({"auroc": 0.81}, step=0)
        t.log_figure(fig, "roc.png")

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
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import traceback
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import TrackingError

# ---------------------------------------------------------------- constants --
HOME_ENV = "METASTONE_LAB_HOME"
OFFLINE = "offline"  # run id the runner injects when the tracking store is down
SPOOL_DIRNAME = "tracking_spool"

# Tag names (shared with runner.py and the compare notebook).
TAG_GIT = "metastone.git_commit"
TAG_NOTEBOOK = "metastone.notebook"
TAG_SPEC = "metastone.spec"
TAG_POINT = "metastone.point"
TAG_POINT_HASH = "metastone.point_hash"
TAG_SWEEP = "metastone.sweep"          # parent (sweep) run id on child runs
TAG_ROLE = "metastone.role"            # "sweep" | "point" | "run"
TAG_PARENT = "mlflow.parentRunId"      # makes the MLflow UI nest runs

# MLflow HTTP client settings applied (setdefault: the user's values win) so a
# dead server fails in seconds instead of retrying for minutes.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
PROBE_TIMEOUT_S = 5.0
# SQLite serialises writers with a file lock, so concurrent writers (several sweeps,
# their kernels) can see "database is locked": such a write did not commit and is
# retried with exponential backoff, up to this many seconds in all.
SQLITE_LOCK_RETRY_S = 60.0

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")
_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


# ----------------------------------------------------------------- helpers --
def project_root(start: str | os.PathLike) -> Path | None:
    """The nearest folder at or above ``start`` with a ``pyproject.toml`` or ``.git``
    (a checkout), or None."""
    p = Path(start).resolve()
    for d in (p, *p.parents):
        if (d / "pyproject.toml").is_file() or (d / ".git").exists():
            return d
    return None


def project_home() -> Path:
    """Where a checkout's store (``mlruns.db``, ``mlartifacts/``) and ``runs/`` live:
    ``$METASTONE_LAB_HOME`` if set, else the checkout around the current directory
    (so a kernel started in ``notebooks/`` uses the same store as ``make study``),
    else the current directory."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return project_root(Path.cwd()) or Path.cwd().resolve()


def interactive_output_dir(notebook: str) -> Path:
    """``<project home>/runs/interactive/<notebook stem>/<timestamp>``: where a notebook
    run interactively (not by the runner) writes, beside the batch runs."""
    stem = Path(notebook).name.removesuffix(".ipynb")
    return project_home() / "runs" / "interactive" / stem / time.strftime("%Y%m%d-%H%M%S")


def resolve_tracking_uri(home: str | os.PathLike | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<home>/mlruns.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    root = Path(home).resolve() if home is not None else project_home()
    return f"sqlite:///{root / 'mlruns.db'}"


def artifact_root(uri: str) -> Path | None:
    """Local artifact folder for a SQLite store (``<db dir>/mlartifacts``);
    ``None`` for servers (they proxy artifacts) and other schemes."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
    return None


#: the MLflow UI opens an experiment with this tag as a model-training experiment (runs
#: table, metrics, charts) instead of its GenAI view (traces)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

#: MLflow 3's UI opens every experiment in its GenAI view (traces) unless the page URL
#: says ``workflowType=machine_learning`` or the "Model training" toggle is clicked
#: (measured with MLflow 3.17: the experiment tag alone does not switch it)
UI_WORKFLOW = "machine_learning"

#: where ``make mlflow-ui`` serves a local (sqlite/file) store
LOCAL_UI = "http://127.0.0.1:5000"


def run_url(uri: str, experiment_id: str | None, run_id: str | None) -> str | None:
    """The MLflow UI page of a run: on the tracking server itself for an http(s)
    store, else where ``make mlflow-ui`` serves the local store. None without ids."""
    if not experiment_id or not run_id or run_id == OFFLINE:
        return None
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType={UI_WORKFLOW}"


def experiment_url(uri: str, experiment_id: str | None) -> str | None:
    """The experiment's runs table in the MLflow UI, in its model-training view."""
    if not experiment_id:
        return None
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType={UI_WORKFLOW}"


def metric_key(name: str) -> str:
    """An MLflow-safe metric/param name: ``pass@1`` -> ``pass_at_1``."""
    return _BAD_KEY_CHARS.sub("_", str(name).replace("@", "_at_"))


def slug(name: str) -> str:
    s = _SLUG.sub("_", str(name)).strip("._") or "run"
    return s


@functools.lru_cache(maxsize=4)
def git_commit(cwd: str | None = None) -> str | None:
    """``git rev-parse HEAD`` of ``cwd`` (default: the checkout holding this
    package, i.e. the code that runs); None if unavailable."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or str(Path(__file__).resolve().parent),
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def configure_http_env() -> None:
    """Apply :data:`HTTP_ENV_DEFAULTS` to ``os.environ`` (user values win).
    Child processes (papermill kernels) inherit them."""
    for k, v in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def _fix_hint(uri: str) -> str:
    return (
        f"Start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000 --workers 1`), "
        f"point MLFLOW_TRACKING_URI at a running one, or unset MLFLOW_TRACKING_URI to use the "
        f"local store sqlite:///<{HOME_ENV} or cwd>/mlruns.db"
    )


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`TrackingError` (within ``timeout`` s) unless ``uri`` is usable.

    HTTP(S): ``GET <uri>/health`` must answer 200. SQLite: the database's folder
    must exist and be writable. Other schemes are not probed.
    """
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status == 200:
                    return
                reason = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError) as e:
            reason = str(getattr(e, "reason", e))
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({reason}; probed {url} with a "
            f"{timeout:g} s timeout). {_fix_hint(uri)}"
        )
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(
                f"tracking store {uri}: folder {str(folder)!r} does not exist or is not writable; "
                f"create it, set {HOME_ENV} to a writable folder, or set MLFLOW_TRACKING_URI"
            )


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)


def _flatten_params(params: Any) -> dict[str, str]:
    if params is None:
        return {}
    from .config import flatten

    flat = flatten(params)
    out = {}
    for k, v in flat.items():
        if isinstance(v, dict) and not v:
            continue   # an empty dict ({} = the defaults) is no parameter: its keys are logged
        s = json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)
        if len(s) > 6000:
            s = s[:5990] + "...[cut]"
        out[metric_key(k)] = s
    return out


# ---------------------------------------------------------------- backends --
def _is_sqlite_lock_error(e: BaseException) -> bool:
    while e is not None:
        if "database is locked" in str(e) or "database table is locked" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def _store_init_lock(uri: str) -> Iterator[None]:
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


class _MlflowBackend:
    """Thin wrapper over ``MlflowClient``; every failure becomes TrackingError.

    SQLite stores are opened under :func:`_store_init_lock` (one process creates the
    schema, the others wait and reuse it), and a write that fails with ``database is
    locked`` is retried with backoff for up to :data:`SQLITE_LOCK_RETRY_S` seconds."""

    def __init__(self, uri: str):
        self.uri = uri
        configure_http_env()
        from mlflow.tracking import MlflowClient

        with _store_init_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)
            if uri.startswith("sqlite:///"):
                # opens the store now (creating its schema if new), while the lock is held
                self._call("open the store", self.client.search_experiments, max_results=1)

    def _call(self, what: str, fn, *a, **kw):
        delay, waited = 0.05, 0.0
        while True:
            try:
                return fn(*a, **kw)
            except TrackingError:
                raise
            except Exception as e:  # MlflowException, requests errors, sqlite errors
                if (self.uri.startswith("sqlite:///") and _is_sqlite_lock_error(e)
                        and waited < SQLITE_LOCK_RETRY_S):
                    time.sleep(delay)
                    waited += delay
                    delay = min(delay * 2, 2.0)
                    continue
                raise TrackingError(
                    f"tracking store {self.uri}: {what} failed: {type(e).__name__}: {e}. "
                    f"{_fix_hint(self.uri)}"
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


class _LocalBackend:
    """Append-only ``ops.jsonl`` + ``artifacts/`` in a folder (local mode / spool)."""

    def __init__(self, folder: str | Path, per_run_artifacts: bool = False):
        self.folder = Path(folder)
        self.per_run_artifacts = per_run_artifacts
        self.uri = f"local:{self.folder}"

    def _append(self, rec: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "ops.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def create_run(self, experiment: str, run_name: str | None, tags: dict[str, str]) -> str:
        run_id = "local-" + uuid.uuid4().hex[:16]
        self._append({"op": "create_run", "run_id": run_id, "experiment": experiment,
                      "run_name": run_name, "tags": tags, "time": time.time()})
        return run_id

    def log_batch(self, run_id: str, metrics=(), params=None, tags=None) -> None:
        rec: dict[str, Any] = {"op": "batch", "run_id": run_id}
        if metrics:
            rec["metrics"] = [list(m) for m in metrics]
        if params:
            rec["params"] = dict(params)
        if tags:
            rec["tags"] = {k: str(v) for k, v in tags.items()}
        if len(rec) > 2:
            self._append(rec)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None) -> None:
        src = Path(path)
        base = self.folder / "artifacts"
        if self.per_run_artifacts:
            base = base / run_id
        dst_dir = base / (artifact_path or "")
        dst_dir.mkdir(parents=True, exist_ok=True)
        dst = dst_dir / src.name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.resolve() != dst.resolve():
            shutil.copy2(src, dst)
        self._append({"op": "artifact", "run_id": run_id,
                      "file": str(dst.relative_to(self.folder)), "artifact_path": artifact_path})

    def terminate(self, run_id: str, status: str) -> None:
        self._append({"op": "terminate", "run_id": run_id, "status": status})


def spool_dir_for(output_dir: str | Path) -> Path:
    """Where a point's tracker spools what it could not log: ``<output_dir>/tracking_spool``."""
    return Path(output_dir) / SPOOL_DIRNAME


def replay_spool(folder: str | Path, run_id: str, tracking_uri: str | None = None,
                 *, include_terminate: bool = False) -> int:
    """Log the spooled ops of ``folder`` into existing run ``run_id``; return the op count.

    ``create_run`` records are skipped (the caller owns the run), as is
    ``terminate`` unless ``include_terminate``. The spool is renamed to
    ``ops.replayed.jsonl`` afterwards so it is never replayed twice.
    """
    folder = Path(folder)
    ops_file = folder / "ops.jsonl"
    if not ops_file.is_file():
        return 0
    backend = _MlflowBackend(tracking_uri or resolve_tracking_uri())
    n = 0
    for line in ops_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from a killed process
            continue
        op = rec.get("op")
        if op == "batch":
            backend.log_batch(run_id, [tuple(m) for m in rec.get("metrics", [])],
                              rec.get("params"), rec.get("tags"))
        elif op == "artifact":
            backend.log_artifact(run_id, folder / rec["file"], rec.get("artifact_path"))
        elif op == "terminate" and include_terminate:
            backend.terminate(run_id, rec["status"])
        else:
            continue
        n += 1
    os.replace(ops_file, folder / "ops.replayed.jsonl")
    return n


# ---------------------------------------------------------------- trackers --
_ACTIVE: list["Tracker"] = []


class _Run:
    def __init__(self, run_id: str, experiment: str | None, owned: bool):
        self.run_id = run_id
        self.experiment = experiment
        self.owned = owned  # terminate it when the context ends


class Tracker:
    """Runs, params, buffered metrics and artifacts for MLflow or a local folder.

    Args:
        tracking_uri: MLflow URI; default :func:`resolve_tracking_uri`.
        local_dir: if given, local-only mode: nothing touches MLflow.
        spool_dir: if given, a tracking failure mid-run does not raise: a warning
            is issued and the rest of the run is spooled there (see module doc).
        flush_every: flush buffered metrics after this many values.
        flush_interval_s: ... or when the oldest buffered value is this old.
        probe_timeout_s: timeout of the reachability probe before the first run.
    """

    enabled = True

    def __init__(self, tracking_uri: str | None = None, *, local_dir: str | Path | None = None,
                 spool_dir: str | Path | None = None, flush_every: int = 500,
                 flush_interval_s: float = 15.0, probe_timeout_s: float = PROBE_TIMEOUT_S):
        self.local_dir = Path(local_dir) if local_dir is not None else None
        self.tracking_uri = (f"local:{self.local_dir}" if self.local_dir is not None
                             else tracking_uri or resolve_tracking_uri())
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.flush_every = int(flush_every)
        self.flush_interval_s = float(flush_interval_s)
        self.probe_timeout_s = float(probe_timeout_s)
        self._backend: Any = None
        self._spooling = False
        self._runs: list[_Run] = []
        self._buffer: list[tuple[str, float, int, int]] = []
        self._buffer_t0: float | None = None
        self.n_flushes = 0  # number of metric batches sent (for tests / benchmarks)
        self._tables: list[dict] = []   # .json tables logged (tag mlflow.loggedArtifacts)

    # ----------------------------------------------------------- plumbing --
    @property
    def local_only(self) -> bool:
        return self.local_dir is not None

    @property
    def spooling(self) -> bool:
        """True once a tracking failure switched this tracker to its spool."""
        return self._spooling

    @property
    def run_id(self) -> str | None:
        return self._runs[-1].run_id if self._runs else None

    def _get_backend(self, experiment: str | None = None):
        if self._backend is None:
            if self.local_only:
                self._backend = _LocalBackend(self.local_dir, per_run_artifacts=True)
            else:
                check_reachable(self.tracking_uri, self.probe_timeout_s)
                self._backend = _MlflowBackend(self.tracking_uri)
        return self._backend

    def _start_spooling(self, err: Exception) -> None:
        self._spooling = True
        self._backend = _LocalBackend(self.spool_dir)
        warnings.warn(
            f"tracking failed ({err}); continuing offline, spooling to {self.spool_dir}. "
            f"Replay it later with tracking.replay_spool (metastone-lab run --resume does).",
            RuntimeWarning, stacklevel=3,
        )

    def _do(self, method: str, *args) -> None:
        """Call a backend method on the current run, spooling on failure if allowed."""
        if not self._runs:
            return
        try:
            getattr(self._get_backend(), method)(self.run_id, *args)
        except TrackingError as e:
            if self.spool_dir is None or self._spooling:
                raise
            self._start_spooling(e)
            getattr(self._backend, method)(self.run_id, *args)

    # ----------------------------------------------------------- run life --
    def start(self, experiment: str, run_name: str | None = None, params: Any = None,
              tags: Mapping[str, Any] | None = None, nested: bool = False,
              parent_run_id: str | None = None) -> str:
        """Open a run (prefer :meth:`run`); return its id. Params are flattened."""
        all_tags = {TAG_ROLE: "run"}
        commit = git_commit()
        if commit:
            all_tags[TAG_GIT] = commit
            all_tags["mlflow.source.git.commit"] = commit
        parent = parent_run_id or (self.run_id if nested else None)
        if parent:
            all_tags[TAG_PARENT] = parent
            all_tags.setdefault(TAG_SWEEP, parent)
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})
        backend = self._get_backend(experiment)
        try:
            run_id = backend.create_run(experiment, run_name, all_tags)
        except TrackingError as e:
            if self.spool_dir is None:
                raise
            self._start_spooling(e)
            run_id = self._backend.create_run(experiment, run_name, all_tags)
        self._runs.append(_Run(run_id, experiment, owned=True))
        _ACTIVE.append(self)
        if params is not None:
            self.log_params(params)
        return run_id

    def attach(self, run_id: str) -> "Tracker":
        """Make an existing run current (not terminated by :meth:`end`/``close``)."""
        self._runs.append(_Run(run_id, None, owned=False))
        _ACTIVE.append(self)
        return self

    def end(self, status: str = "FINISHED") -> None:
        """Flush and close the current run; terminate it if this tracker created it."""
        if not self._runs:
            return
        try:
            self.flush()
            if self._runs[-1].owned:
                self._do("terminate", status)
        finally:
            self._runs.pop()
            if self in _ACTIVE:
                # remove the most recent occurrence
                del _ACTIVE[len(_ACTIVE) - 1 - _ACTIVE[::-1].index(self)]

    close = end

    def fail(self, exc: BaseException | None = None, status: str = "FAILED") -> None:
        """Log ``traceback.txt`` for ``exc`` and mark the current run ``status``."""
        if not self._runs:
            return
        tb = ("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
              if exc is not None else traceback.format_exc())
        try:
            self.log_text(tb, "traceback.txt")
            self.flush()
            self._do("terminate", status)
        except Exception as e:  # never mask the original error
            warnings.warn(f"could not record the failure in {self.tracking_uri}: {e}",
                          RuntimeWarning, stacklevel=2)
        finally:
            self._runs[-1].owned = False
            self.end()

    @contextlib.contextmanager
    def run(self, experiment: str, run_name: str | None = None, params: Any = None,
            tags: Mapping[str, Any] | None = None, nested: bool = False,
            parent_run_id: str | None = None) -> Iterator["Tracker"]:
        """Context manager around a run. Params: a dataclass or dict (flattened).

        On an exception the run is marked FAILED (KILLED for Ctrl-C), the
        traceback is logged as ``traceback.txt`` and the exception re-raised.
        """
        self.start(experiment, run_name, params, tags, nested, parent_run_id)
        try:
            yield self
        except KeyboardInterrupt as e:
            self.fail(e, status="KILLED")
            raise
        except BaseException as e:
            self.fail(e)
            raise
        else:
            self.end("FINISHED")

    @classmethod
    def resume(cls, run_id: str | None, tracking_uri: str | None = None,
               spool_dir: str | Path | None = None, **kw) -> "Tracker":
        """A tracker attached to existing run ``run_id`` (as the runner injects it).

        ``run_id`` of ``None``/``""``/``"offline"`` gives a tracker that writes
        only to ``spool_dir`` (the runner's offline mode). Call ``close()`` at the
        end (or use it as a context manager); the run itself is terminated by its
        owner (the runner).
        """
        if not run_id or run_id == OFFLINE:
            if spool_dir is None:
                raise TrackingError("Tracker.resume: no run id and no spool_dir; pass one")
            t = cls(tracking_uri, spool_dir=spool_dir, **kw)
            t._spooling = True
            t._backend = _LocalBackend(spool_dir)
            return t.attach(OFFLINE)
        return cls(tracking_uri, spool_dir=spool_dir, **kw).attach(run_id)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, et, ev, tb) -> None:
        if ev is not None and not isinstance(ev, (KeyboardInterrupt, GeneratorExit)):
            self.fail(ev)
        else:
            self.end()

    # ------------------------------------------------------------ logging --
    def log_params(self, params: Any) -> None:
        """Log a dataclass/dict flattened as ``a.b`` params (values stringified)."""
        flat = _flatten_params(params)
        if flat:
            self._do("log_batch", (), flat, None)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags:
            self._do("log_batch", (), None, {k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Buffer numeric metrics at ``step`` (default 0); non-numbers are skipped."""
        if not self._runs:
            return
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, bool) or v is None:
                v = float(v) if isinstance(v, bool) else None
            if v is None:
                continue
            try:
                fv = float(v)
            except (TypeError, ValueError):
                continue
            self._buffer.append((metric_key(k), fv, int(step or 0), ts))
        if self._buffer_t0 is None and self._buffer:
            self._buffer_t0 = time.monotonic()
        if self._buffer and (len(self._buffer) >= self.flush_every or
                             time.monotonic() - (self._buffer_t0 or 0) >= self.flush_interval_s):
            self.flush()

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step)

    def flush(self) -> None:
        """Send buffered metrics in one ``log_batch`` (chunked at 1000)."""
        if not self._buffer:
            return
        buf, self._buffer, self._buffer_t0 = self._buffer, [], None
        self._do("log_batch", buf, None, None)
        self.n_flushes += 1

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if not p.exists():
            raise TrackingError(f"log_artifact: {str(p)!r} does not exist; check the path")
        self._do("log_artifact", p, artifact_path)

    def _log_file(self, name: str, write) -> None:
        d = Path(name)
        with tempfile.TemporaryDirectory(prefix="mlab-art-") as tmp:
            f = Path(tmp) / d.name
            write(f)
            self.log_artifact(f, str(d.parent) if str(d.parent) not in ("", ".") else None)

    def log_text(self, text: str, name: str) -> None:
        self._log_file(name, lambda f: f.write_text(text, encoding="utf-8"))

    def log_dict(self, obj: Any, name: str) -> None:
        """Log ``obj`` as JSON (or YAML if ``name`` ends in .yaml/.yml)."""
        def write(f: Path) -> None:
            if f.suffix in (".yaml", ".yml"):
                import yaml

                f.write_text(yaml.safe_dump(obj, sort_keys=False), encoding="utf-8")
            else:
                f.write_text(json.dumps(obj, indent=2, default=str, allow_nan=True),
                             encoding="utf-8")
        self._log_file(name, write)

    def log_figure(self, fig: Any, name: str, dpi: int = 110) -> None:
        """Save a matplotlib figure (``name`` sets the format, e.g. ``roc.png``)."""
        if not Path(name).suffix:
            name += ".png"
        self._log_file(name, lambda f: fig.savefig(f, dpi=dpi, bbox_inches="tight"))

    def log_table(self, table: Any, name: str) -> None:
        """Log a DataFrame (or dict of columns / list of row dicts) as ``.csv`` or
        ``.json`` (``{"columns": [...], "data": [[...]]}``, MLflow's table layout). A
        ``.json`` table is also registered the way ``mlflow.log_table`` does (tag
        ``mlflow.loggedArtifacts``), so the UI lists it as a table and runs can be
        compared on it (``mlflow.load_table``)."""
        import pandas as pd

        df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
        if not Path(name).suffix:
            name += ".json"

        def write(f: Path) -> None:
            if f.suffix == ".csv":
                df.to_csv(f, index=False)
            else:
                data = [[_jsonable(None if isinstance(x, float) and math.isnan(x) else x)
                         for x in row] for row in df.itertuples(index=False)]
                f.write_text(json.dumps({"columns": [str(c) for c in df.columns],
                                         "data": data}, default=str), encoding="utf-8")
        self._log_file(name, write)
        if Path(name).suffix == ".json":
            entry = {"path": name, "type": "table"}
            if entry not in self._tables:
                self._tables.append(entry)
                self.set_tags({"mlflow.loggedArtifacts": json.dumps(self._tables)})


class NullTracker:
    """What :func:`active` returns outside a run: every method does nothing."""

    enabled = False
    run_id = None
    tracking_uri = None
    spooling = False

    def _noop(self, *a, **k) -> None:
        return None

    log_params = set_tags = log_metrics = log_metric = flush = log_artifact = _noop
    log_text = log_dict = log_figure = log_table = end = close = fail = _noop

    @contextlib.contextmanager
    def run(self, *a, **k) -> Iterator["NullTracker"]:
        yield self

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, *exc) -> None:
        return None


NULL = NullTracker()


def active() -> Tracker | NullTracker:
    """The tracker of the innermost open run, or a no-op :class:`NullTracker`."""
    return _ACTIVE[-1] if _ACTIVE else NULL


def notebook_tracker(mlflow_run_id: str | None, tracking_uri: str | None = None,
                     output_dir: str | Path | None = None, *, experiment: str = "notebooks",
                     run_name: str | None = None, params: Any = None,
                     notebook: str | None = None) -> Tracker:
    """The tracker a study notebook opens right after its parameters cell.

    * Under the runner (``mlflow_run_id`` injected): attaches to that run, logs
      ``params`` (the full config, defaults included, next to the point's
      parameters that the runner logged) and
      spools to ``<output_dir>/tracking_spool`` if the server goes away; with
      ``mlflow_run_id == "offline"`` it only spools.
    * Interactively (``mlflow_run_id`` is None): starts a new run in
      ``experiment`` logging ``params``, terminated by ``tracker.close()``.
    """
    spool = spool_dir_for(output_dir) if output_dir else None
    if mlflow_run_id:
        t = Tracker.resume(mlflow_run_id, tracking_uri, spool_dir=spool)
        if params is not None:  # the full typed config, defaults included
            t.log_params(params)
        return t
    t = Tracker(tracking_uri, spool_dir=spool)
    tags = {TAG_NOTEBOOK: notebook} if notebook else None
    if run_name is None and notebook:   # "quickstart 2026-12-02 03:51:35", not a random name
        run_name = f"{Path(notebook).name.removesuffix('.ipynb')} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    t.start(experiment, run_name=run_name, params=params, tags=tags)
    return t


@contextlib.contextmanager
def _scoped_tracking_uri(uri: str):
    """Point mlflow's fluent API (``search_runs``) at ``uri`` for the block, then
    restore the caller's global URI *and* ``MLFLOW_TRACKING_URI`` (which
    ``mlflow.set_tracking_uri`` also overwrites): reading a store must not
    redirect the caller's later mlflow calls to it."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as _uri_state

    old_uri = getattr(_uri_state, "_tracking_uri", None)
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_uri)  # None: back to "unset" (mlflow then drops the env var)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def runs_frame(experiment: str, tracking_uri: str | None = None, *, children_only: bool = True,
               status: str | None = "FINISHED"):
    """All runs of ``experiment`` as a pandas DataFrame (``search_runs``).

    Columns: ``run_id``, ``run_name``, ``status``, ``point`` (the runner's point
    name tag), ``params.<name>``, ``metrics.<name>`` and ``tags.<name>``. With
    ``children_only`` the sweep's parent runs are left out.
    """
    import pandas as pd

    uri = tracking_uri or resolve_tracking_uri()
    check_reachable(uri)
    configure_http_env()
    import mlflow

    try:
        with _scoped_tracking_uri(uri):
            frame = mlflow.search_runs(experiment_names=[experiment], output_format="pandas",
                                       max_results=50000)
    except Exception as e:
        raise TrackingError(f"tracking store {uri}: search_runs({experiment!r}) failed: {e}. "
                            f"{_fix_hint(uri)}") from e
    if frame is None or len(frame) == 0:
        return pd.DataFrame(columns=["run_id", "run_name", "status", "point"])
    if "tags.mlflow.runName" in frame:
        frame["run_name"] = frame["tags.mlflow.runName"]
    if status is not None and "status" in frame:
        frame = frame[frame.status == status]
    if children_only and "tags.mlflow.parentRunId" in frame:
        frame = frame[frame["tags.mlflow.parentRunId"].notna()]
    if f"tags.{TAG_POINT}" in frame:
        frame["point"] = frame[f"tags.{TAG_POINT}"]
    return frame.reset_index(drop=True)
