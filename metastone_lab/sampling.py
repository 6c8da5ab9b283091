"""The sampling loops: KV-cached temperature / top-p decoding of a batch of rows.

Every caller samples through this module, in one of two loops that share the
draws (:mod:`metastone_lab.next_token`), the EOS rule and the RNG policy:

* :func:`decode`, a fixed set of rows: the tiny backbone's pass@k right after its
  build (``backbones.build.evaluate``, via :func:`sample`) and the GRPO rollouts
  (``training.rollout.rollout``, via :func:`sample`);
* :func:`decode_stream`, continuous batching: best-of-N with in-flight SPRM scoring
  and the probe (the batched engine, ``engine.decode_stream``, which captures head
  scores, features and token statistics through its ``on_sampled`` / ``on_fed``
  hooks); rows that end make room for waiting prompts, over a ring cache
  (:class:`metastone_lab.kv_cache.RingLayer`).

The loop is nanoGPT's ``GPT.generate`` with a KV cache::

    state = prefill(backbone, prompts)           # one forward over the prompts
    for t in range(max_new_tokens):
        token = sample_next(state.logits)        # temperature / top-p
        stop the rows that sampled an EOS id; drop them from the cache
        state = one forward of the new tokens with the cache

Conventions, shared by every caller:

* **Prompt encoding**: :func:`encode_prompt` (the tokenizer's special tokens
  added, so a Llama-family BOS is always there).
* **RNG**: draws come from the ``generator`` the caller passes, in row order at
  every step; ``None`` = torch's global RNG (the trainer's rollouts, whose
  checkpoints save that RNG). Rows of several problems in one batch (the batched
  best-of-N engine) pass ``groups`` (the problem of each row, contiguous) and one
  generator per group: each step draws once per group over that group's
  unfinished rows, so a group's samples do not depend on the other groups.
* **EOS**: :func:`eos_ids` (the tokenizer's EOS plus the model's
  ``generation_config.eos_token_id``). A row ends at its first EOS id, which is
  kept as its last token; finished rows leave the batch (``batch_select_indices``)
  and cost nothing more.
* **KV cache**: :func:`decode` gives a ``DynamicCache`` room for every new position
  up front (:func:`metastone_lab.kv_cache.reserve`), written in place instead of
  grown by ``torch.cat`` each step; :func:`decode_stream` writes a fixed-width ring. ``ignore_eos`` (benchmarks) always decodes
  ``max_new_tokens``.
* **Padding**: prompts of one length need none; prompts of different lengths are
  left-padded, with an attention mask and explicit positions (:func:`pad_left`).
  States prefilled apart (one per problem) are joined by :func:`merge_states`,
  which left-pads their KV caches the same way. Finished rows are filled with
  ``pad_id`` after their end.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from . import kv_cache
from .decode_attention import decode_attention, param_dtype
from .errors import ConfigError
from .stream_hooks import (Joining, OnFed, OnFinish, OnJoin, OnLeave,  # noqa: F401
                           OnSampled)
from .next_token import (draw, draw_by_group, pick_by_cdf, sample_next,  # noqa: F401
                         sample_next_with_top)

#: ``on_token(t, rows, tokens, logits, top_idx)`` after step ``t`` sampled ``tokens`` (n,)
#: for the batch rows ``rows`` (n,) from ``logits`` (n, V); ``top_idx`` (n, K) or None:
#: the most likely ids that top-p sorted (see :func:`sample_next_with_top`).
OnToken = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]
#: ``on_forward(t, rows, out)`` after the forward that fed step ``t``'s tokens of ``rows``.
OnForward = Callable[[int, torch.Tensor, Any], None]


# ---------------------------------------------------------------- conventions
def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's token ids exactly as every sampler feeds them (special tokens added)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def base_model(model: Any) -> Any:
    """The causal LM under a :class:`~metastone_lab.sprm.ReflectiveModel` (``.backbone``)."""
    return getattr(model, "backbone", model)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end a row: the tokenizer's EOS and the model's generation EOS."""
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(base_model(model), "generation_config", None), "eos_token_id",
                        None)):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return ids


