"""One ``metastone-lab run`` invocation: the sweep's parent run, each point executed
with papermill in a new run folder and logged on its child run, the tracking outage
(offline mode, ``.unlogged.json``, ``--resume``) and the sweep's summary.

All tracking goes through the public :class:`metastone_lab.tracking.Tracker`.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

from .. import progress, tracking
from ..errors import TrackingError
from ..io_utils import atomic_write_json, atomic_write_text
from ..threads import pid_alive
from .layout import (PROGRESS_FILE, RUN_RECORD, SWEEPS_DIR, TRAIN_DIR, new_run_id,
                     numeric_values, read_json, set_latest)
from .points import Point, flat_params, param_text
from .spec import Spec
from .table import format_value

# which runner process owns a point run (so --resume can close the runs of a dead one)
TAG_RUNNER_PID = "metastone.runner_pid"
TAG_RUNNER_HOST = "metastone.runner_host"
TAG_FAILURE = "metastone.failure"


class Sweep:
    """State of one ``run`` invocation (parent run, outage flag, per-point results)."""

    def __init__(self, spec: Spec, notebook: Path, root: Path, runs_dir: Path,
                 uri: str, declared: dict, resume: bool):
        self.spec, self.notebook, self.root, self.uri = spec, notebook, root, uri
        self.out = runs_dir / spec.name
        self.sweep_id = new_run_id()
        self.declared = declared
        self.resume = resume
        self.offline = False
        self.tracker: tracking.Tracker | None = None   # opened by start()
        self.parent_id: str | None = None
        self.results: dict[str, dict] = {}
        self.nb_rel = os.path.relpath(notebook, root)

    # tracking calls; any TrackingError switches the sweep offline
    def _go_offline(self, err: Exception) -> None:
        if not self.offline:
            warnings.warn(
                f"tracking store {self.uri} failed ({err}). Continuing offline: results stay in "
                f"{self.out}; points not logged get a .unlogged.json file. When the store is "
                f"back, re-run with --resume to log them.", RuntimeWarning, stacklevel=2)
            print(f"WARNING: tracking store {self.uri} unreachable; continuing offline",
                  file=sys.stderr)
        self.offline = True

    def _try_online(self) -> bool:
        if self.offline:
            try:
                self.tracker.probe(timeout=3.0)
            except TrackingError:
                return False
            self.offline = False
            if self.parent_id is None:
                try:
                    self._open_parent()
                except TrackingError as e:
                    self._go_offline(e)
                    return False
        return not self.offline

    def _description(self, p: Point | None = None, summary: dict | None = None) -> str:
        """The MLflow run description (tag ``mlflow.note.content``): what the spec
        measures, for a point the values that set it apart from its siblings, and once
        the point has finished its headline numbers (the spec's ``summary_keys``, else
        every summary value) as a table, so they lead the run page; MLflow's own
        metrics list is alphabetical."""
        spec = self.spec
        head = spec.description or f"Spec {spec.name} ({self.nb_rel})."
        differ = getattr(self, "differing", [])
        if p is None:
            return (f"{head}\n\n{getattr(self, 'n_points', 0)} points"
                    + (f", differing in: {', '.join(differ)}." if differ else ".")
                    + (f" Summary: {', '.join(spec.summary_keys)}." if spec.summary_keys else ""))
        flat = flat_params(p.params)
        this = (", ".join(f"{k} = {param_text(flat.get(k, '-'))}" for k in differ) if differ
                else "the spec's only point")
        text = (f"{head}\n\nThis point ({p.name}): {this}. Notebook {self.nb_rel}; "
                f"the executed notebook is under Artifacts > notebook (.ipynb and .html), "
                f"every sample with its step scores in trajectories.html.")
        if summary:
            keys = [k for k in (spec.summary_keys or list(summary)) if k in summary]
            if keys:
                text += ("\n\n| result | value |\n|---|---|\n"
                         + "\n".join(f"| {k} | {format_value(k, summary[k])} |" for k in keys))
        return text

    def _point_tags(self, p: Point) -> dict:
        return {tracking.TAG_SPEC: self.spec.name, tracking.TAG_POINT: p.name,
                tracking.TAG_NOTE: self._description(p),
                TAG_RUNNER_PID: str(os.getpid()), TAG_RUNNER_HOST: socket.gethostname(),
                tracking.TAG_POINT_HASH: p.params_hash, tracking.TAG_ROLE: "point",
                tracking.TAG_NOTEBOOK: self.nb_rel, tracking.TAG_SWEEP: self.parent_id,
                tracking.TAG_PARENT: self.parent_id,
                **({tracking.TAG_GIT: tracking.git_commit(str(self.root))}
                   if tracking.git_commit(str(self.root)) else {})}

    def _open_parent(self) -> None:
        t = self.tracker
        if self.resume:  # --resume: reopen the spec's newest sweep run
            runs = t.find_runs(self.spec.experiment_name,
                               {tracking.TAG_SPEC: self.spec.name, tracking.TAG_ROLE: "sweep"},
                               newest_first=True, max_results=1)
            if runs:
                self.parent_id = runs[0].run_id
                t.set_status(self.parent_id, "RUNNING")
                return
        tags = {tracking.TAG_SPEC: self.spec.name, tracking.TAG_ROLE: "sweep",
                tracking.TAG_NOTEBOOK: self.nb_rel, tracking.TAG_NOTE: self._description()}
        commit = tracking.git_commit(str(self.root))
        if commit:
            tags[tracking.TAG_GIT] = commit
        self.parent_id = t.create_run(self.spec.experiment_name, self.spec.name, tags)
        params = dict(tracking.flatten_params(self.spec.parameters))
        params.update({f"grid.{tracking.metric_key(k)}": json.dumps(v, default=str)
                       for k, v in self.spec.grid.items()})
        if self.spec.seeds:
            params["seeds"] = json.dumps(self.spec.seeds)
        t.log_batch(self.parent_id, params=params)

    def start(self) -> None:
        # probes the store first: a clear error before anything runs
        self.tracker = tracking.Tracker(self.uri).connect()
        self._open_parent()
        if self.resume:
            self.close_orphans()

    def close_orphans(self) -> list[str]:
        """--resume: point runs of this spec left RUNNING by a runner process that no
        longer exists (killed, machine rebooted) are marked KILLED with the reason in
        the tag ``metastone.failure``; their points then run again. Runs of a live
        runner (a concurrent sweep) and of other hosts are left alone."""
        t = self.tracker
        runs = t.find_runs(self.spec.experiment_name,
                           {tracking.TAG_SPEC: self.spec.name, tracking.TAG_ROLE: "point"},
                           status="RUNNING", max_results=5000)
        closed = []
        for r in runs:
            pid, host = r.tags.get(TAG_RUNNER_PID), r.tags.get(TAG_RUNNER_HOST)
            if host != socket.gethostname() or not (pid or "").isdigit() or pid_alive(int(pid)):
                continue
            t.log_batch(r.run_id, tags={
                TAG_FAILURE: f"runner process {pid} on {host} ended without closing this run "
                             f"(killed?); closed by --resume, the point runs again"})
            t.terminate(r.run_id, "KILLED")
            closed.append(r.run_id)
        return closed

    def finished_points(self) -> dict[str, str]:
        """{point name: params hash} of FINISHED child runs of this spec."""
        runs = self.tracker.find_runs(
            self.spec.experiment_name,
            {tracking.TAG_SPEC: self.spec.name, tracking.TAG_ROLE: "point"},
            status="FINISHED", max_results=5000)
        done: dict[str, set] = {}
        for r in runs:
            done.setdefault(r.tags.get(tracking.TAG_POINT, ""), set()).add(
                r.tags.get(tracking.TAG_POINT_HASH, ""))
        return done  # type: ignore[return-value]

    # ------------------------------------------------------------- points --
    def point_dir(self, p: Point) -> Path:
        return self.out / p.name

    def unlogged_path(self, p: Point) -> Path:
        return self.out / f"{p.name}.unlogged.json"

    def notebook_path(self, p: Point, run_dir: Path) -> Path:
        return run_dir / f"{p.name}.ipynb"

    def new_run_dir(self, p: Point) -> Path:
        """A new ``runs/<spec>/<point>/<run-id>/`` with ``train -> ../train`` (the
        point's checkpoints, shared by its runs; kept per run if symlinks fail), made
        the point's ``latest``."""
        pdir = self.point_dir(p)
        (pdir / TRAIN_DIR).mkdir(parents=True, exist_ok=True)
        while True:
            run_dir = pdir / new_run_id()
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
        try:
            os.symlink(os.path.join("..", TRAIN_DIR), run_dir / TRAIN_DIR,
                       target_is_directory=True)
        except OSError:
            pass
        set_latest(pdir, run_dir.name)
        return run_dir

    def last_ok_run(self, p: Point) -> Path | None:
        """The point's newest run folder whose record says it succeeded."""
        pdir = self.point_dir(p)
        if not pdir.is_dir():
            return None
        for d in sorted((c for c in pdir.iterdir() if c.is_dir() and not c.is_symlink()),
                        key=lambda c: c.name, reverse=True):
            rec = read_json(d / RUN_RECORD)
            # a run of the same point name with other parameters is not this point's result
            if rec is not None and rec.get("status") == "ok" \
                    and rec.get("params_hash") == p.params_hash:
                return d
        return None

    def log_point(self, p: Point, run_id: str | None, status: str, error: str | None,
                  run_dir: Path) -> str:
        """Log a finished point's files on its child run (creating it if needed)."""
        t = self.tracker
        out_dir, unlogged = run_dir, self.unlogged_path(p)
        nb_out = self.notebook_path(p, run_dir)
        if run_id is None:
            run_id = t.create_run(self.spec.experiment_name, p.name, self._point_tags(p))
        else:
            t.log_batch(run_id, tags={tracking.TAG_PARENT: self.parent_id,
                                      tracking.TAG_SWEEP: self.parent_id})
        t.log_batch(run_id, params=tracking.flatten_params(p.params))
        t.replay_spool(tracking.spool_dir_for(out_dir), run_id)
        if nb_out.is_file():
            t.log_run_artifact(run_id, nb_out, "notebook")
            page = notebook_html(nb_out)
            if page is not None:
                t.log_run_artifact(run_id, page, "notebook")
        summary_path = out_dir / "summary.json"
        summary = read_json(summary_path) if status == "ok" else None
        if summary is not None:
            t.log_run_artifact(run_id, summary_path)
            t.log_batch(run_id, metrics=numeric_values(summary),
                        tags={tracking.TAG_NOTE: self._description(p, summary)})
        if error:
            tb_file = out_dir / "traceback.txt"
            if not tb_file.is_file():
                tb_file.write_text(error, encoding="utf-8")
            t.log_run_artifact(run_id, tb_file)
        t.terminate(run_id, "FINISHED" if status == "ok" else "FAILED")
        unlogged.unlink(missing_ok=True)
        return run_id

    def execute(self, p: Point) -> dict:
        """Run one point in a new run folder; return its result record."""
        import papermill as pm

        out_dir = self.new_run_dir(p)
        nb_out, unlogged = self.notebook_path(p, out_dir), self.unlogged_path(p)
        run_id = None
        if self._try_online():
            try:
                run_id = self.tracker.create_run(self.spec.experiment_name, p.name,
                                                 self._point_tags(p))
                self.tracker.log_batch(run_id, params=tracking.flatten_params(p.params))
            except TrackingError as e:
                self._go_offline(e)
        injected = {"mlflow_run_id": run_id or tracking.OFFLINE,
                    "mlflow_parent_run_id": self.parent_id, "tracking_uri": self.uri,
                    "spec_name": self.spec.name, "point_name": p.name,
                    "output_dir": str(out_dir.resolve())}
        params = {**p.params, **{k: v for k, v in injected.items() if k in self.declared}}
        t0 = time.monotonic()
        status, error = "ok", None
        prog = out_dir / PROGRESS_FILE
        os.environ[progress.ENV] = str(prog)   # the kernel inherits it: progress.report
        try:
            with progress.Watcher(prog, lambda text: self.show_progress(p, text)):
                pm.execute_notebook(str(self.notebook), str(nb_out), parameters=params,
                                    kernel_name="python3", cwd=str(self.root),
                                    progress_bar=False, log_output=False)
        except Exception as e:  # PapermillExecutionError, dead kernel, ...
            status = "failed"
            error = (f"{type(e).__name__}: {e}\n" if not hasattr(e, "traceback")
                     else f"{e.ename}: {e.evalue}\n" + "\n".join(e.traceback))
        finally:
            os.environ.pop(progress.ENV, None)
        wall = time.monotonic() - t0
        if error:
            (out_dir / "traceback.txt").write_text(error, encoding="utf-8")
        summary = read_json(out_dir / "summary.json") if status == "ok" else None
        record = {"point": p.name, "index": p.index, "status": status, "run_id": run_id,
                  "params_hash": p.params_hash, "wall_seconds": wall, "time": time.time(),
                  "sweep_id": self.sweep_id}
        atomic_write_json(out_dir / RUN_RECORD, record)
        logged = False
        if run_id is not None and not self.offline:
            try:
                self.log_point(p, run_id, status, error, out_dir)
                logged = True
            except TrackingError as e:
                self._go_offline(e)
        if not logged:
            atomic_write_json(unlogged, {
                **record, "run_dir": out_dir.name, "error": error,
                "reason": f"tracking store {self.uri} unreachable"})
        return {"point": p.name, "status": status, "run_id": run_id, "logged": logged,
                "summary": summary, "error": error, "wall_seconds": wall,
                "run_dir": str(out_dir), "notebook": str(nb_out)}

    def log_from_disk(self, p: Point, rec: dict) -> dict | None:
        """--resume: log an unlogged successful point from disk; None if it must re-run."""
        if rec.get("status") != "ok" or rec.get("params_hash") != p.params_hash:
            if rec.get("run_id"):  # an attempt that failed offline: close its run, re-run
                try:
                    self.tracker.terminate(rec["run_id"], "FAILED")
                except TrackingError:
                    pass
            return None
        run_dir = self.point_dir(p) / str(rec.get("run_dir") or "")
        if not rec.get("run_dir") or not run_dir.is_dir():
            return None  # the run's folder is gone: run the point again
        summary = read_json(run_dir / "summary.json")
        where = {"run_dir": str(run_dir), "notebook": str(self.notebook_path(p, run_dir))}
        try:
            run_id = self.log_point(p, rec.get("run_id"), "ok", None, run_dir)
        except TrackingError as e:
            self._go_offline(e)
            return {"point": p.name, "status": "ok", "run_id": rec.get("run_id"),
                    "logged": False, "summary": summary, "error": None, **where}
        return {"point": p.name, "status": "ok", "run_id": run_id, "logged": True,
                "summary": summary, "error": None, "resumed_from_disk": True, **where}

    def skipped(self, p: Point) -> dict:
        """--resume: a point FINISHED in MLflow; its newest successful run on disk."""
        run_dir = self.last_ok_run(p)
        summary = read_json(run_dir / "summary.json") if run_dir is not None else None
        return {"point": p.name, "status": "skipped", "run_id": None, "logged": True,
                "summary": summary, "error": None,
                "run_dir": str(run_dir) if run_dir is not None else None}

    def show_progress(self, p: Point, text: str) -> None:
        """What the kernel reports (:mod:`metastone_lab.progress`), beside the bar."""
        bar = getattr(self, "bar", None)
        if bar is not None and not getattr(bar, "disable", True):
            bar.set_postfix_str(f"{p.name} | {text}")

    def where(self, points: list[Point]) -> str:
        """Where the results are: each point's run folder and MLflow run (id and UI
        page), and the sweep's summary."""
        lines = [f"sweep summary: {self.out / 'summary.json'}"]
        eid = None
        if not self.offline:
            try:
                eid = self.tracker.experiment_id(self.spec.experiment_name)
            except TrackingError:
                eid = None
        shown = [p for p in points if p.name in self.results][:10]
        for p in shown:
            r = self.results[p.name]
            lines.append(f"{p.name}: {r.get('run_dir') or '(no run folder)'}")
            rid = r.get("run_id")
            if rid and r.get("logged", True):
                url = tracking.run_url(self.uri, eid, rid)
                local = not self.uri.startswith(("http://", "https://"))
                lines.append(f"  MLflow run {rid}" + (f": {url}" if url else "")
                             + (" (after `make mlflow-ui`)" if url and local else ""))
        runs_table = tracking.experiment_url(self.uri, eid)
        if runs_table:
            lines.append(f"MLflow runs table of {self.spec.experiment_name!r}: {runs_table}")
        if len(self.results) > len(shown):
            lines.append(f"... and {len(self.results) - len(shown)} more points under "
                         f"{self.out}")
        return "\n".join(lines)

    def finish(self, all_points: list[Point]) -> dict:
        """Aggregate summaries, write the sweep's summary.json (its own folder
        ``_sweeps/<sweep-id>/``, copied to ``runs/<spec>/summary.json``), log the parent."""
        summaries = {}
        for p in all_points:
            r = self.results.get(p.name)
            if r is not None and r["status"] not in ("ok", "skipped"):
                continue
            if r is not None and r.get("run_dir"):
                s = read_json(Path(r["run_dir"]) / "summary.json")
            else:  # not run now: the point's newest successful run
                d = self.last_ok_run(p)
                s = read_json(d / "summary.json") if d is not None else None
            if s is not None:
                summaries[p.name] = s
        numeric = [numeric_values(s) for s in summaries.values()]
        keys = sorted({k for n in numeric for k in n})
        mean = {k: sum(n[k] for n in numeric if k in n) / sum(1 for n in numeric if k in n)
                for k in keys}
        if len(all_points) == 1:
            overall = next(iter(summaries.values()), {})
        else:
            overall = {"spec": self.spec.name, "mean": mean, "points": {
                p.name: {"status": self.results.get(p.name, {}).get("status", "not run"),
                         "params": p.varying, "summary": summaries.get(p.name)}
                for p in all_points}}
        sweep_dir = self.out / SWEEPS_DIR / self.sweep_id
        atomic_write_json(sweep_dir / "summary.json", overall)
        shutil.copyfile(sweep_dir / "summary.json", self.out / ".summary.json.tmp")
        os.replace(self.out / ".summary.json.tmp", self.out / "summary.json")
        failed = any(r["status"] == "failed" for r in self.results.values())
        if self.parent_id is not None and self._try_online():
            try:
                t = self.tracker
                t.log_batch(self.parent_id, metrics=mean)
                t.log_run_artifact(self.parent_id, sweep_dir / "summary.json")
                t.terminate(self.parent_id, "FAILED" if failed else "FINISHED")
            except TrackingError as e:
                self._go_offline(e)
        status = {"spec": self.spec.name, "sweep_id": self.sweep_id,
                  "parent_run_id": self.parent_id, "tracking_uri": self.uri,
                  "offline": self.offline,
                  "points": {k: {kk: vv for kk, vv in r.items() if kk != "summary"}
                             for k, r in self.results.items()}}
        atomic_write_json(sweep_dir / "status.json", status)
        atomic_write_json(self.out / "status.json", status)
        return {"mean": mean, "summaries": summaries}


def notebook_html(nb_path: Path) -> Path | None:
    """The executed notebook as HTML beside it (``<name>.html``, written atomically),
    for the MLflow artifact view; None (with a warning) if nbconvert cannot render it."""
    try:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_filename(str(nb_path))
    except Exception as e:  # a notebook nbconvert cannot read must not fail the point
        warnings.warn(f"could not render {nb_path} as HTML ({type(e).__name__}: {e}); "
                      f"only the .ipynb is logged")
        return None
    out = nb_path.with_suffix(".html")
    atomic_write_text(out, body)
    return out
