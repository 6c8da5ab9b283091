"""Shard a list of work items across the processes of ``accelerate launch`` and gather
the results back in the original order on every process.

:func:`run` is the one entry point: it splits each of several item lists into
contiguous blocks (:func:`split`, whole ``group``-sized groups per process, so a
block can keep the batches a single process would form), calls ``work`` with this
process's blocks, gathers every process's results with
``accelerate.utils.gather_object`` and returns the full lists, in item order, on
every process.

Outside a distributed launch (``WORLD_SIZE`` unset or 1) :func:`run` calls ``work``
once on everything and returns its result: nothing distributed is imported or
initialised. Under one, every process must call :func:`run` the same number of
times with the same sizes (it is a collective). An exception in ``work`` on one
process does not leave the others waiting: the results (or the error) of every
process are gathered first, then every process raises (the failing one its own
exception, the others a :class:`ShardError` naming it).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from .errors import MetastoneError


class ShardError(MetastoneError, RuntimeError):
    """Another process failed while this one's shard succeeded."""


#: where a launcher puts the number of processes (torchrun / accelerate launch; MPI):
#: the variables accelerate itself reads
SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def world_size() -> int:
    """Processes of the current launch, from the launcher's environment (:data:`SIZE_ENV`);
    1 outside one. Initialises nothing."""
    size = 1
    for name in SIZE_ENV:
        raw = os.environ.get(name, "").strip()
        if not raw:
            continue
        try:
            size = max(size, int(raw))
        except ValueError:
            from .errors import ConfigError

            raise ConfigError(f"{name}={raw!r} is not an integer; unset it, or launch with "
                              f"accelerate launch / torchrun") from None
    return size


def _state() -> Any:
    """accelerate's PartialState, the one an Accelerator made if there is one; else made
    here (initialising the process group): on CPU ranks (no CUDA) with ``cpu=True``, as
    accelerate otherwise treats a CUDA-less torchrun worker as a single process."""
    import torch
    from accelerate import PartialState

    st = PartialState(cpu=not torch.cuda.is_available())
    if st.num_processes != world_size():
        raise ShardError(f"the launcher started {world_size()} processes but accelerate sees "
                         f"{st.num_processes} ({st.distributed_type}); launch with "
                         f"accelerate launch --multi_gpu (gloo CPU ranks without CUDA)")
    return st


def process() -> tuple[int, int]:
    """``(process_index, num_processes)``; ``(0, 1)`` outside a distributed launch,
    without initialising anything."""
    if world_size() == 1:
        return 0, 1
    st = _state()
    return st.process_index, st.num_processes


def is_main_process() -> bool:
    """True on rank 0 and outside a distributed launch (who logs to the tracker)."""
    return process()[0] == 0


def split(n: int, num_processes: int, process_index: int, group: int = 1) -> range:
    """The contiguous block of ``range(n)`` that process ``process_index`` of
    ``num_processes`` takes: the ``ceil(n / group)`` groups of ``group`` consecutive
    items are dealt out in contiguous runs whose lengths differ by at most one group
    (earlier processes get the shorter runs). The blocks of processes 0..N-1 are
    disjoint, in order, and cover ``range(n)``; a block may be empty."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"split: process_index={process_index} is not in "
                         f"[0, num_processes={num_processes})")
    if group < 1 or n < 0:
        raise ValueError(f"split: need n >= 0 and group >= 1, got n={n}, group={group}")
    groups = -(-n // group)
    lo = process_index * groups // num_processes
    hi = (process_index + 1) * groups // num_processes
    return range(min(n, lo * group), min(n, hi * group))


def run(work: Callable[[list[range]], Sequence[Sequence[Any]]], sizes: Sequence[int],
        groups: Sequence[int] | None = None) -> list[list[Any]]:
    """Shard ``len(sizes)`` item lists of lengths ``sizes`` and return their results.

    ``work(blocks)`` gets one ``range`` of global item indices per list (this
    process's :func:`split` of it, with ``groups[j]`` items per group, default 1)
    and returns one result list per block, element i for item ``blocks[j][i]``.
    Returns ``[results of list 0, results of list 1, ...]``, each of length
    ``sizes[j]`` in item order, on every process. Outside a distributed launch:
    ``work([range(s) for s in sizes])``, unchanged."""
    groups = list(groups) if groups is not None else [1] * len(sizes)
    if len(groups) != len(sizes):
        raise ValueError(f"run: {len(groups)} groups for {len(sizes)} item lists")
    if world_size() == 1:
        return [list(r) for r in _checked(work([range(s) for s in sizes]), sizes)]
    from accelerate.utils import gather_object

    rank, size = process()
    blocks = [split(n, size, rank, g) for n, g in zip(sizes, groups)]
    try:
        mine: Any = ("ok", [list(r) for r in _checked(work(blocks), [len(b) for b in blocks])])
        error = None
    except Exception as e:  # every process must reach the gather, or the others hang
        mine, error = ("error", f"{type(e).__name__}: {e}"), e
    parts = gather_object([(rank, mine)])                      # one entry per process
    if error is not None:
        raise error
    failed = [(r, msg) for r, (kind, msg) in parts if kind == "error"]
    if failed:
        r, msg = failed[0]
        raise ShardError(f"process {r} of {size} failed on its shard ({msg}); "
                         f"see its traceback")
    out: list[list[Any]] = [[None] * n for n in sizes]
    for r, (_, results) in sorted(parts, key=lambda p: p[0]):
        for j, (res, n, g) in enumerate(zip(results, sizes, groups)):
            block = split(n, size, r, g)
            out[j][block.start:block.stop] = res
    return out


def _checked(results: Sequence[Sequence[Any]], lengths: Sequence[int]) -> Sequence[Sequence[Any]]:
    got = [len(r) for r in results]
    if got != list(lengths):
        raise ValueError(f"shard.run: work returned {got} results for blocks of {list(lengths)} "
                         f"items (one result per item expected)")
    return results


__all__ = ["ShardError", "SIZE_ENV", "world_size", "process", "is_main_process", "split", "run"]
