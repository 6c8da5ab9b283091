"""How many CPU threads a metastone-lab process uses, so that concurrent studies share
the cores instead of oversubscribing them.

Every compute process (a study kernel, a training run) registers its pid in
``<cache>/jobs/`` and sizes torch's intra-op threads to ``usable cores // live jobs``:
the cores this process may run on (``os.sched_getaffinity``, so ``taskset`` and cgroup
CPU sets count) divided by the metastone-lab jobs alive on the machine, or by
``METASTONE_LAB_JOBS`` when set. :func:`rebalance` re-counts (at most every few seconds;
the sampler and the trainer call it), so a study that started alone gives up its second
thread when another one starts, and takes it back when that one ends.

Measured with ``scripts/bench_concurrency.py`` (2 cores, the tiny backbone, 48 problems x
16 samples; wall time of the whole process incl. start-up): with torch's own choice (2
threads each) one process alone 11.7 s, two at once 45.6 s (ratio 3.92: each one's
spinning OpenMP threads take the cores the other needs); with this module 10.5 s alone,
12.8 s for two at once (ratio 1.23, one thread each). ``OMP_WAIT_POLICY=PASSIVE`` also
fixes the pair (14.2 s) but makes a process alone 2x slower (24.4 s), so it is not set.

``METASTONE_LAB_THREADS=<n>`` pins the count; ``METASTONE_LAB_THREADS=off`` leaves torch's
own choice and registers nothing.
"""
from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

JOBS_ENV = "METASTONE_LAB_JOBS"
THREADS_ENV = "METASTONE_LAB_THREADS"
REBALANCE_EVERY_S = 5.0

_registered: Path | None = None
_last_check = 0.0


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _declared_jobs() -> int | None:
    raw = os.environ.get(JOBS_ENV, "").strip()
    if not raw:
        return None
    try:
        return max(1, int(raw))
    except ValueError:
        from .errors import ConfigError

        raise ConfigError(f"{JOBS_ENV}={raw!r} is not an integer; set it to the number of "
                          f"metastone-lab processes sharing this machine (e.g. 2)") from None


def jobs_dir() -> Path:
    from .backbones.cache import cache_root

    return cache_root() / "jobs"


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists on this machine (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_jobs() -> int:
    """Registered metastone-lab processes still alive (stale entries are removed), >= 1."""
    d = jobs_dir()
    n = 0
    try:
        entries = list(d.iterdir())
    except OSError:
        return 1
    for f in entries:
        if not f.name.isdigit():
            continue
        if pid_alive(int(f.name)):
            n += 1
        else:
            f.unlink(missing_ok=True)
    return max(1, n)


def register() -> None:
    """Register this process in :func:`jobs_dir` (once; removed at exit)."""
    global _registered
    if _registered is not None:
        return
    try:
        d = jobs_dir()
        d.mkdir(parents=True, exist_ok=True)
        f = d / str(os.getpid())
        f.write_text("")
    except OSError:
        return  # an unwritable cache only loses the sharing, never the run
    _registered = f
    atexit.register(lambda: f.unlink(missing_ok=True))


def thread_budget(jobs: int | None = None) -> int:
    """``usable_cores() // jobs`` (at least 1); ``jobs`` defaults to ``$METASTONE_LAB_JOBS``,
    else the live registered jobs."""
    if jobs is None:
        jobs = _declared_jobs() or live_jobs()
    return max(1, usable_cores() // max(1, int(jobs)))


def configure(jobs: int | None = None) -> int | None:
    """Register this process and set torch's thread count (see the module docstring);
    returns it, or None when ``METASTONE_LAB_THREADS=off``."""
    global _last_check
    pinned = os.environ.get(THREADS_ENV, "").strip()
    if pinned.lower() == "off":
        return None
    if pinned:
        try:
            n = max(1, int(pinned))
        except ValueError:
            from .errors import ConfigError

            raise ConfigError(f"{THREADS_ENV}={pinned!r}: give a number of threads or 'off'") from None
    else:
        register()
        n = thread_budget(jobs)
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _last_check = time.monotonic()
    return n


def rebalance() -> int | None:
    """:func:`configure` again if this process configured itself and the last check is
    older than :data:`REBALANCE_EVERY_S` (cheap enough to call per batch)."""
    if _registered is None or time.monotonic() - _last_check < REBALANCE_EVERY_S:
        return None
    return configure()
