"""``metastone-lab run SPEC``: run an experiment spec's notebook over a grid with papermill.

This is the only package that imports papermill (lazily, in :mod:`.points` and :mod:`.sweep`).

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

The package, one concept a module: :mod:`.spec` (the YAML into a validated
:class:`Spec`), :mod:`.points` (grid expansion, checks against the notebook),
:mod:`.layout` (run folders, ``latest``), :mod:`.sweep` (executing and logging
points, offline mode; tracking only through :class:`metastone_lab.tracking.Tracker`),
:mod:`.table` (the terminal table) and :mod:`.driver` (:func:`run_spec`, the CLI).
"""
from __future__ import annotations

from .driver import cli_main, run_spec
from .layout import (LATEST_FILE, LATEST_LINK, PROGRESS_FILE, RUN_RECORD, SWEEPS_DIR,
                     TRAIN_DIR, latest_dir, new_run_id, set_latest)
from .points import (Point, differing_params, expand_points, point_name, select_points,
                     validate_points)
from .spec import RESERVED, Spec, available_specs, find_root, load_spec, resolve_spec_path
from .sweep import TAG_FAILURE, TAG_RUNNER_HOST, TAG_RUNNER_PID, Sweep, notebook_html
from .table import format_value, summary_table, terminal_table

__all__ = [
    "LATEST_FILE", "LATEST_LINK", "PROGRESS_FILE", "RESERVED", "RUN_RECORD", "SWEEPS_DIR",
    "Point", "Spec", "Sweep", "TAG_FAILURE", "TAG_RUNNER_HOST", "TAG_RUNNER_PID", "TRAIN_DIR",
    "available_specs", "cli_main", "differing_params", "expand_points", "find_root",
    "format_value", "latest_dir", "load_spec", "new_run_id", "notebook_html", "point_name",
    "resolve_spec_path", "run_spec", "select_points", "set_latest", "summary_table",
    "terminal_table", "validate_points",
]
