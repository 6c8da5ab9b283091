"""``metastone-lab run SPEC``: run an experiment spec's notebook over a grid with papermill.

This is the only module that imports papermill (lazily).

Spec (``experiments/X.yaml``, loaded into :class:`Spec`)::

    name: ablate-scoring            # folder runs/<name>/, default MLflow experiment
    notebook: notebooks/ablate.ipynb   # relative to the repo root
    experiment: ablations           # optional MLflow experiment (default: name)
    parameters: {k: 8, n_problems: 64}         # base parameters
    grid: {aggregator: [geometric, min]}       # cartesian product
    points: [{aggregator: mean, k: 4}]         # optional explicit points (added)
    seeds: [0, 1]                   # optional: every point x every seed (param `seed`)
    summary_keys: [auroc, bon@8]    # columns of the final table (default: all numeric)

Points: base parameters, updated by each grid combination and each explicit
point, times each seed. A point's name is built from the values that vary
(``aggregator-min_seed-1``; ``default`` for a single point), sanitised for file
names. ``--set key=value`` overrides a base parameter; on a grid key it pins
that axis to the one value.

Root: ``$METASTONE_LAB_HOME`` if set, else the nearest folder above the spec
holding ``pyproject.toml`` or ``.git``, else the cwd. Notebooks run with that as
their working directory; outputs go to ``<root>/runs/<spec>/``.

OUTPUT LAYOUT (nothing a run wrote is ever overwritten by a later run)
----------------------------------------------------------------------
::

    runs/<spec>/<point>/<run-id>/        one folder per execution of the point
        <point>.ipynb                    the executed notebook
        summary.json, run.json           the notebook's summary; the runner's record
        traceback.txt, tracking_spool/   (failed run; tracking outage)
        train -> ../train                the point's training checkpoints (symlink)
    runs/<spec>/<point>/latest           -> the newest <run-id> (a symlink, or a
                                         LATEST text file where symlinks fail)
    runs/<spec>/<point>/train/cfg-<fingerprint>/   training checkpoints, one folder
                                         per training config (StudyConfig.train_config):
                                         a retried point resumes ITS config only
    runs/<spec>/<point>.unlogged.json    a run finished offline, for --resume
    runs/<spec>/_sweeps/<sweep-id>/      summary.json + status.json of each invocation
    runs/<spec>/summary.json, status.json   copies of the newest sweep's

``<run-id>`` / ``<sweep-id>`` are ``YYYYmmdd-HHMMSS-<6 hex>``.

NOTEBOOK CONTRACT (what the runner injects)
-------------------------------------------
The runner validates every user parameter against the notebook's cell tagged
``parameters`` BEFORE anything runs (unknown name or wrong type -> ConfigError
listing the valid names). It then injects, *only if the notebook declares
them*, these reserved names (which specs may not set)::

    mlflow_run_id = None         # str: the point's child run (already created, RUNNING),
                                 #      or "offline" when the tracking store is down
    mlflow_parent_run_id = None  # str: the sweep's parent run
    tracking_uri = None          # str: the MLflow URI the runner uses
    spec_name = None             # str: spec name
    point_name = None            # str: e.g. "aggregator-min_seed-1"
    output_dir = None            # str: absolute path runs/<spec>/<point>/<run-id>/ (exists,
                                 #      new for every run; its train/ is the point's shared
                                 #      checkpoint folder)

The notebook opens its tracker right after the parameters cell::

    from metastone_lab import tracking
    tracker = tracking.notebook_tracker(mlflow_run_id, tracking_uri, output_dir,
                                        experiment="...", params={...})   # params used interactively
    ...  tracker.log_metrics({...}, step=i); tracker.log_figure(fig, "x.png") ...
    # last cell: write the headline numbers, then close
    io_utils.atomic_write_json(Path(output_dir) / "summary.json", summary)   # if output_dir
    tracker.close()

Under the runner ``notebook_tracker`` attaches to ``mlflow_run_id`` (it never
terminates it) and, if the server dies, spools to ``<output_dir>/tracking_spool``.
Interactively (all reserved names None) it starts and owns a fresh run.

After the notebook, the runner logs on the child run: params (all point params),
the executed notebook ``<run dir>/<point>.ipynb`` (artifact ``notebook/``),
``summary.json`` and its numeric values as metrics (names via
``tracking.metric_key``: ``pass@1`` -> ``pass_at_1``), then marks it FINISHED,
or FAILED with ``traceback.txt`` if the notebook raised (the executed notebook,
with the traceback, is kept). The parent run gets the mean of each numeric
summary value over the successful points (for one point: the same values) and the sweep's
``summary.json`` (one point: that point's summary; several:
``{"spec", "points": {name: {...}}, "mean": {...}}``), written to
``runs/<spec>/_sweeps/<sweep-id>/`` and copied to ``runs/<spec>/summary.json``.
Points not run by this invocation contribute their newest successful run.

Tracking outage: if a tracking call fails mid-sweep the runner warns, keeps
running the remaining points offline (``mlflow_run_id="offline"``), and writes
``runs/<spec>/<point>.unlogged.json`` (naming the run folder) for each point it
could not log. Before
each later point it probes the server again. ``--resume`` logs those points
from disk (params, spool, notebook, summary) without re-running them, skips
points FINISHED in MLflow (same spec, point name and parameter hash), and runs
the rest.

Exit codes: 0 all points ok; 1 some point failed; 3 all ran but some could
not be logged (re-run with ``--resume``); 2 bad spec/arguments (via cli.py).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import cli_help, progress, tracking
from .config import check, from_dict, load_yaml, parse_override
from .errors import ConfigError, TrackingError
from .io_utils import atomic_write_json, atomic_write_text
from .threads import pid_alive

RESERVED = ("mlflow_run_id", "mlflow_parent_run_id", "tracking_uri", "spec_name",
            "point_name", "output_dir")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# which runner process owns a point run (so --resume can close the runs of a dead one)
TAG_RUNNER_PID = "metastone.runner_pid"
TAG_RUNNER_HOST = "metastone.runner_host"
TAG_FAILURE = "metastone.failure"


# -------------------------------------------------------------------- spec --
@dataclass
class Spec:
    name: str
    notebook: str
    parameters: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    points: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    experiment: str | None = None
    summary_keys: list[str] = field(default_factory=list)
    description: str = ""
    report: dict = field(default_factory=dict)   # what it means: metastone_lab.report_spec

    def __post_init__(self) -> None:
        check(bool(_NAME_RE.match(self.name)),
              f"spec name {self.name!r} must be letters, digits, '_', '-', '.' "
              f"(it names the folder runs/<name>); rename it")
        for key, values in self.grid.items():
            check(isinstance(values, list),
                  f"spec {self.name!r}: grid.{key} must be a list of values, got "
                  f"{type(values).__name__} {values!r}; write e.g. {key}: [{values!r}]")
            check(len(values) > 0,
                  f"spec {self.name!r}: grid.{key} is an empty list, so the grid has no "
                  f"points; give it at least one value or remove the key")
        for i, p in enumerate(self.points):
            check(isinstance(p, dict),
                  f"spec {self.name!r}: points[{i}] must be a mapping of parameters, "
                  f"got {type(p).__name__}")
        check(self.seeds is not None and all(isinstance(s, int) and not isinstance(s, bool)
                                             for s in self.seeds),
              f"spec {self.name!r}: seeds must be a list of integers, got {self.seeds!r}")
        used = set(self.parameters) | set(self.grid) | {k for p in self.points for k in p}
        bad = sorted(used & set(RESERVED))
        check(not bad, f"spec {self.name!r}: {bad} are reserved names the runner injects "
                       f"({', '.join(RESERVED)}); remove them from the spec")
        check(not (self.seeds and "seed" in self.grid),
              f"spec {self.name!r}: give seeds either as 'seeds:' or as grid.seed, not both")
        from .report_spec import ReportSpec

        ReportSpec.from_spec(self)  # the report: section, validated on load (ConfigError)

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name


@dataclass(frozen=True)
class Point:
    index: int
    name: str
    params: dict          # everything passed to the notebook (base + point + seed)
    varying: dict         # the values that define this point

    @property
    def params_hash(self) -> str:
        blob = json.dumps(self.params, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def find_root(spec_path: str | Path) -> Path:
    """``$METASTONE_LAB_HOME``, else the nearest folder above the spec with
    ``pyproject.toml`` or ``.git``, else the cwd."""
    env = os.environ.get(tracking.HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return tracking.project_root(Path(spec_path).resolve().parent) or Path.cwd().resolve()


def _spec_folders(root: str | Path | None = None) -> list[Path]:
    """Where bare spec names are looked up: ``<root>/experiments`` (root = the
    argument, ``$METASTONE_LAB_HOME`` or the project around the cwd), then this
    checkout's ``experiments/``."""
    roots = [Path(root)] if root is not None else [find_root(Path.cwd() / "_")]
    roots.append(Path(__file__).resolve().parents[1])
    return list(dict.fromkeys(r.resolve() / "experiments" for r in roots))


