"""Reading the store back: every run of an experiment as a pandas DataFrame
(:func:`runs_frame`), for the compare notebook and the report."""
from __future__ import annotations

import contextlib
import os

from ..errors import TrackingError
from .names import TAG_POINT
from .store import check_reachable, configure_http_env, fix_hint, resolve_tracking_uri


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
                            f"{fix_hint(uri)}") from e
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
