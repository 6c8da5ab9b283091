"""The batched best-of-N engine: the k rows of many problems in one decode batch.

:func:`metastone_lab.generate.generate_best_of_n` hands its problems to
:func:`decode_stream`, with at most ``GenerateConfig.batch_rows`` rows in flight
(a problem's k rows always join together). It:

1. prefills each problem's prompt **once** (batch 1, unpadded, in blocks of
   ``prefill_block`` positions: :func:`metastone_lab.prefix_cache.prefill_prompt`;
   blocks shared with an earlier prompt of the call are taken from its store), as
   soon as there is room for its k rows;
2. decodes with :func:`metastone_lab.sampling.decode_stream` (continuous batching):
   the prompt's cache is written to k rows of a ring cache, every row continues
   its own positions under a per-row mask, rows that sample an EOS leave, and a
   waiting problem takes their place, so the batch stays full until the queue
   runs out. One ``torch.Generator`` per problem: every step draws each problem's
   active rows in one call on its own generator, so a problem's samples do not
   depend on which problems share its batch or when it joined (and equal the
   per-problem path's: the same draws from the same generator on the same rows;
   logits equal up to rounding);
3. captures in flight, through the sampler's ``on_sampled`` / ``on_fed`` hooks, the
   head logits (``per_step``) or feature-layer states (``deferred``) of every fed
   position and the token statistics of every sampled token, in per-slot buffers
   laid out per problem (prompt at columns 0..P_i-1, step t at column P_i + t);
4. hands each problem's rows, cut out of those buffers into a :class:`Chunk`, to
   the caller as soon as its last row ends, so the step mask, the deferred head
   and the trajectories are computed per problem exactly as before.

:func:`decode_batch` is the same with every row in flight at once (fixed batches:
``continuous_batching: false``, and ``generate.decode_chunks``, the per-problem
path, with one prompt per chunk).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import sampling
from .errors import ConfigError, NumericsError
from .generate_config import GenerateConfig
from .prefix_cache import PrefixStore, prefill_prompt
from .prefix_ties import PrefixTies, share_prefix_values
from .token_signals import token_stats


@dataclass
class Chunk:
    """Decoded rows of one problem: ``ids`` (R, P+T) padded; ``lengths`` (R,) full
    lengths; ``head`` (R, P+T) head logits (NaN where not computed, per_step mode);
    ``feats`` (R, P+T, C) feature-layer hidden states (NaN where not computed,
    deferred mode); ``hit_max`` (R,).

    Token stats (``cfg.capture_token_stats``; else None): ``tok_logprob``,
    ``tok_self_certainty``, ``tok_confidence``, each (R, P+T) float32 and
    ALIGNED WITH THE FULL SEQUENCE ``ids``: column j holds the stat of token
    ``ids[r, j]``, computed (:func:`token_stats`) from the raw logits of the step
    that sampled it (i.e. the logits at position j-1). Prompt columns (< P) and
    padding (>= ``lengths[r]``) are NaN; the EOS column is filled (it is part of
    the response). So a per-step feature at step position j is ``tok_*[r, j]``.
    (P+T is trimmed to the chunk's longest row, like ``ids``.)"""

    ids: torch.Tensor
    lengths: torch.Tensor
    head: torch.Tensor | None
    hit_max: torch.Tensor
    feats: torch.Tensor | None = None
    tok_logprob: torch.Tensor | None = None
    tok_self_certainty: torch.Tensor | None = None
    tok_confidence: torch.Tensor | None = None
    #: which rows share which prefix (:class:`~metastone_lab.prefix_ties.PrefixTies`)
    ties: PrefixTies | None = None


def resolve_head_mode(cfg: GenerateConfig, hidden_size: int, prompt_len: int,
                      rows: int | None = None) -> str:
    """``per_step`` or ``deferred`` for ``cfg.head_mode`` (auto: deferred when the
    (rows, prompt_len + max_new_tokens, hidden_size) float32 feature buffer fits in
    ``feature_buffer_mb``; ``rows`` default: ``cfg.rows_per_chunk``)."""
    if cfg.head_mode != "auto":
        return cfg.head_mode
    rows = cfg.rows_per_chunk if rows is None else rows
    mb = rows * (prompt_len + cfg.max_new_tokens) * hidden_size * 4 / 2 ** 20
    return "deferred" if mb <= cfg.feature_buffer_mb else "per_step"


def needs_last_hidden(read_at: str) -> bool:
    """Whether the read mode needs the hidden state of a row's final token (fed once more)."""
    return read_at != "before_step_token"


def check_finite(logits: torch.Tensor, prompt_len: int) -> None:
    """One cheap check per prompt: next-token ``logits`` (R, V) after the prefill."""
    if not bool(torch.isfinite(logits).all()):
        raise NumericsError(
            f"the backbone's next-token logits after the {prompt_len}-token prompt contain "
            f"NaN/inf: its weights are corrupt or diverged, or the dtype overflows (fp16?); load "
            f"an earlier checkpoint or run in float32")


def plan_batches(n_rows: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive groups of indices whose ``n_rows`` sum to at most ``budget``
    (a problem's rows are never split); ConfigError when one problem alone exceeds it."""
    batches: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(n_rows):
        if n > budget:
            raise ConfigError(f"GenerateConfig.max_batch_rows={budget} is smaller than one "
                              f"problem's k={n} rows; set max_batch_rows >= {n}, or 0 for one "
                              f"problem per batch")
        if cur and used + n > budget:
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        batches.append(cur)
    return batches


@torch.inference_mode()
def decode_stream(model: Any, prompts: Sequence[Sequence[int]], cfg: GenerateConfig, *,
                  eos: set[int], pad_id: int, generators: Sequence[torch.Generator | None],
                  on_chunk: Callable[[int, Chunk], None], max_rows: int | None = None,
                  rows_per_prompt: int | None = None,
                  prefix_store: PrefixStore | None = None) -> None:
    """Decode k = ``rows_per_prompt`` (default ``cfg.k``) rows for each of the N
    ``prompts`` (token id lists), ``generators[i]`` drawing problem i's samples, with
    at most ``max_rows`` (default ``cfg.batch_rows``) rows in flight: continuous
    batching (:func:`metastone_lab.sampling.decode_stream`), a waiting problem joins
    as soon as rows that ended left room for its k. ``on_chunk(i, chunk)`` receives
    problem i's :class:`Chunk` (k rows, per-problem layout) as soon as its last row
    ends, so finished problems are judged while others decode. ``model``: a
    ReflectiveModel (a bare causal LM when not scoring). ``prefix_store``: prompt
    blocks already prefilled in this call (:mod:`metastone_lab.prefix_cache`; None: a
    store for this call only).

    In-flight capture writes into per-slot buffers (one row per row in flight, the
    problem's prompt at columns 0..P_i-1 and step t at column P_i + t): the head
    logits (``per_step``) or feature-layer states (``deferred``) of every fed position
    and the token statistics of every sampled token. A row that ends is copied out to
    its problem's rows (its slot goes to a joining row); a finished problem's rows are
    cut into its Chunk.
    """
    device = sampling.device_of(sampling.base_model(model))
    score, T = cfg.score, cfg.max_new_tokens
    k = cfg.k if rows_per_prompt is None else int(rows_per_prompt)
    R = cfg.batch_rows if max_rows is None else int(max_rows)
    plan_batches([k], R)                          # a budget below k: the error names both
    if not prompts:
        return
    lens = [len(p) for p in prompts]
    P = max(lens)
    W = P + T                                     # capture columns of a slot
    R = S = min(R, k * len(prompts))              # rows in flight = capture slots
    feed_last = score and needs_last_hidden(cfg.read_at)
    mode = ""
    if score:
        mode = resolve_head_mode(cfg, int(getattr(model, "hidden_size", 0) or 0), P, rows=S)
    conf_head = score and bool(getattr(model, "uses_confidence", False))
    if conf_head:   # the confidence head reads per-step token stats: keep the features
        mode = "deferred"
    fl = getattr(model, "feature_layer", -2)
    stats = cfg.capture_token_stats or conf_head
    nan = float("nan")
    head = (torch.full((S, W), nan, dtype=torch.float32, device=device)
            if mode == "per_step" else None)                                  # (S, W)
    feats: torch.Tensor | None = None                                         # (S, W, C)
    stat_buf = (torch.full((3, S, W), nan, dtype=torch.float32, device=device)
                if stats else None)                                           # (3, S, W)
    plen = torch.zeros(S, dtype=torch.long, device=device)                    # (S,)
    prompt_h: dict[int, torch.Tensor] = {}
    rows_of: dict[int, list] = {}     # problem -> its ended rows: [head, feats, stats]
    store = PrefixStore() if prefix_store is None else prefix_store

    def joining():
        for i, p in enumerate(prompts):
            st, h = prefill_prompt(model, p, block=cfg.prefill_block, store=store,
                                   feature_layer=fl if score else None)         # h (P_i, C)
            check_finite(st.logits, lens[i])
            if mode:
                prompt_h[i] = h
            del h
            yield sampling.Joining(st, k, generators[i])

    def on_join(i, slots):
        nonlocal feats
        n = lens[i]
        plen[slots] = n
        if stat_buf is not None:
            stat_buf[:, slots] = nan
        if mode == "per_step":
            head[slots] = nan
            head[slots, :n] = model.head_logits(prompt_h.pop(i)).float()
        elif mode == "deferred":
            h = prompt_h.pop(i)
            if feats is None:
                feats = torch.full((S, W, h.shape[-1]), nan, dtype=h.dtype, device=device)
            feats[slots] = nan
            feats[slots, :n] = h
        # where its rows go as they end: (k, W), (k, W, C), (3, k, W)
        rows_of[i] = [None if x is None else x.new_empty((k,) + x.shape[1:]) for x in (head, feats)]
        rows_of[i].append(None if stat_buf is None else stat_buf.new_empty((3, k, W)))

    def on_leave(i, j, s):
        hd, ft, sb = rows_of[i]
        if hd is not None:
            hd[j] = head[s]
        if ft is not None:
            ft[j] = feats[s]
        if sb is not None:
            sb[:, j] = stat_buf[:, s]

    def on_sampled(slots, steps, nxt, logits, top):
        # from the raw logits that sampled nxt (no second pass)
        stat_buf[:, slots, plen[slots] + steps] = token_stats(logits, nxt, cfg.deepconf_topk,
                                                              top)

    def on_fed(slots, steps, out):
        # the hidden state of the token each row fed (its column P_i + step)
        cols = plen[slots] + steps
        if mode == "per_step":
            head[slots, cols] = model.head_logits_from_hidden(out.hidden_states)[:, -1].float()
        else:
            feats[slots, cols] = out.hidden_states[fl][:, -1]

    def on_finish(i, dec):
        n = lens[i]
        hd, ft, sb = rows_of.pop(i)
        lengths = n + dec.lengths
        Lmax = int(lengths.max())
        prompt = torch.tensor([list(prompts[i])], dtype=torch.long, device=device)   # (1, P_i)
        ids = torch.cat([prompt.expand(k, -1), dec.tokens], dim=1)[:, :Lmax]
        cut = (lambda x: None if x is None else x[:, :Lmax])                      # (k, Lmax...)
        ties = PrefixTies(ids) if (stat_buf is not None or mode) else None
        st = [None] * 3
        if stat_buf is not None:   # equal in exact arithmetic over a shared prefix: equal here
            src = ties.sources()                                                    # (k, Lmax)
            st = [share_prefix_values(x, src) for x in sb[:, :, :Lmax]]
        on_chunk(i, Chunk(ids=ids, lengths=lengths, head=cut(hd), hit_max=dec.hit_max,
                          feats=cut(ft), tok_logprob=st[0], tok_self_certainty=st[1],
                          tok_confidence=st[2], ties=ties))

    sampling.decode_stream(model, joining(), max_rows=R, width=P + T + 1,
                           max_new_tokens=T, eos=eos, pad_id=pad_id,
                           temperature=cfg.temperature, top_p=cfg.top_p,
                           ignore_eos=cfg.ignore_eos, output_hidden_states=score,
                           feed_last=feed_last, on_join=on_join,
                           on_sampled=on_sampled if stat_buf is not None else None,
                           on_fed=on_fed if mode else None, on_leave=on_leave,
                           on_finish=on_finish)


def decode_batch(model: Any, prompts: Sequence[Sequence[int]], cfg: GenerateConfig, *,
                 eos: set[int], pad_id: int,
                 generators: Sequence[torch.Generator | None],
                 rows_per_prompt: int | None = None,
                 prefix_store: PrefixStore | None = None) -> list[Chunk]:
    """:func:`decode_stream` with room for every row at once (all N prompts start
    together): one :class:`Chunk` of k = ``rows_per_prompt`` (default ``cfg.k``) rows
    per prompt, in order."""
    k = cfg.k if rows_per_prompt is None else int(rows_per_prompt)
    out: dict[int, Chunk] = {}
    decode_stream(model, prompts, cfg, eos=eos, pad_id=pad_id, generators=generators,
                  on_chunk=out.__setitem__, max_rows=k * len(prompts), rows_per_prompt=k,
                  prefix_store=prefix_store)
    return [out[i] for i in range(len(prompts))]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def place_model(model: Any, cfg: GenerateConfig) -> Any:
    """Move / cast ``model`` in place for ``cfg.device`` / ``cfg.dtype``. ``auto`` moves
    a model on the CPU to CUDA when CUDA is present and otherwise leaves it where it is
    (so nothing changes for CPU users); dtype None leaves its dtype. ConfigError for
    ``device: cuda`` on a machine without CUDA.

    ``dtype`` casts the backbone; a reflective model's scoring head stays as it is
    (float32 as built): the head reads the backbone's features cast to its own dtype
    (``head_logits``), so step scores keep float32 resolution and k trajectories do not
    tie on bfloat16's 8-bit mantissa."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("GenerateConfig.device: cuda, but CUDA is not available on this "
                          "machine (torch.cuda.is_available() is False); use device: cpu or "
                          "device: auto")
    dtype = _DTYPES.get(cfg.dtype) if cfg.dtype else None
    p = next(iter(model.parameters()), None)
    if p is None:
        return model
    target = None if cfg.device == "auto" else torch.device(cfg.device)
    if cfg.device == "auto" and p.device.type == "cpu" and torch.cuda.is_available():
        target = torch.device("cuda")
    if target is not None and p.device.type != target.type:
        model.to(device=target)
    backbone = getattr(model, "backbone", None) if hasattr(model, "head") else None
    body = backbone if isinstance(backbone, torch.nn.Module) else model
    q = next(iter(body.parameters()), None)
    if dtype is not None and q is not None and q.dtype != dtype:
        body.to(dtype=dtype)
    return model


__all__ = ["Chunk", "resolve_head_mode", "needs_last_hidden", "plan_batches", "decode_batch",
           "decode_stream",
           "place_model", "check_finite"]
