"""What :func:`metastone_lab.sampling.decode_stream` (continuous batching) takes and
calls: the prompts that join its batch and the hooks it calls (re-exported by
:mod:`metastone_lab.sampling`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from .sampling import Decoded, State


@dataclass
class Joining:
    """A prompt that joins a :func:`decode_stream` batch: its prefilled ``state`` (one
    row, a plain ``DynamicCache``, next-token ``logits`` (1, V)), how many ``rows``
    to sample from it, and the ``generator`` they draw from (None: torch's global RNG)."""

    state: "State"
    rows: int
    generator: torch.Generator | None = None


#: ``on_join(group, slots)``: group ``group`` (the Joining's place in the stream) got
#: the row slots ``slots`` (rows,), row j of the group = slot ``slots[j]``.
OnJoin = Callable[[int, torch.Tensor], None]
#: ``on_sampled(slots, steps, tokens, logits, top_idx)``: the n active rows (slots (n,),
#: each at its own step ``steps`` (n,)) sampled ``tokens`` (n,) from ``logits`` (n, V).
OnSampled = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                      "torch.Tensor | None"], None]
#: ``on_fed(slots, steps, out)``: the forward that fed each row's token of step ``steps``.
OnFed = Callable[[torch.Tensor, torch.Tensor, Any], None]
#: ``on_leave(group, j, slot)``: row j of ``group`` ended and gives its slot back (the
#: callers' per-slot buffers are read now: the slot goes to the next joining row).
OnLeave = Callable[[int, int, int], None]
#: ``on_finish(group, decoded)``: every row of ``group`` has ended.
OnFinish = Callable[[int, "Decoded"], None]


__all__ = ["Joining", "OnJoin", "OnSampled", "OnFed", "OnLeave", "OnFinish"]
