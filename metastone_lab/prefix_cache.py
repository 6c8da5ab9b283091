"""Prompt prefill in fixed blocks, with blocks shared by several prompts computed once.

Few-shot and chat prompts of one study share a long prefix (SmolLM2's chat
template with 2 worked examples: ~159 of ~186 tokens), and the engine prefills
every problem's prompt on its own. :func:`prefill_prompt` prefills a prompt in
**blocks** of ``block`` positions (the last one holds the rest, 1..``block``
positions, so there is always a final forward for the next-token logits). A full
block that is not the last is stored in a :class:`PrefixStore`, keyed by every
token up to its end; a later prompt that starts with the same tokens takes the
block's KV and feature-layer states from the store instead of computing them.

The blocks a prompt is cut into depend on its length and ``block`` alone, never
on which prompts came before: a stored block holds exactly the numbers the
prompt would compute for it, so a problem's samples are the same whether it is
decoded alone, in any batch, or in any shard (the engine's batch-independence).

Backbones whose cache is not a plain ``DynamicCache`` (sliding windows, static or
quantised caches) are still prefilled in blocks, but nothing is stored.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch

from . import kv_cache, sampling


class PrefixStore:
    """An LRU of prefilled prompt blocks for one generate call.

    Each entry: ``kv`` (per layer ``(keys, values)``, each (1, H, block, D)) and
    ``feats`` (block, C) the feature-layer hidden states (None when not scoring),
    keyed by the tuple of prompt tokens up to the block's end. At most
    ``max_mb`` MiB are kept (the least recently used blocks go first).
    """

    def __init__(self, max_mb: float = 256.0):
        self.max_bytes = int(max_mb * 2 ** 20)
        self._blocks: OrderedDict[tuple[int, ...], tuple[list, torch.Tensor | None, int]] = \
            OrderedDict()                  # key -> (kv, feats, bytes)
        self._bytes = 0
        self.hits = 0       # blocks taken from the store
        self.misses = 0     # full blocks computed

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, key: tuple[int, ...]) -> tuple[list, torch.Tensor | None] | None:
        entry = self._blocks.get(key)
        if entry is None:
            return None
        self._blocks.move_to_end(key)
        return entry[0], entry[1]

    def put(self, key: tuple[int, ...], kv: list, feats: torch.Tensor | None) -> None:
        tensors = [t for pair in kv for t in pair] + ([] if feats is None else [feats])
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.max_bytes or key in self._blocks:
            return
        self._blocks[key] = (kv, feats, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._bytes -= self._blocks.popitem(last=False)[1][2]


def block_ends(n: int, block: int) -> list[int]:
    """Where the blocks of an ``n``-token prompt end: every multiple of ``block``
    below ``n``, then ``n`` (``block`` 0: one block, ``[n]``)."""
    if block <= 0:
        return [n]
    return list(range(block, n, block)) + [n]


def _features(model: Any, hidden_states: tuple, layer: int) -> torch.Tensor:
    """``hidden_states[layer]`` (B, L, C), through the ReflectiveModel's checks when it
    is one (a clear ShapeError for a feature layer the backbone does not have)."""
    if hasattr(model, "features_from_hidden") and getattr(model, "feature_layer", None) == layer:
        return model.features_from_hidden(hidden_states)
    return hidden_states[layer]


@torch.inference_mode()
def prefill_prompt(model: Any, prompt: Sequence[int], *, block: int,
                   store: PrefixStore | None, feature_layer: int | None,
                   ) -> tuple[sampling.State, torch.Tensor | None]:
    """Prefill one prompt (token ids, length L) at batch 1 -> (State of 1 row, ``feats``).

    ``feats`` (L, C): the hidden states ``hidden_states[feature_layer]`` of every
    prompt position, or None when ``feature_layer`` is None (no scoring: the
    forwards then skip the hidden states). Blocks of ``block`` positions
    (:func:`block_ends`; 0 = one forward over the whole prompt); full blocks found
    in ``store`` are not recomputed, those computed are added to it.
    """
    ends = block_ends(len(prompt), block)
    hidden = feature_layer is not None
    feats: list[torch.Tensor] = []
    cache, start = None, 0
    # the longest run of stored leading blocks (never the last: it gives the logits)
    reused: list[tuple[list, torch.Tensor | None]] = []
    if store is not None:
        for end in ends[:-1]:
            entry = store.get(tuple(prompt[:end]))
            if entry is None:
                break
            reused.append(entry)
            start = end
    if reused:
        from transformers.cache_utils import DynamicCache

        n_layers = len(reused[0][0])
        cache = DynamicCache(ddp_cache_data=[
            (torch.cat([e[0][li][0] for e in reused], dim=-2),
             torch.cat([e[0][li][1] for e in reused], dim=-2)) for li in range(n_layers)])
        if hidden:
            feats += [e[1] for e in reused]
        store.hits += len(reused)
    out = None
    for end in ends[len(reused):]:
        part, out = sampling.prefill(model, [prompt[start:end]], output_hidden_states=hidden,
                                     cache=cache)
        cache = part.cache
        f = _features(model, out.hidden_states, feature_layer)[0] if hidden else None  # (s, C)
        if hidden:
            feats.append(f)
        if store is not None and end != ends[-1] and end - start == block:
            layers = kv_cache.plain_layers(cache)
            if layers is None:      # not a plain DynamicCache: prefill in blocks, store nothing
                store = None
            else:
                store.put(tuple(prompt[:end]),
                          [(la.keys[:, :, start:end].clone(), la.values[:, :, start:end].clone())
                           for la in layers], None if f is None else f.clone())
                store.misses += 1
        start = end
    state = sampling.State(cache, out.logits[:, -1, :])
    return state, (torch.cat(feats, dim=0) if hidden else None)


__all__ = ["PrefixStore", "block_ends", "prefill_prompt"]
