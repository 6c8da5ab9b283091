"""Benchmark: two processes sharing the cores. Prints the wall time of a fixed sampling
workload run alone, then two copies at once, and the ratio (2.0 = fair sharing; the
issue's bar is <= 2.3), for each thread setting.

    python scripts/bench_concurrency.py [--problems 48] [--k 16]

Each copy is a fresh process: tiny default backbone, best-of-k sampling of the first
``--problems`` validation problems (the study's inner loop). Settings compared:
``off`` (METASTONE_LAB_THREADS=off: torch's own choice, one thread per core),
``passive`` (the same with OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead
of spinning) and ``shared`` (the default, metastone_lab.threads: the cores this process
may use divided by the live metastone-lab jobs, re-counted while it runs)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

WORKLOAD = r"""
import sys, time
from metastone_lab import threads
threads.configure()   # what study.prepare_backbone does
import torch
from metastone_lab.backbones import load_backbone
from metastone_lab.generate import GenerateConfig, generate_best_of_n
from metastone_lab.tasks import get_task
model, tok = load_backbone("tiny")
task = get_task("arith")
t0 = time.perf_counter()
generate_best_of_n(model, tok, task.problems("val", int(sys.argv[1])), task,
                   GenerateConfig(k=int(sys.argv[2]), max_new_tokens=64, temperature=1.0, seed=0, score=False))
print(f"{time.perf_counter() - t0:.2f} threads={torch.get_num_threads()}")
"""


def _run(n: int, env: dict, problems: int, k: int) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", WORKLOAD, str(problems), str(k)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(n)]
    outs = [p.communicate()[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return time.perf_counter() - t0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=48)
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "METASTONE_LAB_JOBS")}
    settings = {"off": {"METASTONE_LAB_THREADS": "off"},
                "passive": {"METASTONE_LAB_THREADS": "off", "OMP_WAIT_POLICY": "PASSIVE"},
                "shared": {}}
    print(f"cores usable: {len(os.sched_getaffinity(0))}; workload: {args.problems} problems "
          f"x {args.k} samples")
    _run(1, {**base, **settings["shared"]}, 4, 2)   # warm the backbone cache and imports
    for name, extra in settings.items():
        alone, o1 = _run(1, {**base, **extra}, args.problems, args.k)
        both, o2 = _run(2, {**base, **extra}, args.problems, args.k)
        print(f"{name:8s} alone {alone:6.1f} s ({o1[0]})   two at once {both:6.1f} s ({'; '.join(o2)})"
              f"   ratio {both / alone:.2f}")


if __name__ == "__main__":
    main()
