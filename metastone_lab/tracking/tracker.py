"""The :class:`Tracker` façade: the one object through which metastone-lab logs.

Two ways to use it:

* **the current run** (notebooks, training, ``with tracker.run(...)``): ``start`` /
  ``run`` / ``attach`` / ``end`` / ``fail`` and ``log_params`` / ``log_metrics`` /
  ``log_artifact`` / ``log_figure`` / ... act on the innermost open run; a tracker
  given a ``spool_dir`` that loses its server keeps working offline and spools;
* **runs by id** (drivers that hold many runs at once, e.g. the runner's sweep and
  its points): ``create_run`` / ``find_runs`` / ``log_batch`` / ``log_run_artifact``
  / ``set_status`` / ``terminate`` / ``replay_spool`` name the run in every call and
  raise :class:`~metastone_lab.errors.TrackingError` on failure (the driver decides
  what offline means).

:func:`active` returns the tracker of the innermost open run (a no-op
:class:`NullTracker` outside one), and :func:`notebook_tracker` is what a study
notebook opens after its parameters cell.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import TrackingError
from .backend import MlflowBackend, RunRecord
from .names import (OFFLINE, TAG_GIT, TAG_NOTEBOOK, TAG_PARENT, TAG_ROLE, TAG_SWEEP,
                    flatten_params, metric_key)
from .spool import LocalBackend, replay_spool, spool_dir_for
from .store import PROBE_TIMEOUT_S, check_reachable, git_commit, resolve_tracking_uri


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)


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
                self._backend = LocalBackend(self.local_dir, per_run_artifacts=True)
            else:
                check_reachable(self.tracking_uri, self.probe_timeout_s)
                self._backend = MlflowBackend(self.tracking_uri)
        return self._backend

    def _start_spooling(self, err: Exception) -> None:
        self._spooling = True
        self._backend = LocalBackend(self.spool_dir)
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
            t._backend = LocalBackend(spool_dir)
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
        flat = flatten_params(params)
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

    # ------------------------------------------------------- runs by id --
    # For a driver that holds several runs at once (the runner: a sweep's parent run
    # and its point runs). Each call names its run, none touches the current run or
    # spools: a failure raises TrackingError and the driver decides what offline means.

    def probe(self, timeout: float | None = None) -> None:
        """Raise TrackingError unless the store answers within ``timeout`` seconds
        (default ``probe_timeout_s``); a no-op for a local-only tracker."""
        if not self.local_only:
            check_reachable(self.tracking_uri,
                            self.probe_timeout_s if timeout is None else float(timeout))

    def connect(self) -> "Tracker":
        """Probe the store and open it now, so that a dead server or an unwritable
        store is a clear error before anything runs (else the first call does it)."""
        self._get_backend()
        return self

    def _store(self, what: str) -> MlflowBackend:
        """The MLflow backend, for the calls a spool cannot answer (queries)."""
        backend = self._get_backend()
        if not isinstance(backend, MlflowBackend):
            raise TrackingError(f"{what} needs an MLflow store; this tracker writes to "
                                f"{backend.uri} (local-only or spooling)")
        return backend

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (or restored, if deleted) as a
        model-training experiment when needed."""
        return self._store("experiment_id").experiment_id(name)

    def find_experiment(self, name: str) -> str | None:
        """The id of experiment ``name`` if it exists (never creates it), else None."""
        return self._store("find_experiment").find_experiment(name)

    def create_run(self, experiment: str, run_name: str | None = None,
                   tags: Mapping[str, Any] | None = None) -> str:
        """Create a RUNNING run in ``experiment`` with exactly ``tags`` (values
        stringified; None values left out) and return its id; unlike :meth:`start` it
        adds no tags and does not become the current run."""
        return self._get_backend().create_run(
            experiment, run_name, {k: str(v) for k, v in (tags or {}).items() if v is not None})

    def find_runs(self, experiment: str, tags: Mapping[str, str], *, status: str | None = None,
                  newest_first: bool = False, max_results: int = 5000) -> list[RunRecord]:
        """The runs of ``experiment`` whose tags have the given values (and whose
        status is ``status``, if given), newest first if asked; [] without the
        experiment. Tag values must not contain ``'``."""
        exp_id = self.find_experiment(experiment)
        if exp_id is None:
            return []
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        if status is not None:
            clauses.append(f"attributes.status = '{status}'")
        return self._store("find_runs").search_runs(
            exp_id, " and ".join(clauses), max_results=max_results,
            order_by=["attributes.start_time DESC"] if newest_first else None)

    def log_batch(self, run_id: str, metrics: Mapping[str, float] | None = None,
                  params: Mapping[str, str] | None = None,
                  tags: Mapping[str, Any] | None = None, *, step: int = 0) -> None:
        """Log on run ``run_id`` at once: ``metrics`` at ``step`` (names made
        MLflow-safe), already flat ``params`` (see :func:`flatten_params`) and
        ``tags`` (values stringified)."""
        now = int(time.time() * 1000)
        ms = [(metric_key(k), float(v), int(step), now) for k, v in (metrics or {}).items()]
        self._get_backend().log_batch(run_id, ms, dict(params) if params else None,
                                      {k: str(v) for k, v in tags.items()} if tags else None)

    def log_run_artifact(self, run_id: str, path: str | os.PathLike,
                         artifact_path: str | None = None) -> None:
        """Upload file ``path`` to run ``run_id`` (under ``artifact_path``)."""
        self._get_backend().log_artifact(run_id, Path(path), artifact_path)

    def set_status(self, run_id: str, status: str) -> None:
        """Set run ``run_id``'s status without ending it (``RUNNING`` reopens it)."""
        self._store("set_status").set_status(run_id, status)

    def terminate(self, run_id: str, status: str = "FINISHED") -> None:
        """End run ``run_id`` with ``status`` (``FINISHED``, ``FAILED``, ``KILLED``)."""
        self._get_backend().terminate(run_id, status)

    def replay_spool(self, folder: str | os.PathLike, run_id: str, *,
                     include_terminate: bool = False) -> int:
        """Log what spool ``folder`` holds into run ``run_id`` (see
        :func:`~.spool.replay_spool`); return the number of ops replayed."""
        if not (Path(folder) / "ops.jsonl").is_file():
            return 0
        return replay_spool(folder, run_id, self.tracking_uri,
                            include_terminate=include_terminate,
                            backend=self._store("replay_spool"))


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
