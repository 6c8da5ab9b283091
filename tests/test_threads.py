"""metastone_lab.threads: torch threads sized to the cores a process may use."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from metastone_lab import threads
from metastone_lab.errors import ConfigError


def test_budget_divides_the_usable_cores_among_declared_jobs(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv(threads.JOBS_ENV, raising=False)
    assert threads.usable_cores() == 4 and threads.thread_budget() == 4
    monkeypatch.setenv(threads.JOBS_ENV, "2")
    assert threads.thread_budget() == 2
    monkeypatch.setenv(threads.JOBS_ENV, "8")
    assert threads.thread_budget() == 1            # never 0
    monkeypatch.setenv(threads.JOBS_ENV, "two")
    with pytest.raises(ConfigError, match="METASTONE_LAB_JOBS='two'"):
        threads.thread_budget()


def _child(env_extra: dict, taskset: list[str] = ()) -> str:
    code = ("from metastone_lab import threads; n = threads.configure(); import torch, os; "
            "print(n, torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items()
           if k not in (threads.JOBS_ENV, threads.THREADS_ENV, "OMP_WAIT_POLICY")}
    return subprocess.run([*taskset, sys.executable, "-c", code], env={**env, **env_extra},
                          capture_output=True, text=True, check=True).stdout.split()


def test_configure_in_a_fresh_process():
    cores = threads.usable_cores()
    n, torch_n, policy = _child({})
    assert int(n) == int(torch_n) == cores and policy == "PASSIVE"
    n, torch_n, _ = _child({threads.JOBS_ENV: "2"})
    assert int(n) == int(torch_n) == max(1, cores // 2)
    n, torch_n, _ = _child({threads.THREADS_ENV: "1"})
    assert int(n) == int(torch_n) == 1
    n, _, policy = _child({threads.THREADS_ENV: "off"})
    assert n == "None" and policy == "None"       # left alone
    assert _child({"OMP_WAIT_POLICY": "ACTIVE"})[2] == "ACTIVE"   # the user's value wins


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
                    or subprocess.run(["which", "taskset"], capture_output=True).returncode,
                    reason="needs taskset and 2 cores")
def test_configure_respects_the_cpu_affinity():
    n, torch_n, _ = _child({}, ["taskset", "-c", "0"])
    assert int(n) == int(torch_n) == 1


def test_bad_pinned_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(threads.THREADS_ENV, "many")
    with pytest.raises(ConfigError, match="METASTONE_LAB_THREADS='many'"):
        threads.configure()
