"""A KV cache with room reserved for the tokens still to be decoded.

transformers' ``DynamicLayer`` grows by ``torch.cat`` on every forward: each
decode step copies the whole cache of every layer once more. At the batched
engine's shapes this dominates decoding (SmolLM2-135M, 128 rows x ~230
positions: ``aten::cat`` took 37% of the profiled time, more than the attention
and MLP matmuls' share of it after them). :func:`reserve` swaps the layers of a
``DynamicCache`` for :class:`ReservedLayer` s, which allocate
``(B, H, capacity, D)`` once and write each new position in place; the model
sees ``keys`` / ``values`` as views ``[:, :, :length]``, exactly the tensors a
``DynamicLayer`` would hold, so attention computes the same numbers.

Used by :func:`metastone_lab.sampling.decode` (:func:`reserve`) and
:func:`metastone_lab.sampling.merge_states` (which writes the joined prompts straight
into reserved buffers, :meth:`ReservedLayer.from_buffers`); nothing else changes for
callers: the cache is still a ``DynamicCache``, and dropping finished rows
(``batch_select_indices``, an in-place move: :func:`compact_rows`) keeps the reserve.

Continuous batching (:func:`metastone_lab.sampling.decode_stream`) uses
:class:`RingLayer` s instead: a fixed number of columns, reused as rows end and
waiting prompts take their place, under a per-row mask.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys / values live in buffers ``(B, H, capacity, D)``.

    ``keys`` / ``values`` are always the views ``buffer[:, :, :length]``; ``update``
    copies the new ``(B, H, s, D)`` positions in place (doubling the buffer if it is
    ever full, so a wrong reserve costs speed, never correctness).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        n = int(keys.shape[-2])
        k_buf, v_buf = _alloc(keys, max(int(capacity), n)), _alloc(values, max(int(capacity), n))
        k_buf[:, :, :n] = keys
        v_buf[:, :, :n] = values
        self._attach(k_buf, v_buf, n)

    @classmethod
    def from_buffers(cls, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int) -> "ReservedLayer":
        """A layer over buffers ``(B, H, capacity, D)`` already holding ``length``
        positions (no copy; :func:`metastone_lab.sampling.merge_states` writes them)."""
        layer = cls.__new__(cls)
        DynamicLayer.__init__(layer)
        layer._attach(k_buf, v_buf, length)
        return layer

    def _attach(self, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int) -> None:
        self._k, self._v, self._n = k_buf, v_buf, int(length)
        self.device = k_buf.device
        self.is_initialized = True
        self._views()

    @property
    def capacity(self) -> int:
        return int(self._k.shape[-2])

    def _views(self) -> None:
        self.keys = self._k[:, :, :self._n]
        self.values = self._v[:, :, :self._n]

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self.capacity)
        k, v = _alloc(self._k, cap), _alloc(self._v, cap)
        k[:, :, :self._n] = self.keys
        v[:, :, :self._n] = self.values
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(key_states.shape[-2])
        if self._n + s > self.capacity:
            self._grow(self._n + s)
        self._k[:, :, self._n:self._n + s] = key_states
        self._v[:, :, self._n:self._n + s] = value_states
        self._n += s
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (1-D). Increasing indices (finished rows leaving the
        batch) are moved down **in place** (:func:`compact_rows`); a fresh buffer per
        call is what ``index_select`` costs, and its page faults made it 10-20x slower
        than the copy itself (2.5 s vs 0.12 s for 60 buffers of 128 x 3 x 250 x 64)."""
        idx = indices.tolist()
        if all(b > a for a, b in zip(idx, idx[1:])) and (not idx or idx[0] >= 0):
            self._k = compact_rows(self._k, idx)
            self._v = compact_rows(self._v, idx)
        else:
            self._k = self._k.index_select(0, indices)
            self._v = self._v.index_select(0, indices)
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k = self._k.repeat_interleave(repeats, dim=0)
        self._v = self._v.repeat_interleave(repeats, dim=0)
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got "
                             f"{tokens_to_remove}")
        self._n = max(0, self._n + int(tokens_to_remove))
        self._views()

    def reset(self) -> None:
        self._n = 0
        self._views()


