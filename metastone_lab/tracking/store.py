"""Where the tracking store is and whether it answers.

:func:`resolve_tracking_uri` picks the store (``$MLFLOW_TRACKING_URI``, else
``sqlite:///<home>/mlruns.db``), :func:`check_reachable` probes it within seconds,
and :func:`configure_http_env` makes MLflow's HTTP client give up on a dead server
in seconds instead of minutes.
"""
from __future__ import annotations

import functools
import os
import subprocess
import time
from pathlib import Path

from ..errors import TrackingError

HOME_ENV = "METASTONE_LAB_HOME"

# MLflow HTTP client settings applied (setdefault: the user's values win) so a
# dead server fails in seconds instead of retrying for minutes.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
PROBE_TIMEOUT_S = 5.0


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


def fix_hint(uri: str) -> str:
    """What to do about an unusable store ``uri`` (the tail of every TrackingError)."""
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
            f"{timeout:g} s timeout). {fix_hint(uri)}"
        )
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(
                f"tracking store {uri}: folder {str(folder)!r} does not exist or is not writable; "
                f"create it, set {HOME_ENV} to a writable folder, or set MLFLOW_TRACKING_URI"
            )
