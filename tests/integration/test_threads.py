"""metastone_lab.threads: torch threads sized to the cores a process may use and shared
among the live metastone-lab jobs (real processes)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from metastone_lab import threads
from metastone_lab.errors import ConfigError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METASTONE_LAB_CACHE", str(tmp_path))
    monkeypatch.delenv(threads.JOBS_ENV, raising=False)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    return tmp_path


def test_budget_divides_the_usable_cores_among_jobs(cache, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert threads.usable_cores() == 4 and threads.thread_budget() == 4
    (cache / "jobs").mkdir()
    (cache / "jobs" / str(os.getpid())).write_text("")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (cache / "jobs" / str(sleeper.pid)).write_text("")
        (cache / "jobs" / "999999999").write_text("")   # a dead job: removed, not counted
        assert threads.live_jobs() == 2 and threads.thread_budget() == 2
        assert not (cache / "jobs" / "999999999").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert threads.live_jobs() == 1
    monkeypatch.setenv(threads.JOBS_ENV, "8")
    assert threads.thread_budget() == 1            # declared jobs win; never 0 threads
    monkeypatch.setenv(threads.JOBS_ENV, "two")
    with pytest.raises(ConfigError, match="METASTONE_LAB_JOBS='two'"):
        threads.thread_budget()


CHILD = ("import sys, time; from metastone_lab import threads; n = threads.configure(); "
         "import torch; print(n, torch.get_num_threads(), flush=True); "
         "time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)")


def _env(cache, **extra):
    env = {k: v for k, v in os.environ.items() if k not in (threads.JOBS_ENV, threads.THREADS_ENV)}
    return {**env, "METASTONE_LAB_CACHE": str(cache), **extra}


def _child(cache, prefix=(), **extra) -> list[str]:
    return subprocess.run([*prefix, sys.executable, "-c", CHILD], env=_env(cache, **extra),
                          capture_output=True, text=True, check=True).stdout.split()


def test_configure_in_fresh_processes(cache):
    cores = threads.usable_cores()
    assert _child(cache) == [str(cores), str(cores)]
    assert _child(cache, **{threads.JOBS_ENV: "2"}) == [str(max(1, cores // 2))] * 2
    assert _child(cache, **{threads.THREADS_ENV: "1"}) == ["1", "1"]
    assert _child(cache, **{threads.THREADS_ENV: "off"})[0] == "None"
    assert not [f for f in (cache / "jobs").iterdir()]   # each unregistered at exit


@pytest.mark.skipif(threads.usable_cores() < 2, reason="needs 2 cores")
def test_a_second_live_job_halves_the_threads(cache):
    first = subprocess.Popen([sys.executable, "-c", CHILD, "20"], env=_env(cache),
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().split()[0] == str(threads.usable_cores())
        assert _child(cache) == [str(threads.usable_cores() // 2)] * 2
    finally:
        first.kill()
        first.wait()


@pytest.mark.skipif(threads.usable_cores() < 2
                    or subprocess.run(["which", "taskset"], capture_output=True).returncode,
                    reason="needs taskset and 2 cores")
def test_configure_respects_the_cpu_affinity(cache):
    assert _child(cache, ["taskset", "-c", "0"]) == ["1", "1"]


def test_bad_pinned_value_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setenv(threads.THREADS_ENV, "many")
    with pytest.raises(ConfigError, match="METASTONE_LAB_THREADS='many'"):
        threads.configure()
