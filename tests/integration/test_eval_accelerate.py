"""Scale-out of the held-out evaluation: under ``accelerate launch`` with 2 CPU processes
``evaluate_held_out`` samples each process's block of the problems and gathers the
samples; the merged result equals a single-process run of the same evaluation.

Both runs are the same script (``tests/_eval_worker.py``), one thread per process. The
comparison is EXACT, not within a rounding bound: a process's block is made of whole
engine batches (``held_out._per_batch``), so every problem is decoded in the same batch
as in the single process (same rows, same shapes, same kernels on one thread), drawing
from the same generator (seeded by its global index); the same inputs through the same
float operations give the same bits, and the table is built from equal samples with
the same bootstrap seed.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

from pandas.testing import assert_frame_equal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _launch import accelerate_cli  # noqa: E402
from _accel_worker import make_micro  # noqa: E402
from _eval_worker import WORKLOAD  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "_eval_worker.py"


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", METASTONE_LAB_THREADS="1",
                PYTHONWARNINGS="ignore",
                PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get(
                    "PYTHONPATH", "").split(os.pathsep) if p]))


def _run(cmd: list[str], out: Path, world: int) -> list[dict]:
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    res = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    assert [r["world"] for r in res] == [world] * world
    return res


def _same_samples(got, want, what):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.problem == b.problem, (what, i)          # the original order
        # every field: token ids, step positions and scores, aggregates, signals,
        # correctness and step labels; bit-identical (see the module docstring)
        assert [dataclasses.asdict(t) for t in a.trajectories] == \
            [dataclasses.asdict(t) for t in b.trajectories], (what, i)


def test_two_process_evaluation_equals_single_process(tmp_path):
    micro = make_micro(tmp_path / "micro")
    single = _run([sys.executable, str(WORKER), str(micro), str(tmp_path / "one")],
                  tmp_path / "one", 1)[0]
    # accelerate 1.x: `launch --cpu --num_processes 2` starts ONE process; --multi_gpu
    # spawns 2 torchrun workers, which are gloo CPU ranks on a machine without CUDA
    dp = _run(accelerate_cli() + ["launch", "--multi_gpu", "--num_processes", "2",
                               "--num_machines", "1", "--main_process_port", "0",
                               "--mixed_precision", "no", "--dynamo_backend", "no",
                               str(WORKER), str(micro), str(tmp_path / "two")],
              tmp_path / "two", 2)

    n_test, n_val = WORKLOAD["n_test"], WORKLOAD["n_val"]
    # the single process sampled everything; each rank its block of whole batches
    assert single["sampled"] == [list(range(n_test)), list(range(n_val)), list(range(n_test))]
    assert dp[0]["sampled"] == [[0, 1, 2, 3], [0, 1], [0, 1, 2, 3]]
    assert dp[1]["sampled"] == [[4, 5, 6], [2, 3, 4], [4, 5, 6]]
    # only process 0 logs the table (the second evaluation is log=False)
    assert single["logged"] == dp[0]["logged"] == ["bon_eval.json"] and dp[1]["logged"] == []

    traj = [t for ps in single["inflight"].test for t in ps.trajectories]
    assert {t.correct for t in traj} == {True, False}, "test is vacuous: one class only"
    assert sum(t.n_steps for t in traj) > 2 * len(traj)
    for rank in dp:                    # every process holds the full, merged result
        for name in ("inflight", "rescored"):
            got, want = rank[name], single[name]
            _same_samples(got.test, want.test, f"rank {rank['rank']} {name} test")
            _same_samples(got.val, want.val, f"rank {rank['rank']} {name} val")
            assert_frame_equal(got.table, want.table, check_exact=True)
    assert "step_f1" in set(single["inflight"].table.metric)
    # the PRM's re-scoring really replaced the in-flight scores
    assert traj[0].step_scores != single["rescored"].test[0].trajectories[0].step_scores
