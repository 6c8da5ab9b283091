"""metastone_lab.shard without a launch: the split, the reassembly order (a 2-process
gather simulated in one process), errors, the no-op at world size 1, and the seed
indices that let a shard sample what its problems sample in the full run."""
from __future__ import annotations

import dataclasses
import pickle
import sys
from pathlib import Path

import pytest

from metastone_lab import shard
from metastone_lab.errors import ConfigError


@pytest.mark.parametrize("n,size,group", [(0, 2, 1), (1, 2, 1), (7, 2, 2), (12, 3, 4),
                                          (10, 4, 3), (5, 8, 1), (9, 2, 1)])
def test_split_is_an_ordered_partition_of_whole_groups(n, size, group):
    blocks = [shard.split(n, size, r, group) for r in range(size)]
    assert [i for b in blocks for i in b] == list(range(n))
    for b in blocks:
        assert b.start % group == 0 and (b.stop % group == 0 or b.stop == n)
    groups = [-(-len(b) // group) for b in blocks]
    assert max(groups) - min(groups) <= 1


def test_split_examples_and_bad_arguments():
    assert [shard.split(7, 2, r, 2) for r in (0, 1)] == [range(0, 4), range(4, 7)]
    assert [shard.split(5, 2, r, 2) for r in (0, 1)] == [range(0, 2), range(2, 5)]
    assert [shard.split(1, 2, r) for r in (0, 1)] == [range(0, 0), range(0, 1)]
    for bad in [dict(num_processes=2, process_index=2), dict(num_processes=0, process_index=0),
                dict(num_processes=2, process_index=0, group=0)]:
        with pytest.raises(ValueError, match="split"):
            shard.split(4, **bad)


def test_world_size_one_is_a_plain_call(monkeypatch):
    for name in shard.SIZE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "accelerate", None)   # importing it would fail
    calls = []

    def work(blocks):
        calls.append(blocks)
        return [[f"a{i}" for i in blocks[0]], [f"b{i}" for i in blocks[1]]]

    assert shard.run(work, [3, 0]) == [["a0", "a1", "a2"], []]
    assert calls == [[range(3), range(0)]]
    assert shard.process() == (0, 1) and shard.is_main_process()
    with pytest.raises(ValueError, match=r"work returned \[1\] results for blocks of \[2\]"):
        shard.run(lambda blocks: [["x"]], [2])
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        shard.world_size()


def _two_processes(monkeypatch, rank: int, other_payload):
    """Process ``rank`` of 2: gather_object returns this process's entry and the other's
    (``other_payload(other_rank)``), in rank order, as all_gather_object does."""
    import accelerate.utils

    monkeypatch.setattr(shard, "world_size", lambda: 2)
    monkeypatch.setattr(shard, "process", lambda: (rank, 2))

    def gather(obj):
        (r, mine), = obj
        pickle.dumps(mine)            # what travels must pickle
        entries = {r: mine, 1 - r: other_payload(1 - r)}
        return [(q, entries[q]) for q in (0, 1)]

    monkeypatch.setattr(accelerate.utils, "gather_object", gather)


def _work(blocks):
    return [[("t", i) for i in blocks[0]], [("v", i) for i in blocks[1]]]


@pytest.mark.parametrize("rank", [0, 1])
def test_results_come_back_in_item_order_on_every_process(monkeypatch, rank):
    sizes, groups = [7, 5], [2, 1]

    def other(r):
        return ("ok", _work([shard.split(n, 2, r, g) for n, g in zip(sizes, groups)]))

    _two_processes(monkeypatch, rank, other)
    seen = []
    out = shard.run(lambda b: seen.append(b) or _work(b), sizes, groups)
    assert out == [[("t", i) for i in range(7)], [("v", i) for i in range(5)]]
    assert seen == [[shard.split(7, 2, rank, 2), shard.split(5, 2, rank, 1)]]


def test_a_failure_on_one_process_raises_on_every_process(monkeypatch):
    _two_processes(monkeypatch, 0, lambda r: ("error", "ShapeError: problem a3 too long"))
    with pytest.raises(shard.ShardError, match="process 1 of 2 failed.*ShapeError: problem a3"):
        shard.run(_work, [4, 0])

    def boom(blocks):
        raise KeyError("mine")

    _two_processes(monkeypatch, 1, lambda r: ("ok", _work([shard.split(4, 2, r), range(0)])))
    with pytest.raises(KeyError, match="mine"):      # its own exception, after the gather
        shard.run(boom, [4, 0])


# --------------------------------------------------------- seeds of a shard's problems
def test_a_shard_samples_what_its_problems_sample_in_the_full_run():
    """Problems [2, 3] of five, sampled alone with their global indices, get exactly the
    trajectories they get in the full run: the same generators (seed * 1_000_003 + global
    index) on the same batch (fixed batches, max_batch_rows = 2k: batches [0, 1], [2, 3],
    [4]) through the same kernels, hence bit-identical. Their local indices
    (0, 1) give other samples. Trajectories and task Problems pickle (what a gather sends)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from test_generate import FakeTask, make_model, make_tokenizer

    from metastone_lab.generate import GenerateConfig, generate_best_of_n
    from metastone_lab.tasks import get_task

    tok = make_tokenizer()
    model = make_model(tok)
    problems = get_task("arith", n_train=0, n_val=0, n_test=5, n_ood=0).problems("test", 5)
    assert pickle.loads(pickle.dumps(problems)) == problems
    cfg = GenerateConfig(k=4, max_new_tokens=10, temperature=1.0, seed=2, max_batch_rows=8,
                         continuous_batching=False)
    full = generate_best_of_n(model, tok, problems, FakeTask(), cfg)
    part = generate_best_of_n(model, tok, problems[2:4], FakeTask(), cfg, indices=[2, 3])
    local = generate_best_of_n(model, tok, problems[2:4], FakeTask(), cfg)
    want = [[dataclasses.asdict(t) for t in ps.trajectories] for ps in full[2:4]]
    assert [[dataclasses.asdict(t) for t in ps.trajectories] for ps in part] == want
    assert sum(t["n_steps"] for ts in want for t in ts) > 0 and all(
        t["token_logprobs"] for ts in want for t in ts)
    assert [ps.problem for ps in part] == problems[2:4]
    assert [[t.token_ids for t in ps.trajectories] for ps in local] != \
        [[t.token_ids for t in ps.trajectories] for ps in part]
    back = pickle.loads(pickle.dumps(part))
    assert [[dataclasses.asdict(t) for t in ps.trajectories] for ps in back] == want
    with pytest.raises(ConfigError, match="1 indices for 2 problems"):
        generate_best_of_n(model, tok, problems[:2], FakeTask(), cfg, indices=[0])


def test_a_continuous_shard_samples_its_problems_tokens_in_the_full_run():
    """With continuous batching (the default) a problem's batch-mates depend on the other
    problems' lengths, so only its tokens, steps and labels are promised equal between
    a shard and the full run; its scores agree within float rounding."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from test_generate import FakeTask, make_model, make_tokenizer

    from metastone_lab.generate import GenerateConfig, generate_best_of_n
    from metastone_lab.tasks import get_task

    tok = make_tokenizer()
    model = make_model(tok)
    problems = get_task("arith", n_train=0, n_val=0, n_test=5, n_ood=0).problems("test", 5)
    cfg = GenerateConfig(k=4, max_new_tokens=10, temperature=1.0, seed=2, max_batch_rows=8)
    assert cfg.continuous_batching
    full = generate_best_of_n(model, tok, problems, FakeTask(), cfg)
    part = generate_best_of_n(model, tok, problems[2:4], FakeTask(), cfg, indices=[2, 3])
    n_steps = 0
    for a, b in zip(part, full[2:4]):
        assert [t.token_ids for t in a.trajectories] == [t.token_ids for t in b.trajectories]
        for t, u in zip(a.trajectories, b.trajectories):
            assert (t.step_positions, t.correct) == (u.step_positions, u.correct)
            assert t.step_scores == pytest.approx(u.step_scores, abs=1e-4)
            assert t.token_logprobs == pytest.approx(u.token_logprobs, abs=1e-4)
            n_steps += t.n_steps
    assert n_steps > 0
