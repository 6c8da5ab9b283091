"""Make values that exact arithmetic makes equal also equal in floating point.

A causal model's hidden state, next-token logits and head score at column ``j`` of a
sequence depend only on its tokens ``0..j``. So two samples of one problem that share a
prefix have, in exact arithmetic, the same token statistics and head logits over that
prefix. In float32 they need not: the rows sit at other places of a batched matmul, the
batch shrinks as rows finish, and the kernel's blocking depends on the thread count.
The differences are in the last bits, but they decide exact ties. Measured on the
quickstart (issue 16 §8): DeepConf's lowest group confidence of two samples is often the
same window of a shared opening, so ``deepconf@32`` picked another sample with 1 torch
thread than with 2 (0.135 vs 0.125) although every sampled token was identical.

:func:`share_prefix_values` copies, column by column, the value of the lowest-index row
that shares the prefix to every other row that shares it. Ties that exact arithmetic
makes are then exact ties, and the selectors' documented rule (lowest index wins) breaks
them the same way on every machine, thread count and batch composition.
"""
from __future__ import annotations

import torch


def prefix_sources(ids: torch.Tensor, through: int = 0) -> torch.Tensor:
    """(R, L) long: for row ``r`` and column ``j`` the lowest row index ``s`` with
    ``ids[s, :j + 1 + through] == ids[r, :j + 1 + through]`` (``s <= r``; ``s == r`` for a
    prefix no earlier row shares). ``ids`` (R, L): right-padded token ids of one
    problem's samples; equal padding counts as equal, which is harmless: a value in a
    padding column is padding in both rows. ``through``: how many tokens after column
    ``j`` the value there depends on (a head read before the step token depends on it).
    Cost O(R^2 L) booleans (32 x 32 x 100 = 0.1 M: microseconds).
    """
    R, L = ids.shape
    differs = ids[:, None, :] != ids[None, :, :]                       # (R, R, L)
    # first column where rows s and r differ (L if never)
    first = torch.where(differs.any(-1), differs.int().argmax(-1),
                        torch.full((R, R), L, dtype=torch.long, device=ids.device))  # (R, R)
    # prefix length that decides column j (the whole row at the last columns)
    cols = (torch.arange(L, device=ids.device) + (1 + int(through))).clamp(max=L)   # (L,)
    shares = first[:, :, None] >= cols[None, None, :]                  # (S, R, L)
    # the first s that shares the prefix (s == r always does: first[r, r] == L)
    return shares.int().argmax(0)                                       # (R, L)


def share_prefix_values(values: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``values`` (R, L) with ``values[r, j]`` replaced by ``values[src[r, j], j]``
    (``src`` from :func:`prefix_sources`). NaN entries stay where the source has NaN."""
    return values.gather(0, src.to(values.device))


__all__ = ["prefix_sources", "share_prefix_values"]
