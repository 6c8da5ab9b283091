"""Names in the tracking store: tag names, MLflow-safe metric/param keys, flattened
params, and the MLflow UI addresses of runs and experiments.

Pure functions and constants (no MLflow import), shared by the tracker, the runner,
the report and the compare notebook.
"""
from __future__ import annotations

import json
import re
from typing import Any

OFFLINE = "offline"  # run id the runner injects when the tracking store is down
SPOOL_DIRNAME = "tracking_spool"

# Tag names (shared with the runner and the compare notebook).
TAG_GIT = "metastone.git_commit"
TAG_NOTEBOOK = "metastone.notebook"
TAG_SPEC = "metastone.spec"
TAG_POINT = "metastone.point"
TAG_POINT_HASH = "metastone.point_hash"
TAG_SWEEP = "metastone.sweep"          # parent (sweep) run id on child runs
TAG_ROLE = "metastone.role"            # "sweep" | "point" | "run"
TAG_PARENT = "mlflow.parentRunId"      # makes the MLflow UI nest runs
TAG_NOTE = "mlflow.note.content"       # the run's description on its MLflow page

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

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")
_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


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
    """A file-name-safe form of ``name`` (``run`` when nothing is left)."""
    s = _SLUG.sub("_", str(name)).strip("._") or "run"
    return s


def flatten_params(params: Any) -> dict[str, str]:
    """A dataclass/dict as MLflow params: nested keys joined with ``.`` (made
    MLflow-safe by :func:`metric_key`), values stringified (lists, dicts, bools and
    None as JSON) and cut at 6000 characters. An empty dict (``{}`` = the defaults) is
    no parameter and is left out: its keys are logged."""
    if params is None:
        return {}
    from ..config import flatten

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