def pad_id_for(tokenizer: Any, eos: set[int]) -> int:
    """The tokenizer's pad id, else the smallest EOS id (never read: masked or cut)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = min(eos) if eos else 0
    return int(pad)


def device_of(model: Any) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def cache_kwarg(model: Any) -> str:
    """Name of the KV-cache argument: ``cache`` (transformers >= 5.2x) or the older
    ``past_key_values`` (inspected on the base model, through a peft wrapper)."""
    model = base_model(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a model output (``cache`` or legacy ``past_key_values``)."""
    if isinstance(out, dict) and "cache" in out.keys():
        return out["cache"]
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device: Any = None):
    """Right-pad token id lists into a batch: ``(ids, attention_mask, lens)`` with
    ``ids`` and ``attention_mask`` (B, L) long (1 on real tokens), ``lens`` (B,)."""
    lens = torch.tensor([len(s) for s in sequences], device=device)
    L = max(int(lens.max()), 1) if len(sequences) else 1
    ids = torch.full((len(sequences), L), pad_id, dtype=torch.long, device=device)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    attn = (torch.arange(L, device=device)[None, :] < lens[:, None]).long()
    return ids, attn, lens


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int, device: Any = None):
    """Left-pad token id lists: ``(ids, attention_mask, positions)``, each (B, P) long;
    ``positions`` count real tokens from 0 (0 on the padding, which is masked)."""
    P = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), P), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(sequences), P), dtype=torch.long, device=device)
    for i, s in enumerate(sequences):
        ids[i, P - len(s):] = torch.tensor(list(s), dtype=torch.long)
        attn[i, P - len(s):] = 1
    return ids, attn, (attn.cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------- the loop
@dataclass
class State:
    """Where decoding of R rows starts: ``cache`` (the KV cache of the prompts),
    ``logits`` (R, V) the next-token logits after the last prompt token, and for
    left-padded prompts ``attention_mask`` (R, P) and ``position`` (R, 1), the
    position of the last prompt token (both None when the rows share one length)."""

    cache: Any
    logits: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position: torch.Tensor | None = None

    @torch.inference_mode()
    def repeat(self, n: int) -> "State":
        """A copy with every row repeated ``n`` times (row i -> rows i*n .. i*n+n-1)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(n)
        rep = (lambda x: None if x is None else x.repeat_interleave(n, dim=0))
        return State(cache, rep(self.logits), rep(self.attention_mask), rep(self.position))


def _dynamic_layers(cache: Any) -> list:
    """The layers of a plain ``DynamicCache`` (each with ``keys`` / ``values`` (B, H, S, D))."""
    layers = kv_cache.plain_layers(cache)
    if layers is None:
        layers = list(getattr(cache, "layers", None) or [])
        raise TypeError(f"merge_states joins plain DynamicCache layers only, got "
                        f"{sorted({type(la).__name__ for la in layers}) or type(cache).__name__}")
    return layers


@torch.inference_mode()
def merge_states(states: Sequence[State], *, repeats: int = 1, reserve_tokens: int = 0) -> State:
    """Join the rows of ``states`` (each prefilled apart, rows of one prompt length
    P_i, no mask), each row repeated ``repeats`` times (row j -> ``repeats``
    consecutive rows), into one :class:`State` of R = repeats * sum R_i rows, in order.

    Same lengths: the caches are stacked as they are (no mask). Otherwise each
    cache is left-padded to P = max P_i with zeros that the ``attention_mask``
    (R, P) masks out, and ``position`` (R, 1) = P_i - 1 continues each row's own
    positions (rotary is applied before caching, so cached keys keep theirs).

    The joined cache is written once, straight into :class:`~metastone_lab.kv_cache.ReservedLayer`
    buffers (R, H, P + ``reserve_tokens``, D): no per-state repeat, no concatenation,
    no second copy when :func:`decode` reserves its room (at 16 prompts x k 8 of
    SmolLM2 those copies were 16% of a best-of-N batch). The states are consumed
    (the first one's cache object carries the result). One state of a cache that is
    not a plain ``DynamicCache`` is repeated as it is (``State.repeat``).
    """
    if len(states) == 1 and repeats == 1 and reserve_tokens == 0:
        return states[0]
    if any(s.attention_mask is not None for s in states):
        raise ValueError("merge_states joins unpadded states (one prompt length each)")
    if len(states) == 1:
        try:
            _dynamic_layers(states[0].cache)
        except TypeError:                          # sliding-window, static, ... caches
            return states[0].repeat(repeats) if repeats > 1 else states[0]
    layers = [_dynamic_layers(s.cache) for s in states]
    lens = [int(la[0].keys.shape[-2]) for la in layers]
    rows = [int(s.logits.shape[0]) * repeats for s in states]
    P, R = max(lens), sum(rows)
    for li in range(len(layers[0])):
        bufs = []
        for name in ("keys", "values"):
            x0 = getattr(layers[0][li], name)
            buf = x0.new_empty(R, x0.shape[1], P + int(reserve_tokens), x0.shape[-1])
            a = 0
            for s_layers, n, r in zip(layers, lens, rows):
                x = getattr(s_layers[li], name)                          # (R_i, H, P_i, D)
                if n < P:
                    buf[a:a + r, :, :P - n].zero_()
                buf[a:a + r, :, P - n:P].unflatten(0, (x.shape[0], repeats)).copy_(x[:, None])
                a += r
            bufs.append(buf)
        layers[0][li] = kv_cache.ReservedLayer.from_buffers(bufs[0], bufs[1], P)
    cache = states[0].cache
    cache.layers[:] = layers[0]
    logits = torch.cat([s.logits for s in states], dim=0).repeat_interleave(repeats, dim=0)
    if len(set(lens)) == 1:
        return State(cache, logits)                                      # (R, V)
    dev = logits.device
    attn = torch.cat([(torch.arange(P, device=dev) >= P - n).long()[None].expand(r, -1)
                      for r, n in zip(rows, lens)], dim=0)               # (R, P)
    pos = torch.cat([torch.full((r, 1), n - 1, dtype=torch.long, device=dev)
                     for r, n in zip(rows, lens)], dim=0)                # (R, 1)
    return State(cache, logits, attn, pos)


@dataclass
class Decoded:
    """The result of :func:`decode` for R rows: ``tokens`` (R, T) the new ids (``pad_id``
    after a row's end), ``lengths`` (R,) new tokens per row (its EOS included),
    ``hit_max`` (R,) True for rows that reached ``max_new_tokens`` without an EOS."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    hit_max: torch.Tensor

    def rows(self) -> list[list[int]]:
        """The new ids of each row as lists (EOS kept when produced)."""
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist())]


@torch.inference_mode()
def prefill(model: Any, prompts: Sequence[Sequence[int]], *, pad_id: int = 0,
            output_hidden_states: bool = False, cache: Any = None) -> tuple[State, Any]:
    """One forward over ``prompts`` (token id lists) -> (:class:`State`, the output).

    Prompts of one length are stacked as they are (no mask: the cache's own
    positions); otherwise they are left-padded (:func:`pad_left`). Only the last
    position's logits are computed (``logits_to_keep=1``). The output is returned
    for callers that read the prompt's hidden states (``output_hidden_states``).

    ``cache``: continue an earlier prefill of the same rows (the prompts are then the
    next positions, all of one length, and the cache is updated in place); the
    block prefill of :func:`metastone_lab.prefix_cache.prefill_prompt` uses it.
    """
    backbone = base_model(model)
    device = device_of(backbone)
    if len({len(p) for p in prompts}) == 1:
        ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)
        kw = {} if cache is None else {cache_kwarg(backbone): cache}
        out = backbone(input_ids=ids, use_cache=True, output_hidden_states=output_hidden_states,
                       logits_to_keep=1, **kw)
        return State(output_cache(out), out.logits[:, -1, :]), out
    if cache is not None:
        raise ValueError("prefill(cache=...) continues rows of one length; got prompt lengths "
                         f"{sorted({len(p) for p in prompts})}")
    ids, attn, pos = pad_left(prompts, pad_id, device)
    with decode_attention(ids.device, param_dtype(backbone)):
        out = backbone(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                       output_hidden_states=output_hidden_states, logits_to_keep=1)
    return State(output_cache(out), out.logits[:, -1, :], attn, pos[:, -1:]), out