def available_specs(root: str | Path | None = None) -> list[str]:
    """Names of the specs (``experiments/*.yaml``) a bare name can refer to."""
    names: list[str] = []
    for d in _spec_folders(root):
        if d.is_dir():
            names += [f.stem for f in sorted(d.glob("*.yaml"))]
    return list(dict.fromkeys(names))


def resolve_spec_path(path: str | Path, root: str | Path | None = None) -> Path:
    """``path`` if it is a file, else ``experiments/<path>.yaml`` (so ``run quickstart``
    works); a clear error listing the available specs otherwise."""
    p = Path(path)
    if p.is_file():
        return p
    if p.parent == Path(".") or str(p.parent) == "experiments":
        stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
        for d in _spec_folders(root):
            if (d / f"{stem}.yaml").is_file():
                return d / f"{stem}.yaml"
    names = available_specs(root)
    raise ConfigError(f"spec {str(path)!r} not found; the specs here are "
                      f"{', '.join(names) if names else 'none (no experiments/ folder)'}: "
                      f"pass a name (e.g. quickstart) or a path to a spec YAML")


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
              root: str | Path | None = None) -> tuple[Spec, Path]:
    """Read and validate a spec; apply ``--set`` overrides; return (spec, notebook path).
    ``path`` may be a bare spec name (``quickstart``; :func:`resolve_spec_path`)."""
    path = resolve_spec_path(path, root)
    data = load_yaml(path)
    spec = from_dict(Spec, data, where=f"spec {str(path)!r}")
    for item in overrides:
        key, value = parse_override(item)
        if key in RESERVED:
            raise ConfigError(f"--set {item!r}: {key!r} is reserved (injected by the runner)")
        if key in spec.grid:
            spec.grid[key] = [value]
        else:
            spec.parameters[key] = value
    root = Path(root) if root is not None else find_root(path)
    nb = Path(spec.notebook)
    nb = nb if nb.is_absolute() else root / nb
    if not nb.is_file():
        raise ConfigError(
            f"spec {str(path)!r}: notebook {spec.notebook!r} does not exist (looked for "
            f"{str(nb)!r}; paths are relative to the repo root {str(root)!r}); fix 'notebook:'"
        )
    return spec, nb


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _flat(params: dict, prefix: str = "") -> dict:
    """``{"train": {"loss": "spr"}}`` -> ``{"train.loss": "spr"}`` (a dry run's columns)."""
    out: dict = {}
    for k, v in params.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing_params(points: list) -> list[str]:
    """The (flattened) parameters whose value differs between ``points``, in order."""
    flats = [_flat(p.params) for p in points]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return [k for k in keys
            if len({json.dumps(f.get(k, "<unset>"), sort_keys=True, default=str)
                    for f in flats}) > 1]