def compact_rows(buf: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """``buf[keep]`` for strictly increasing ``keep``, written in place into the first
    ``len(keep)`` rows of ``buf`` (B, ...); returns that view. Row ``keep[j] >= j`` moves
    to ``j`` in increasing ``j``, so no row is overwritten before it is read; rows that
    shift by ``s`` are copied in chunks of at most ``s`` rows (source and destination
    never overlap)."""
    j, m = 0, len(keep)
    while j < m:
        s = keep[j] - j
        if s == 0:
            j += 1
            continue
        r = 1
        while j + r < m and keep[j + r] - (j + r) == s and r < s:
            r += 1
        buf[j:j + r].copy_(buf[j + s:j + s + r])
        j += r
    return buf[:m]


def plain_layers(cache: Any) -> list | None:
    """The layers of ``cache`` when it is a plain ``DynamicCache`` (every layer exactly a
    ``DynamicLayer``, keys / values (B, H, S, D)); None for any other cache (sliding
    windows, static, quantised, reserved, legacy tuples, empty)."""
    layers = list(getattr(cache, "layers", None) or [])
    if not layers or any(type(la) is not DynamicLayer for la in layers):
        return None
    return layers


def _alloc(like: torch.Tensor, capacity: int) -> torch.Tensor:
    """An uninitialised ``(B, H, capacity, D)`` buffer of ``like``'s dtype and device."""
    B, H, _, D = like.shape
    return like.new_empty(B, H, capacity, D)


def reserve(cache: Any, extra_tokens: int) -> Any:
    """Swap the plain ``DynamicLayer`` s of ``cache`` (a ``DynamicCache``) for
    :class:`ReservedLayer` s with room for ``extra_tokens`` more positions, in place;
    returns ``cache``. Caches of other kinds (sliding windows, static, quantised,
    legacy tuples) and uninitialised layers are left as they are."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            n = int(layer.keys.shape[-2])
            layers[i] = ReservedLayer(layer.keys, layer.values, n + int(extra_tokens))
        elif isinstance(layer, ReservedLayer) and layer.capacity < layer._n + extra_tokens:
            layer._grow(layer._n + int(extra_tokens))
    return cache


class Ring:
    """The write state shared by the layers of one ring cache: ``rows`` active rows,
    each writing its next position at column ``col`` of a ``width``-column buffer."""

    def __init__(self, width: int):
        self.width, self.rows, self.col = int(width), 0, 0

    def advance(self) -> None:
        self.col = (self.col + 1) % self.width


class RingLayer(DynamicLayer):
    """A cache layer of fixed width for continuous batching
    (:func:`metastone_lab.sampling.decode_stream`).

    Buffers ``(capacity_rows, H, width, D)``, zero-filled; the first ``ring.rows``
    rows are the batch. Every forward writes its one new position of every row at
    column ``ring.col`` and attends over all ``width`` columns: which columns a row
    may see is the caller's 4-D additive attention mask (one row per batch row),
    not the column order. That is exact because rotary positions are applied before
    caching (a key keeps its position wherever it sits) and attention is a sum over
    keys. So a row that leaves frees its buffer row for a waiting prompt, whose
    prefilled keys are written into any columns its own decoding will not reach.
    """

    def __init__(self, ring: Ring, k_buf: torch.Tensor, v_buf: torch.Tensor):
        super().__init__()
        self.ring, self._k, self._v = ring, k_buf, v_buf
        self.device = k_buf.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self._k[:self.ring.rows]
        self.values = self._v[:self.ring.rows]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        n, c = self.ring.rows, self.ring.col
        if key_states.shape[0] != n or key_states.shape[-2] != 1:
            raise ValueError(f"RingLayer.update takes one position of each of the {n} rows, "
                             f"got keys {tuple(key_states.shape)}")
        self._k[:n, :, c:c + 1] = key_states
        self._v[:n, :, c:c + 1] = value_states
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.ring.width

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.ring.width, 0

    def write_prompt(self, row: int, rows: int, cols: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor) -> None:
        """Rows ``row .. row+rows-1`` take one prompt's keys / values (1, H, P, D) at
        the buffer columns ``cols`` (P,)."""
        self._k[row:row + rows, :, cols] = keys
        self._v[row:row + rows, :, cols] = values

    def compact(self, keep: list[int]) -> None:
        """Keep the batch rows ``keep`` (strictly increasing), moved down in place."""
        compact_rows(self._k, keep)
        compact_rows(self._v, keep)


def ring_template(cache: Any, width: int) -> list | None:
    """The layers of ``cache`` (a prefilled ``DynamicCache``) when a ring of ``width``
    columns can take its place: plain ``DynamicLayer`` s, or sliding-window layers whose
    window is at least ``width`` (a row then never sees more positions than its window,
    so full attention over its own columns is what the window allows). None otherwise
    (narrower windows, static, quantised or linear-attention caches)."""
    layers = list(getattr(cache, "layers", None) or [])
    ok = layers and all(type(la) is DynamicLayer or (
        type(la) is DynamicSlidingWindowLayer and int(la.sliding_window) >= int(width))
        for la in layers)
    return layers if ok and all(la.is_initialized and la.keys.dim() == 4 for la in layers) \
        else None


def ring_layers(template: list, ring: Ring, capacity_rows: int) -> list[RingLayer]:
    """Zero-filled :class:`RingLayer` s of ``capacity_rows`` rows and ``ring.width``
    columns, one per layer of ``template`` (plain ``DynamicLayer`` s, keys / values
    (B, H, S, D)), of their heads, head size, dtype and device."""
    rings = []
    for la in template:
        _, H, _, D = la.keys.shape
        k = la.keys.new_zeros((int(capacity_rows), H, ring.width, D))
        v = la.values.new_zeros((int(capacity_rows), H, ring.width, la.values.shape[-1]))
        rings.append(RingLayer(ring, k, v))
    return rings


__all__ = ["ReservedLayer", "Ring", "RingLayer", "compact_rows", "plain_layers", "reserve",
           "ring_layers", "ring_template"]
