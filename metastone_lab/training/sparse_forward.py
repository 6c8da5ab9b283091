"""The training forward: one backbone pass, LM logits everywhere, and the SPRM head
evaluated only at the step positions (:class:`SparseHeadForward`, what DDP wraps)."""
from __future__ import annotations

from typing import Any

import torch


class SparseHeadForward(torch.nn.Module):
    """The training forward of a :class:`ReflectiveModel`: one backbone pass, the LM
    logits everywhere, and the SPRM head **only at the step positions** (the mask is
    known before the forward in training). Values equal ``ReflectiveModel.forward``'s
    ``step_logits`` at masked positions (0 elsewhere); it saves the head's cost at the
    other ~90% of positions. This module is what DDP wraps.
    """

    def __init__(self, rm: Any, lookahead: int = 0):
        super().__init__()
        self.rm = rm
        self.lookahead = lookahead   # confidence.lookahead(read_at): a step's span past its read

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                step_mask: torch.Tensor | None = None,
                response_start: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L) ids -> logits (B, L, V), step_logits (B, L) or None without a mask.
        ``response_start`` (B,): where each response begins (the confidence head reads
        the policy's token stats from there on)."""
        out = self.rm.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               output_hidden_states=step_mask is not None)
        if step_mask is None:
            return out.logits, None
        feats = self.rm.features_from_hidden(out.hidden_states)          # (B, L, C)
        picked = self.rm.masked_head_logits(                               # (N,)
            feats, step_mask, logits=out.logits, input_ids=input_ids,
            response_start=0 if response_start is None else response_start,
            lookahead=self.lookahead)
        step_logits = torch.zeros(step_mask.shape, dtype=picked.dtype, device=picked.device)
        step_logits = step_logits.masked_scatter(step_mask, picked)
        return out.logits, step_logits