def point_name(varying: dict) -> str:
    if not varying:
        return "default"
    raw = "_".join(f"{k}-{_fmt(v)}" for k, v in varying.items())
    name = re.sub(r"[^A-Za-z0-9_.+=-]+", "", raw.replace(" ", "")) or "point"
    if len(name) > 80:
        name = name[:70] + "-" + hashlib.sha1(raw.encode()).hexdigest()[:8]
    return name


def expand_points(spec: Spec) -> list[Point]:
    """Grid product + explicit points, times seeds. Names are unique."""
    combos: list[dict] = []
    if spec.grid:
        keys = list(spec.grid)
        combos += [dict(zip(keys, vals)) for vals in itertools.product(*spec.grid.values())]
    combos += [dict(p) for p in spec.points]
    if not combos:
        combos = [{}]
    if spec.seeds:
        combos = [{**c, "seed": s} for c in combos for s in spec.seeds]
    points, seen = [], {}
    for i, varying in enumerate(combos):
        name = point_name(varying)
        if name in seen:
            raise ConfigError(
                f"spec {spec.name!r}: points {seen[name]} and {i} are identical "
                f"({name!r}); remove the duplicate")
        seen[name] = i
        points.append(Point(i, name, {**spec.parameters, **varying}, varying))
    return points