@torch.inference_mode()
def decode(model: Any, state: State, *, max_new_tokens: int, eos: set[int], pad_id: int,
           temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, ignore_eos: bool = False,
           output_hidden_states: bool = False, feed_last: bool = False,
           on_token: OnToken | None = None, on_forward: OnForward | None = None,
           groups: torch.Tensor | None = None,
           generators: Sequence[torch.Generator | None] | None = None) -> Decoded:
    """Decode up to ``max_new_tokens`` for the R rows of ``state``.

    ``groups`` (R,) long, non-decreasing (rows of one group contiguous) with
    ``generators`` (one per group id): every step samples each group's unfinished
    rows in one draw from its own generator (``generator`` is then unused); a
    group's draws are those it would get decoded alone. ``on_token`` is called once
    per step for all unfinished rows.

    ``feed_last``: feed every row's final token once more (its hidden state is
    read by ``on_forward``; read modes that look at the step token itself).
    ``output_hidden_states`` is passed to every forward (for ``on_forward``).
    ``state`` is consumed (its cache is updated in place).
    """
    backbone = base_model(model)
    cache_kw = cache_kwarg(backbone)
    logits, cache = state.logits, state.cache
    # room for every position still to come, written in place (no torch.cat per step)
    kv_cache.reserve(cache, max_new_tokens + 1)
    attn, pos = state.attention_mask, state.position
    R, T, device = logits.shape[0], max_new_tokens, logits.device
    tokens = torch.full((R, T), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((R,), T, dtype=torch.long, device=device)
    hit_max = torch.ones(R, dtype=torch.bool, device=device)
    rows = torch.arange(R, device=device)          # batch row of each cache row
    eos_t = (torch.tensor(sorted(eos), dtype=torch.long, device=device)
             if eos and not ignore_eos else None)

    def keep_rows(keep: torch.Tensor) -> None:     # drop cache rows where keep is False
        nonlocal rows, logits, attn, pos
        cache.batch_select_indices(keep.nonzero().squeeze(-1))
        rows, logits = rows[keep], logits[keep]
        attn = None if attn is None else attn[keep]
        pos = None if pos is None else pos[keep]

    grouped = groups is not None and temperature > 0   # greedy draws nothing: one call
    grp_all = groups.to(device) if grouped else None
    with decode_attention(device, param_dtype(backbone)):
        for t in range(T):
            if grouped:
                nxt, top = draw_by_group(logits, grp_all[rows], temperature, top_p, generators)
            else:
                nxt, top = sample_next_with_top(logits, temperature, top_p, generator)  # (rows,)
            if on_token is not None:
                on_token(t, rows, nxt, logits, top)
            tokens[rows, t] = nxt
            done = torch.isin(nxt, eos_t) if eos_t is not None else torch.zeros_like(nxt, dtype=torch.bool)
            if done.any():
                lengths[rows[done]] = t + 1
                hit_max[rows[done]] = False
            last = t == T - 1
            if last and not feed_last:
                break
            # feed the unfinished rows (all rows once more when their final token is read)
            keep = torch.ones_like(done) if (feed_last or last) else ~done
            if not keep.any():
                break
            if not keep.all():
                keep_rows(keep)
                nxt, done = nxt[keep], done[keep]
            extra = {}
            if attn is not None:                       # left-padded: explicit mask and positions
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
                pos = pos + 1
                extra = {"attention_mask": attn, "position_ids": pos}
            out = backbone(input_ids=nxt[:, None], use_cache=True,
                           output_hidden_states=output_hidden_states, **extra, **{cache_kw: cache})
            if on_forward is not None:
                on_forward(t, rows, out)
            if last:
                break
            logits, cache = out.logits[:, -1, :], output_cache(out)
            del out
            if feed_last and done.any():               # fed their final token; drop them now
                if bool(done.all()):
                    break
                keep_rows(~done)
    return Decoded(tokens, lengths, hit_max)


# ------------------------------------------------------------ continuous batching
@torch.inference_mode()
def decode_stream(model: Any, joining: Iterable[Joining], *, max_rows: int, width: int,
                  max_new_tokens: int, eos: set[int], pad_id: int,
                  temperature: float = 1.0, top_p: float = 1.0, ignore_eos: bool = False,
                  output_hidden_states: bool = False, feed_last: bool = False,
                  on_join: OnJoin | None = None, on_sampled: OnSampled | None = None,
                  on_fed: OnFed | None = None, on_leave: OnLeave | None = None,
                  on_finish: OnFinish) -> None:
    """Continuous batching: decode the prompts of ``joining`` with at most ``max_rows``
    rows in flight, a waiting prompt joining as soon as rows that ended left room for
    its ``rows``. Each row stops at its first EOS id or after ``max_new_tokens``, as in
    :func:`decode`; ``on_finish`` hands over a group's :class:`Decoded` rows.

    Each row in flight holds one of ``max_rows`` slots (the callers' per-row buffers
    are indexed by slot): ``on_join`` names a group's slots, ``on_leave`` hands each
    back as its row ends, so a problem whose last rows are still decoding blocks
    nothing but those rows.

    The cache is a ring (:class:`~metastone_lab.kv_cache.RingLayer`) of ``width``
    columns (at least the longest prompt + ``max_new_tokens`` + 1): every forward
    writes each row's new position at one shared column and masks, per row, every
    column that is not its own (a 4-D additive mask, so the model builds none). A
    joining prompt's keys go into the columns its decoding will not reach; finished
    rows leave by an in-place move. Attention costs ``width`` columns per step
    whatever the number of prompts decoded.

    Groups are contiguous (rows join at the end, in order) and each step samples a
    group's active rows in one draw from its own generator (:func:`draw_by_group`),
    so a group's samples are those it gets decoded alone or in any batch (logits
    equal up to rounding). ``feed_last``: a row's final token is fed once more (its
    hidden state is read by ``on_fed``).
    """
    backbone = base_model(model)
    cache_kw = cache_kwarg(backbone)
    T = int(max_new_tokens)
    src = iter(joining)
    pending = next(src, None)
    if pending is None:
        return
    cache = pending.state.cache
    first = kv_cache.ring_template(cache, width)
    if first is None:
        kinds = sorted({type(la).__name__ for la in getattr(cache, "layers", None) or []})
        raise ConfigError(f"the batched engine cannot decode this backbone: its KV cache "
                          f"({type(cache).__name__} of {kinds or 'no layers'}) cannot be a "
                          f"ring of {width} columns (plain DynamicLayers, or sliding windows "
                          f"of at least {width}, can); use a backbone with a dynamic cache, "
                          f"or fewer max_new_tokens / shorter prompts for a sliding window")
    ring = kv_cache.Ring(width)
    rings = kv_cache.ring_layers(first, ring, max_rows)
    device, dtype = first[0].keys.device, first[0].keys.dtype
    mask = torch.full((max_rows, width), float("-inf"), dtype=dtype, device=device)
    tokens = torch.full((max_rows, T), pad_id, dtype=torch.long, device=device)  # by slot
    lengths = torch.full((max_rows,), T, dtype=torch.long, device=device)
    hit_max = torch.ones(max_rows, dtype=torch.bool, device=device)
    eos_t = (torch.tensor(sorted(eos), dtype=torch.long, device=device)
             if eos and not ignore_eos else None)
    empty = torch.empty(0, dtype=torch.long, device=device)
    slot, grp, loc, step, pos = empty, empty, empty, empty, empty        # (n,) each
    logits: torch.Tensor | None = None                                   # (n, V)
    free = list(range(max_rows))
    left: dict[int, int] = {}                                            # group -> rows left
    gens: dict[int, Any] = {}
    out_of: dict[int, Decoded] = {}                                      # group -> its rows

    def join(entry: Joining, g: int, layers: list) -> None:
        nonlocal slot, grp, loc, step, pos, logits
        n, r, P = ring.rows, int(entry.rows), int(layers[0].keys.shape[-2])
        if P + T + 1 > width:
            raise ValueError(f"decode_stream: a {P}-token prompt + max_new_tokens {T} + 1 "
                             f"does not fit the ring's width {width}")
        cols = (ring.col - P + torch.arange(P, device=device)) % width
        for rl, la in zip(rings, layers):
            rl.write_prompt(n, r, cols, la.keys, la.values)
        mask[n:n + r] = float("-inf")
        mask[n:n + r, cols] = 0.0
        s = torch.tensor(free[:r], dtype=torch.long, device=device)
        del free[:r]
        tokens[s], lengths[s], hit_max[s] = pad_id, T, True
        slot, grp = torch.cat([slot, s]), torch.cat([grp, s.new_full((r,), g)])
        loc = torch.cat([loc, torch.arange(r, device=device)])
        step, pos = torch.cat([step, s.new_zeros(r)]), torch.cat([pos, s.new_full((r,), P - 1)])
        lg = entry.state.logits.expand(r, -1)
        logits = lg if logits is None else torch.cat([logits, lg])
        left[g], gens[g] = r, entry.generator
        out_of[g] = Decoded(torch.full((r, T), pad_id, dtype=torch.long, device=device),
                            torch.full((r,), T, dtype=torch.long, device=device),
                            torch.ones(r, dtype=torch.bool, device=device))
        ring.rows = n + r
        if on_join is not None:
            on_join(g, s)

    def drop(keep: torch.Tensor) -> None:
        """Rows where ``keep`` (n,) is False leave; groups with no row left finish."""
        nonlocal slot, grp, loc, step, pos, logits
        out = ~keep
        gone = list(zip(grp[out].tolist(), loc[out].tolist(), slot[out].tolist()))
        idx = keep.nonzero().squeeze(-1).tolist()
        for rl in rings:
            rl.compact(idx)
        kv_cache.compact_rows(mask, idx)
        slot, grp, loc = slot[keep], grp[keep], loc[keep]
        step, pos, logits = step[keep], pos[keep], logits[keep]
        ring.rows = len(idx)
        for g, j, s in gone:
            dec = out_of[g]
            dec.tokens[j], dec.lengths[j], dec.hit_max[j] = tokens[s], lengths[s], hit_max[s]
            if on_leave is not None:
                on_leave(g, j, s)
            free.append(s)
            left[g] -= 1
            if left[g] == 0:
                del left[g], gens[g]
                on_finish(g, out_of.pop(g))

    g_next = 0
    with decode_attention(device, dtype):
        while True:
            while pending is not None and ring.rows + pending.rows <= max_rows:
                layers = (first if g_next == 0
                          else kv_cache.ring_template(pending.state.cache, width))
                if layers is None:
                    raise ConfigError("decode_stream: every prompt's cache must be of one "
                                      "kind (one backbone)")
                join(pending, g_next, layers)
                if g_next == 0:             # the first prompt's cache object carries the ring
                    cache.layers[:] = rings
                    first = None
                g_next += 1
                pending = next(src, None)
            if ring.rows == 0:
                if pending is not None:
                    raise ValueError(f"decode_stream: a prompt's {pending.rows} rows exceed "
                                     f"max_rows={max_rows}")
                return
            nxt, top = draw_by_group(logits, grp, temperature, top_p, gens)   # (n,)
            if on_sampled is not None:
                on_sampled(slot, step, nxt, logits, top)
            tokens[slot, step] = nxt
            done = (torch.isin(nxt, eos_t) if eos_t is not None
                    else torch.zeros_like(nxt, dtype=torch.bool))
            if bool(done.any()):
                lengths[slot[done]] = step[done] + 1
                hit_max[slot[done]] = False
            ended = done | (step == T - 1)
            if not feed_last and bool(ended.any()):
                nxt = nxt[~ended]
                drop(~ended)
                ended = ended[~ended]
                if ring.rows == 0:
                    continue
            mask[:ring.rows, ring.col] = 0.0
            pos = pos + 1
            out = backbone(input_ids=nxt[:, None],
                           attention_mask=mask[:ring.rows, None, None, :],   # (n, 1, 1, width)
                           position_ids=pos[:, None], use_cache=True,
                           output_hidden_states=output_hidden_states, **{cache_kw: cache})
            if on_fed is not None:
                on_fed(slot, step, out)
            ring.advance()
            logits = out.logits[:, -1, :]
            del out
            step = step + 1
            if feed_last and bool(ended.any()):
                drop(~ended)


def sample(model: Any, prompts: Sequence[Sequence[int]], *, n: int = 1, max_new_tokens: int,
           eos: set[int], pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
           generator: torch.Generator | None = None, batch_size: int = 0,
           ) -> list[list[int]]:
    """``n`` samples of each prompt, in order (prompt 0's n samples first), as lists of
    new ids (EOS kept when produced). Rows go through :func:`decode` in batches of
    ``batch_size`` rows (0 = all at once); each batch is prefilled once
    (:func:`_prefill_rows`: a prompt repeated on consecutive rows, the GRPO group,
    once)."""
    rows = [list(p) for p in prompts for _ in range(n)]
    if not rows:
        return []
    step = batch_size if batch_size > 0 else len(rows)
    out: list[list[int]] = []
    for s in range(0, len(rows), step):
        state = _prefill_rows(model, rows[s:s + step], pad_id, max_new_tokens + 1)
        out += decode(model, state, max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id,
                      temperature=temperature, top_p=top_p, generator=generator).rows()
    return out


def _prefill_rows(model: Any, rows: list[list[int]], pad_id: int, reserve_tokens: int) -> State:
    """The :class:`State` of ``rows`` (token id lists). When they are runs of one prompt
    repeated the same number of times r > 1 (``rollout``'s groups of n samples), each
    prompt is prefilled once at batch 1 and its cache written r times
    (:func:`merge_states`): a GRPO step of 2 prompts x 4 samples of a 186-token chat
    prompt prefills 372 positions instead of 1488. Otherwise (or for a cache that is
    not a plain ``DynamicCache``) all rows go through one left-padded :func:`prefill`."""
    runs: list[list[Any]] = []                     # [prompt, count] of consecutive rows
    for r in rows:
        if runs and runs[-1][0] == r:
            runs[-1][1] += 1
        else:
            runs.append([r, 1])
    counts = {c for _, c in runs}
    if len(counts) == 1 and counts != {1}:
        states = [prefill(model, [p])[0] for p, _ in runs]
        try:
            return merge_states(states, repeats=runs[0][1], reserve_tokens=reserve_tokens)
        except TypeError:                          # not a plain DynamicCache: no merge
            pass
    return prefill(model, rows, pad_id=pad_id)[0]


__all__ = ["encode_prompt", "eos_ids", "pad_id_for", "cache_kwarg", "output_cache",
           "pad_right", "pad_left", "draw", "pick_by_cdf", "sample_next", "sample_next_with_top", "State", "Decoded",
           "prefill", "decode", "sample", "merge_states", "draw_by_group", "Joining",
           "decode_stream"]
