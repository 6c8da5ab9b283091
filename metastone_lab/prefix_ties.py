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


class PrefixTies:
    """Which rows of one problem's samples share which prefix.

    ``ids`` (R, L): right-padded token ids of the samples (prompt included); equal
    padding counts as equal, which is harmless: a value in a padding column is padding in
    both rows. Built once per batch of samples (~0.1-0.3 ms for 32 x 100 on one core);
    :meth:`sources` then answers for any look-ahead.
    """

    def __init__(self, ids: torch.Tensor) -> None:
        R, L = ids.shape
        self.shape = (R, L)
        # columns every row shares (the prompt): no pair differs there
        lead = int((ids == ids[:1]).all(0).long().cumprod(0).sum())
        tail = ids[:, lead:].to(torch.int32)
        differs = tail[:, None, :] != tail[None, :, :]                  # (R, R, L - lead)
        if differs.shape[-1]:
            any_diff, at = differs.max(-1)                              # first True (or 0)
            first = torch.where(any_diff, at.long() + lead, L)          # (R, R) first diff
        else:
            first = torch.full((R, R), L, dtype=torch.long, device=ids.device)
        # h[r, s] = max over s' <= s of first[s', r], nondecreasing in s: the lowest s
        # that shares a prefix of length m with row r is the number of s with h[r, s] < m
        self._h = first.T.cummax(dim=1).values.contiguous()             # (R, S)

    def sources(self, through: int = 0) -> torch.Tensor:
        """(R, L) long: for row ``r`` and column ``j`` the lowest row ``s`` with
        ``ids[s, :j + 1 + through] == ids[r, :j + 1 + through]`` (``s <= r``; ``s == r``
        when no earlier row shares it). ``through``: how many tokens after column ``j``
        the value there depends on (a head read before the step token depends on it);
        at the last columns the prefix is the whole row."""
        R, L = self.shape
        cols = (torch.arange(L, device=self._h.device) + (1 + int(through))).clamp(max=L)
        return torch.searchsorted(self._h, cols.expand(R, L).contiguous())   # (R, L)


def prefix_sources(ids: torch.Tensor, through: int = 0) -> torch.Tensor:
    """:meth:`PrefixTies.sources` of ``ids`` (R, L), for one look-ahead."""
    return PrefixTies(ids).sources(through)


def share_prefix_values(values: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``values`` (R, L) with ``values[r, j]`` replaced by ``values[src[r, j], j]``
    (``src`` from :func:`prefix_sources`). NaN entries stay where the source has NaN."""
    return values.gather(0, src.to(values.device))


__all__ = ["PrefixTies", "prefix_sources", "share_prefix_values"]