def select_points(points: list[Point], only: list[str]) -> list[Point]:
    if not only:
        return points
    by_name = {p.name: p for p in points}
    chosen: list[Point] = []
    for item in only:
        p = by_name.get(item)
        if p is None and re.fullmatch(r"-?\d+", item):
            idx = int(item)
            p = points[idx] if -len(points) <= idx < len(points) else None
        if p is None:
            raise ConfigError(
                f"--only {item!r}: no such point; use a name or an index 0..{len(points) - 1}. "
                f"Points: {', '.join(p.name for p in points)}")
        if p not in chosen:
            chosen.append(p)
    return sorted(chosen, key=lambda p: p.index)


def validate_points(points: list[Point], notebook: Path) -> dict:
    """Check every point's parameters against the notebook's parameters cell."""
    import papermill as pm

    from .notebook_params import check_parameters, from_inspection

    try:
        declared = from_inspection(pm.inspect_notebook(str(notebook)))
    except Exception as e:
        raise ConfigError(f"cannot read the parameters of notebook {str(notebook)!r}: {e}; "
                          f"check that it is a valid .ipynb with a cell tagged 'parameters'")
    for p in points:
        check_parameters(p.params, declared, where=f"point {p.index} ({p.name}) of {notebook.name}",
                         reserved=RESERVED)
    return declared


# ----------------------------------------------------------------- helpers --
def _numeric(summary: dict) -> dict[str, float]:
    out = {}
    for k, v in summary.items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


LATEST_LINK, LATEST_FILE, RUN_RECORD, SWEEPS_DIR, TRAIN_DIR = (
    "latest", "LATEST", "run.json", "_sweeps", "train")
#: what the kernel reports on its long loops (metastone_lab.progress), in a point's run folder
PROGRESS_FILE = "progress.json"


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-<6 hex>``: sorts by start time, unique without coordination."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def set_latest(folder: Path, name: str) -> None:
    """Point ``folder/latest`` at ``folder/name``: a relative symlink replaced
    atomically, or (where symlinks fail) the text file ``folder/LATEST``."""
    link = folder / LATEST_LINK
    tmp = folder / f".{LATEST_LINK}.{secrets.token_hex(4)}"
    try:
        os.symlink(name, tmp, target_is_directory=True)
        os.replace(tmp, link)
        (folder / LATEST_FILE).unlink(missing_ok=True)
    except OSError:
        tmp.unlink(missing_ok=True)
        from .io_utils import atomic_write_text

        atomic_write_text(folder / LATEST_FILE, name + "\n")


