"""The batched best-of-N engine: the k rows of several problems in one decode batch.

:func:`metastone_lab.generate.generate_best_of_n` hands its problems here in
batches of at most ``GenerateConfig.batch_rows`` rows (:func:`plan_batches`;
a problem's k rows always share one batch). For one batch, :func:`decode_batch`:

1. prefills each problem's prompt **once** (batch 1, unpadded, in blocks of
   ``prefill_block`` positions: :func:`metastone_lab.prefix_cache.prefill_prompt`;
   blocks shared with an earlier prompt of the call are taken from its store); its
   cache is written to k rows by step 2;
2. joins the problems' states, k rows each, with :func:`metastone_lab.sampling.merge_states`:
   caches left-padded to the longest prompt P, an attention mask and per-row
   positions, so every row continues its own positions;
3. decodes all rows with :func:`metastone_lab.sampling.decode`, ``groups`` = the
   problem of each row and one ``torch.Generator`` per problem: every step draws
   each problem's unfinished rows in one call on its own generator, so a
   problem's samples do not depend on which problems share its batch (and equal
   the per-problem path's when ``chunk_size >= k``, the default: the same draws
   from the same generator on the same rows; logits equal up to rounding);
   ``generate.decode_chunks``, the per-problem path, is this function called with
   one prompt per chunk;
4. captures in flight, through the sampler's ``on_token`` / ``on_forward`` hooks, the
   head logits (``per_step``) or feature-layer states (``deferred``) of every fed
   position and the token statistics of every sampled token, in buffers laid out
   in the batch's left-padded frame (column ``P + t`` = step t for every row);
5. cuts each problem's rows back out into a :class:`Chunk` in the per-problem
   layout (prompt at columns 0..P_i-1), so the step mask, the deferred head and
   the trajectories are computed per problem exactly as before.

Rows that sample an EOS leave the batch (the sampler drops them from the cache).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

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
def decode_batch(model: Any, prompts: Sequence[Sequence[int]], cfg: GenerateConfig, *,
                 eos: set[int], pad_id: int,
                 generators: Sequence[torch.Generator | None],
                 rows_per_prompt: int | None = None,
                 prefix_store: PrefixStore | None = None) -> list[Chunk]:
    """Decode k = ``rows_per_prompt`` (default ``cfg.k``) rows for each of the N
    ``prompts`` (token id lists) in one batch of N*k rows, ``generators[i]`` drawing
    problem i's samples; returns one :class:`Chunk` of k rows per prompt, in the
    per-problem layout (see the module docstring). ``model``: a ReflectiveModel (a
    bare causal LM when not scoring). One prompt decodes ungrouped on its generator
    (the same draws, without the per-group split). ``prefix_store``: prompt blocks
    already prefilled in this call (:mod:`metastone_lab.prefix_cache`; None: a store
    for this batch only)."""
    device = sampling.device_of(sampling.base_model(model))
    score, T = cfg.score, cfg.max_new_tokens
    k = cfg.k if rows_per_prompt is None else int(rows_per_prompt)
    lens = [len(p) for p in prompts]
    P, R = max(lens), k * len(prompts)
    W = P + T                                     # width of the left-padded frame
    feed_last = score and needs_last_hidden(cfg.read_at)
    mode = ""
    if score:
        mode = resolve_head_mode(cfg, int(getattr(model, "hidden_size", 0) or 0), P, rows=R)
    conf_head = score and bool(getattr(model, "uses_confidence", False))
    if conf_head:   # the confidence head reads per-step token stats: keep the features
        mode = "deferred"
    fl = getattr(model, "feature_layer", -2)
    stats = cfg.capture_token_stats or conf_head

    states, head, feats = [], None, None
    store = PrefixStore() if prefix_store is None else prefix_store
    for i, p in enumerate(prompts):
        st, h = prefill_prompt(model, p, block=cfg.prefill_block, store=store,
                               feature_layer=fl if score else None)             # h (P_i, C)
        check_finite(st.logits, lens[i])
        rows = slice(i * k, (i + 1) * k)
        if mode == "per_step":
            if head is None:
                head = torch.full((R, W), float("nan"), dtype=torch.float32, device=device)
            head[rows, P - lens[i]:P] = model.head_logits(h)
        elif mode == "deferred":
            if feats is None:
                feats = torch.full((R, W, h.shape[-1]), float("nan"), dtype=h.dtype,
                                   device=device)                              # (R, W, C)
            feats[rows, P - lens[i]:P] = h
        del h
        states.append(st)
    # k rows per prompt, written once into a cache with room for every new position
    start = sampling.merge_states(states, repeats=k, reserve_tokens=T + 1)
    del states
    stat_buf = (torch.full((3, R, W), float("nan"), dtype=torch.float32, device=device)
                if stats else None)                                           # (3, R, W)

    def on_token(t, rows, nxt, logits, top):
        # from the raw logits that sampled nxt (no second pass)
        stat_buf[:, rows, P + t] = token_stats(logits, nxt, cfg.deepconf_topk, top)

    def on_forward(t, rows, out):
        # the hidden state of the token fed at column P + t (every row: left padding)
        if mode == "per_step":
            head[rows, P + t] = model.head_logits_from_hidden(out.hidden_states)[:, -1]
        else:
            feats[rows, P + t] = out.hidden_states[fl][:, -1]

    one = len(prompts) == 1
    groups = None if one else torch.arange(len(prompts), device=device).repeat_interleave(k)
    dec = sampling.decode(model, start, max_new_tokens=T, eos=eos, pad_id=pad_id,
                          temperature=cfg.temperature, top_p=cfg.top_p,
                          ignore_eos=cfg.ignore_eos, output_hidden_states=score,
                          feed_last=feed_last, groups=groups,
                          generator=generators[0] if one else None,
                          generators=None if one else list(generators),
                          on_token=on_token if stat_buf is not None else None,
                          on_forward=on_forward if mode else None)
    chunks = []
    for i, p in enumerate(prompts):
        rows, off = slice(i * k, (i + 1) * k), P - lens[i]
        lengths = lens[i] + dec.lengths[rows]
        Lmax = int(lengths.max())
        prompt = torch.tensor([list(p)], dtype=torch.long, device=device)      # (1, P_i)
        ids = torch.cat([prompt.expand(k, -1), dec.tokens[rows]], dim=1)[:, :Lmax]
        cut = (lambda x: None if x is None else x[rows, off:off + Lmax])       # (k, Lmax...)
        ties = PrefixTies(ids) if (stat_buf is not None or mode) else None
        st = [None] * 3
        if stat_buf is not None:   # equal in exact arithmetic over a shared prefix: equal here
            src = ties.sources()                                                # (k, Lmax)
            st = [share_prefix_values(x, src) for x in stat_buf[:, rows, off:off + Lmax]]
        chunks.append(Chunk(ids=ids, lengths=lengths, head=cut(head), hit_max=dec.hit_max[rows],
                            feats=cut(feats), tok_logprob=st[0], tok_self_certainty=st[1],
                            tok_confidence=st[2], ties=ties))
    return chunks


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def place_model(model: Any, cfg: GenerateConfig) -> Any:
    """Move / cast ``model`` in place for ``cfg.device`` / ``cfg.dtype`` (``auto`` and
    None leave it as it is, so nothing changes by default). ConfigError for
    ``device: cuda`` on a machine without CUDA."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("GenerateConfig.device: cuda, but CUDA is not available on this "
                          "machine (torch.cuda.is_available() is False); use device: cpu or "
                          "device: auto")
    target = None if cfg.device == "auto" else torch.device(cfg.device)
    dtype = _DTYPES.get(cfg.dtype) if cfg.dtype else None
    p = next(iter(model.parameters()), None)
    if p is None:
        return model
    if (target is not None and p.device.type != target.type) or (
            dtype is not None and p.dtype != dtype):
        model.to(device=target, dtype=dtype)
    return model


__all__ = ["Chunk", "resolve_head_mode", "needs_last_hidden", "plan_batches", "decode_batch",
           "place_model", "check_finite"]
