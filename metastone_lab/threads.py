"""How many CPU threads a metastone-lab process uses.

Two processes that each start one torch thread per core oversubscribe the machine, and
OpenMP threads that spin while they wait burn the cores the other process needs.
:func:`configure` sizes torch's intra-op threads to the cores this process may really
use (``os.sched_getaffinity``, so a ``taskset`` or cgroup CPU set is respected), divided
by the number of jobs declared in ``METASTONE_LAB_JOBS`` (default 1), and asks OpenMP to
sleep while it waits (``OMP_WAIT_POLICY=PASSIVE``, effective in processes started after
it is set, e.g. notebook kernels; a value the user set wins).

``METASTONE_LAB_THREADS=<n>`` pins the count; ``METASTONE_LAB_THREADS=off`` leaves torch's
own choice (for benchmarks that compare).
"""
from __future__ import annotations

import os

JOBS_ENV = "METASTONE_LAB_JOBS"
THREADS_ENV = "METASTONE_LAB_THREADS"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def thread_budget(jobs: int | None = None) -> int:
    """``usable_cores() // jobs`` (at least 1); ``jobs`` defaults to ``$METASTONE_LAB_JOBS``."""
    if jobs is None:
        raw = os.environ.get(JOBS_ENV, "1").strip() or "1"
        try:
            jobs = int(raw)
        except ValueError:
            from .errors import ConfigError

            raise ConfigError(f"{JOBS_ENV}={raw!r} is not an integer; set it to the number of "
                              f"metastone-lab processes sharing this machine (e.g. 2)") from None
    return max(1, usable_cores() // max(1, int(jobs)))


def configure_env() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless set (or ``METASTONE_LAB_THREADS=off``); no torch
    import. Call it before starting worker processes (the CLI does, so kernels inherit it)."""
    if os.environ.get(THREADS_ENV, "").strip().lower() != "off":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def configure(jobs: int | None = None) -> int | None:
    """Set torch's thread count for this process (see the module docstring); returns it,
    or None when ``METASTONE_LAB_THREADS=off``."""
    pinned = os.environ.get(THREADS_ENV, "").strip()
    if pinned.lower() == "off":
        return None
    configure_env()
    if pinned:
        try:
            n = max(1, int(pinned))
        except ValueError:
            from .errors import ConfigError

            raise ConfigError(f"{THREADS_ENV}={pinned!r}: give a number of threads or 'off'") from None
    else:
        n = thread_budget(jobs)
    import torch

    torch.set_num_threads(n)
    return n