def latest_dir(folder: Path) -> Path | None:
    """The folder ``folder/latest`` (or ``folder/LATEST``) points at, if it exists."""
    link = folder / LATEST_LINK
    if link.is_symlink() or link.is_dir():
        return link.resolve() if link.resolve().is_dir() else None
    try:
        name = (folder / LATEST_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return folder / name if name and (folder / name).is_dir() else None


class _Sweep:
    """State of one ``run`` invocation (parent run, outage flag, per-point results)."""

    def __init__(self, spec: Spec, notebook: Path, root: Path, runs_dir: Path,
                 uri: str, declared: dict, resume: bool):
        self.spec, self.notebook, self.root, self.uri = spec, notebook, root, uri
        self.out = runs_dir / spec.name
        self.sweep_id = new_run_id()
        self.declared = declared
        self.resume = resume
        self.offline = False
        self.backend: Any = None
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
                tracking.check_reachable(self.uri, timeout=3.0)
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
        flat = _flat(p.params)
        this = (", ".join(f"{k} = {_fmt(flat.get(k, '-'))}" for k in differ) if differ
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
                "mlflow.note.content": self._description(p),
                TAG_RUNNER_PID: str(os.getpid()), TAG_RUNNER_HOST: socket.gethostname(),
                tracking.TAG_POINT_HASH: p.params_hash, tracking.TAG_ROLE: "point",
                tracking.TAG_NOTEBOOK: self.nb_rel, tracking.TAG_SWEEP: self.parent_id,
                tracking.TAG_PARENT: self.parent_id,
                **({tracking.TAG_GIT: tracking.git_commit(str(self.root))}
                   if tracking.git_commit(str(self.root)) else {})}

    def _open_parent(self) -> None:
        be = self.backend
        if self.resume:
            exp = be._call("get_experiment", be.client.get_experiment_by_name,
                           self.spec.experiment_name)
            if exp is not None:
                runs = be._call("search_runs", be.client.search_runs, [exp.experiment_id],
                                filter_string=(f"tags.`{tracking.TAG_SPEC}` = '{self.spec.name}' "
                                               f"and tags.`{tracking.TAG_ROLE}` = 'sweep'"),
                                order_by=["attributes.start_time DESC"], max_results=1)
                if runs:
                    self.parent_id = runs[0].info.run_id
                    be._call("update_run", be.client.update_run, self.parent_id,
                             status="RUNNING")
                    return
        tags = {tracking.TAG_SPEC: self.spec.name, tracking.TAG_ROLE: "sweep",
                tracking.TAG_NOTEBOOK: self.nb_rel, "mlflow.note.content": self._description()}
        commit = tracking.git_commit(str(self.root))
        if commit:
            tags[tracking.TAG_GIT] = commit
        self.parent_id = be.create_run(self.spec.experiment_name, self.spec.name, tags)
        params = dict(tracking._flatten_params(self.spec.parameters))
        params.update({f"grid.{tracking.metric_key(k)}": json.dumps(v, default=str)
                       for k, v in self.spec.grid.items()})
        if self.spec.seeds:
            params["seeds"] = json.dumps(self.spec.seeds)
        be.log_batch(self.parent_id, (), params, None)

    def start(self) -> None:
        tracking.check_reachable(self.uri)  # clear error before anything runs
        tracking.configure_http_env()
        self.backend = tracking._MlflowBackend(self.uri)
        self._open_parent()
        if self.resume:
            self.close_orphans()

    def close_orphans(self) -> list[str]:
        """--resume: point runs of this spec left RUNNING by a runner process that no
        longer exists (killed, machine rebooted) are marked KILLED with the reason in
        the tag ``metastone.failure``; their points then run again. Runs of a live
        runner (a concurrent sweep) and of other hosts are left alone."""
        be = self.backend
        exp = be._call("get_experiment", be.client.get_experiment_by_name,
                       self.spec.experiment_name)
        if exp is None:
            return []
        runs = be._call("search_runs", be.client.search_runs, [exp.experiment_id],
                        filter_string=(f"tags.`{tracking.TAG_SPEC}` = '{self.spec.name}' and "
                                       f"tags.`{tracking.TAG_ROLE}` = 'point' and "
                                       f"attributes.status = 'RUNNING'"), max_results=5000)
        closed = []
        for r in runs:
            pid, host = r.data.tags.get(TAG_RUNNER_PID), r.data.tags.get(TAG_RUNNER_HOST)
            if host != socket.gethostname() or not (pid or "").isdigit() or pid_alive(int(pid)):
                continue
            be.log_batch(r.info.run_id, (), None, {
                TAG_FAILURE: f"runner process {pid} on {host} ended without closing this run "
                             f"(killed?); closed by --resume, the point runs again"})
            be.terminate(r.info.run_id, "KILLED")
            closed.append(r.info.run_id)
        return closed

    def finished_points(self) -> dict[str, str]:
        """{point name: params hash} of FINISHED child runs of this spec."""
        be = self.backend
        exp = be._call("get_experiment", be.client.get_experiment_by_name,
                       self.spec.experiment_name)
        if exp is None:
            return {}
        runs = be._call("search_runs", be.client.search_runs, [exp.experiment_id],
                        filter_string=(f"tags.`{tracking.TAG_SPEC}` = '{self.spec.name}' and "
                                       f"tags.`{tracking.TAG_ROLE}` = 'point' and "
                                       f"attributes.status = 'FINISHED'"), max_results=5000)
        done: dict[str, set] = {}
        for r in runs:
            done.setdefault(r.data.tags.get(tracking.TAG_POINT, ""), set()).add(
                r.data.tags.get(tracking.TAG_POINT_HASH, ""))
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
            rec = _read_json(d / RUN_RECORD)
            # a run of the same point name with other parameters is not this point's result
            if rec is not None and rec.get("status") == "ok" \
                    and rec.get("params_hash") == p.params_hash:
                return d
        return None

    def log_point(self, p: Point, run_id: str | None, status: str, error: str | None,
                  run_dir: Path) -> str:
        """Log a finished point's files on its child run (creating it if needed)."""
        be = self.backend
        out_dir, unlogged = run_dir, self.unlogged_path(p)
        nb_out = self.notebook_path(p, run_dir)
        if run_id is None:
            run_id = be.create_run(self.spec.experiment_name, p.name, self._point_tags(p))
        else:
            be.log_batch(run_id, (), None, {tracking.TAG_PARENT: self.parent_id,
                                            tracking.TAG_SWEEP: self.parent_id})
        be.log_batch(run_id, (), tracking._flatten_params(p.params), None)
        tracking.replay_spool(tracking.spool_dir_for(out_dir), run_id, self.uri)
        if nb_out.is_file():
            be.log_artifact(run_id, nb_out, "notebook")
            page = notebook_html(nb_out)
            if page is not None:
                be.log_artifact(run_id, page, "notebook")
        summary_path = out_dir / "summary.json"
        summary = _read_json(summary_path) if status == "ok" else None
        if summary is not None:
            be.log_artifact(run_id, summary_path, None)
            now = int(time.time() * 1000)
            be.log_batch(run_id, [(tracking.metric_key(k), v, 0, now)
                                  for k, v in _numeric(summary).items()],
                         None, {"mlflow.note.content": self._description(p, summary)})
        if error:
            tb_file = out_dir / "traceback.txt"
            if not tb_file.is_file():
                tb_file.write_text(error, encoding="utf-8")
            be.log_artifact(run_id, tb_file, None)
        be.terminate(run_id, "FINISHED" if status == "ok" else "FAILED")
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
                run_id = self.backend.create_run(self.spec.experiment_name, p.name,
                                                 self._point_tags(p))
                self.backend.log_batch(run_id, (), tracking._flatten_params(p.params), None)
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
        summary = _read_json(out_dir / "summary.json") if status == "ok" else None
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
                    self.backend.terminate(rec["run_id"], "FAILED")
                except TrackingError:
                    pass
            return None
        run_dir = self.point_dir(p) / str(rec.get("run_dir") or "")
        if not rec.get("run_dir") or not run_dir.is_dir():
            return None  # the run's folder is gone: run the point again
        summary = _read_json(run_dir / "summary.json")
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
        summary = _read_json(run_dir / "summary.json") if run_dir is not None else None
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
                eid = self.backend.experiment_id(self.spec.experiment_name)
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
                s = _read_json(Path(r["run_dir"]) / "summary.json")
            else:  # not run now: the point's newest successful run
                d = self.last_ok_run(p)
                s = _read_json(d / "summary.json") if d is not None else None
            if s is not None:
                summaries[p.name] = s
        numeric = [_numeric(s) for s in summaries.values()]
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
                be, now = self.backend, int(time.time() * 1000)
                be.log_batch(self.parent_id, [(tracking.metric_key(k), v, 0, now)
                                              for k, v in mean.items()])
                be.log_artifact(self.parent_id, sweep_dir / "summary.json", None)
                be.terminate(self.parent_id, "FAILED" if failed else "FINISHED")
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


def format_value(key: str, v: Any) -> str:
    """One summary value for the terminal: 3 decimals, a CI as ``[lo, hi]``, seconds
    as ``5m 30s``, ``-`` when missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float))
                                                             for x in v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"
    if isinstance(v, (int, float)) and not isinstance(v, bool) and key.endswith("seconds"):
        m, sec = divmod(int(round(v)), 60)
        return f"{m}m {sec:02d}s" if m else f"{sec}s"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def terminal_table(df) -> str:
    """The sweep's closing table, rounded: one ``key value`` line per summary key for
    a single point (it reads better than one 150-column row), a table otherwise."""
    if not len(df):
        return "(no points run)"
    cols = [c for c in df.columns if c not in ("point", "status")]
    if len(df) == 1:
        row = df.iloc[0]
        width = max(len(c) for c in cols) if cols else 0
        lines = [f"point {row['point']} ({row['status']})"]
        lines += [f"  {c:<{width}}  {format_value(c, row[c])}" for c in cols]
        return "\n".join(lines)
    shown = df.copy()
    for c in cols:
        shown[c] = [format_value(c, v) for v in df[c]]
    return shown.to_string(index=False)


def _table(spec: Spec, points: list[Point], results: dict, summaries: dict, mean: dict):
    """One row per point run now (plus a ``mean`` row over the sweep when >1 point)."""
    import pandas as pd

    rows = []
    for p in points:
        r = results.get(p.name)
        if r is None:
            continue
        s = summaries.get(p.name) or {}
        keys = spec.summary_keys or sorted(_numeric(s))
        row = {"point": p.name, "status": r["status"] + ("" if r.get("logged", True)
                                                          else " (unlogged)")}
        row.update({k: s.get(k) for k in keys})
        rows.append(row)
    if len(summaries) > 1 and rows:
        keys = [k for k in rows[0] if k not in ("point", "status")]
        rows.append({"point": "mean", "status": f"{len(summaries)} pts",
                     **{k: mean.get(k) for k in keys}})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ driver --
def run_spec(spec_path: str | Path, *, overrides: list[str] = (), only: list[str] = (),
             dry_run: bool = False, resume: bool = False, fail_fast: bool = False,
             root: str | Path | None = None, runs_dir: str | Path | None = None,
             tracking_uri: str | None = None, progress: bool = True,
             on_point_done: Callable[[Point, dict], None] | None = None) -> dict:
    """Run a spec (the body of ``metastone-lab run``); return a report dict with
    ``exit_code``, ``points`` (results by name), ``table`` (DataFrame) and
    ``summary`` (what runs/<spec>/summary.json holds)."""
    spec_path = resolve_spec_path(spec_path, root)
    spec, notebook = load_spec(spec_path, list(overrides), root)
    root = Path(root).resolve() if root is not None else find_root(spec_path)
    runs_dir = Path(runs_dir) if runs_dir is not None else root / "runs"
    all_points = expand_points(spec)
    points = select_points(all_points, list(only))
    declared = validate_points(points, notebook)
    if dry_run:
        import pandas as pd

        differ = differing_params(all_points)
        df = pd.DataFrame([{"index": p.index, "point": p.name,
                            **{k: _fmt(_flat(p.params).get(k, "-")) for k in differ}}
                           for p in points])
        print(f"spec {spec.name!r}: {len(points)} of {len(all_points)} points, "
              f"notebook {notebook}")
        if spec.description:
            print(f"  {spec.description}")
        same = {k: v for k, v in _flat(all_points[0].params).items()
                if k not in differ} if all_points else {}
        print("  the same in every point: "
              + ", ".join(f"{k}={_fmt(v)}" for k, v in same.items()))
        print(df.to_string(index=False))
        return {"exit_code": 0, "points": {p.name: p for p in points}, "table": df,
                "summary": None}
    uri = tracking_uri or tracking.resolve_tracking_uri(root)
    sweep = _Sweep(spec, notebook, root, runs_dir, uri, declared, resume)
    sweep.differing = differing_params(all_points)
    sweep.n_points = len(all_points)
    sweep.out.mkdir(parents=True, exist_ok=True)
    sweep.start()
    done = sweep.finished_points() if resume else {}
    from tqdm.auto import tqdm

    bar = tqdm(points, desc=spec.name, unit="point", disable=not progress, file=sys.stderr)
    sweep.bar = bar
    for p in bar:
        bar.set_postfix_str(p.name)
        unlogged = sweep.unlogged_path(p)
        result = None
        if resume and unlogged.is_file():
            result = sweep.log_from_disk(p, _read_json(unlogged) or {})
        if result is None and resume and p.params_hash in done.get(p.name, ()):
            result = sweep.skipped(p)
        if result is None:
            result = sweep.execute(p)
        sweep.results[p.name] = result
        if on_point_done is not None:
            on_point_done(p, result)
        if result["status"] == "failed":
            print(f"point {p.name} FAILED; notebook kept at {result.get('notebook')}",
                  file=sys.stderr)
            if fail_fast:
                break
    bar.close()
    agg = sweep.finish(all_points)
    df = _table(spec, points, sweep.results, agg["summaries"], agg["mean"])
    print(terminal_table(df))
    print(sweep.where(points))
    failed = any(r["status"] == "failed" for r in sweep.results.values())
    unlogged_any = any(not r.get("logged", True) for r in sweep.results.values())
    if unlogged_any:
        print(f"some points could not be logged to {uri}; they are marked "
              f"{sweep.out}/<point>.unlogged.json. Re-run with --resume when the store is back.",
              file=sys.stderr)
    code = 1 if failed else (3 if unlogged_any else 0)
    return {"exit_code": code, "points": sweep.results, "table": df,
            "summary": _read_json(sweep.out / "summary.json"), "parent_run_id": sweep.parent_id}


def cli_main(argv: list[str] | None = None) -> int:
    ap = cli_help.parser(
        "metastone-lab run",
        "Run an experiment spec: every grid point of the notebook with papermill, "
        "each in a child MLflow run under one parent run.",
        epilog="specs in this checkout: " + (", ".join(available_specs()) or "none found"))
    ap.add_argument("spec", help="experiments/<name>.yaml, or just <name>")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a base parameter (YAML value); on a grid key, pin that axis")
    ap.add_argument("--dry-run", action="store_true", help="list the points, run nothing")
    ap.add_argument("--only", action="append", default=[], metavar="NAME_OR_INDEX",
                    help="run only this point (repeatable)")
    ap.add_argument("--resume", action="store_true",
                    help="skip points FINISHED in MLflow; log points finished offline")
    ap.add_argument("--fail-fast", action="store_true", help="stop at the first failing point")
    ap.add_argument("--runs-dir", default=None, help="output folder (default: <root>/runs)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///<root>/mlruns.db)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = ap.parse_args(argv)
    report = run_spec(a.spec, overrides=a.overrides, only=a.only, dry_run=a.dry_run,
                      resume=a.resume, fail_fast=a.fail_fast, runs_dir=a.runs_dir,
                      tracking_uri=a.tracking_uri, progress=not a.no_progress)
    return report["exit_code"]
