"""Best-of-N generation with SPRM step scores computed **during** generation.

The reference scores each finished trajectory with a second forward pass
(method.md §6). Here the backbone is shared, so the hidden states the SPRM head
needs are already computed while decoding:

1. The prompt is prefilled **once** (batch 1); its KV cache is copied and
   expanded to the rows of each chunk (``DynamicCache.batch_repeat_interleave``).
2. k samples are decoded in chunks of ``chunk_size`` rows (bounded memory) with
   temperature / top-p sampling; a row stops at EOS and is then dropped from the
   cache (``batch_select_indices``), so finished rows cost nothing.
3. Every forward runs with ``output_hidden_states=True``. ``head_mode="per_step"``
   applies the head to the configured feature layer **at every new position** (a
   (rows, C) x (C, 2C) matmul per step) into a small (rows, L) logit tensor;
   ``"deferred"`` (default when it fits ``feature_buffer_mb``) keeps the (rows, L, C)
   feature-layer states and applies the head only at the marked positions once a
   chunk is finished. Prompt positions come from the prefill.
4. At the end the step mask is computed on the full token sequences with
   :func:`metastone_lab.steps.step_mask` (``span="inference"``) and the logits
   are read where it is True. With the reference rule (``read_at=
   "before_step_token"``) the score of step token ``t_j`` is the head at
   position ``j-1``, i.e. the hidden state computed when ``t_{j-1}`` was fed -
   it was kept, so no look-ahead or second pass is needed. Read modes that need
   the hidden state of the final token feed it once more (one extra step).

:func:`reforward_scores` is the reference method (one forward over each finished
sequence + step mask); the equivalence test checks both agree within 1e-4.

5. With ``token_stats`` (on whenever ``score`` is) the raw next-token logits
   that sampled each token also give its training-free self-signals
   (:func:`token_stats`: log-prob, self-certainty, DeepConf confidence), one
   log_softmax + topk per step; :func:`trajectory_signals` turns them into the
   ``Trajectory.signals`` that the ``mean_logprob_*`` / ``self_certainty_*`` /
   ``deepconf_*`` selectors read, beside the SPRM on the same samples.

Conventions: ``Trajectory.token_ids`` are the generated ids (EOS included when
emitted); ``step_positions`` index the full sequence ``prompt_ids + token_ids``
(``prompt_len`` is stored to convert); ``step_scores = sigmoid(logit)``.
Trajectory scores follow :func:`metastone_lab.scoring.aggregate` (a zero-step
trajectory scores 0.0, never NaN). A trajectory that hits ``max_new_tokens``
without an extractable answer is incorrect (the task says so) and counted in
``ProblemSamples.n_max_tokens_no_answer``.

An optional vLLM backend (:func:`generate_best_of_n_vllm`) samples with vLLM and
scores with a batched re-forward through the shared backbone (GPU scale-out;
``pip install 'metastone-lab[vllm]'``).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from . import progress, threads
from .confidence import lookahead
from .config import check, from_dict
from .errors import ConfigError, NumericsError, ShapeError
from .registry import Registry

DEFAULT_EFFORT_MAP = {"low": 2, "medium": 8, "high": 32}


# ------------------------------------------------------------------------ config
@dataclass
class GenerateConfig:
    """Best-of-N sampling and in-flight scoring.

    ``k`` samples per problem (or ``effort`` in ``effort_map``: low/medium/high =
    2/8/32 by default; giving both with different values is an error).
    ``temperature == 0`` is greedy (all k samples identical: warned when k > 1); < 0 is an error.
    ``chunk_size`` rows are decoded at once (0 = all k). ``segmenter`` /
    ``segmenter_options`` / ``read_at`` / ``span`` go to ``steps.step_mask``.
    ``aggregators``: trajectory scores to compute (None = all of
    ``scoring.AGGREGATORS``). ``score``: False disables in-flight scoring
    (benchmark baseline). ``ignore_eos``: always decode ``max_new_tokens``
    (benchmarks). ``head_mode``: ``"per_step"`` applies the head to every new
    position as it is decoded (keeps a (rows, L) logit tensor); ``"deferred"``
    keeps the feature-layer hidden state of every position (rows, L, C) and, once
    the rows are finished, applies the head only where the step mask is True
    (no second forward either way; cheapest); ``"auto"`` = deferred when the
    feature buffer of a chunk fits in ``feature_buffer_mb``, else per_step.

    ``token_stats``: capture per-token self-signals during decoding (log-prob,
    self-certainty, DeepConf confidence of every sampled token, from the raw
    logits already at hand; see :func:`token_stats`). ``None`` (default) = on
    whenever ``score`` is on, so the unscored benchmark baseline stays bare; set
    True to get them without scoring too. ``deepconf_topk``: k of the DeepConf
    token confidence (the paper's 20). ``deepconf_window``: its sliding-window
    group size in tokens (the paper's 2048, scaled to our ~30-60 token responses).
    """

    k: int | None = None
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 256
    chunk_size: int = 32
    segmenter: str = "reference"
    segmenter_options: dict = field(default_factory=dict)
    read_at: str = "before_step_token"
    span: str = "inference"
    aggregators: list[str] | None = None
    seed: int = 0
    effort: str | None = None
    effort_map: dict = field(default_factory=lambda: dict(DEFAULT_EFFORT_MAP))
    score: bool = True
    ignore_eos: bool = False
    head_mode: str = "auto"
    feature_buffer_mb: float = 256.0
    token_stats: bool | None = None
    deepconf_topk: int = 20
    deepconf_window: int = 16

    def __post_init__(self) -> None:
        if self.effort is not None:
            check(self.effort in self.effort_map,
                  f"GenerateConfig.effort: {self.effort!r} is not in effort_map "
                  f"{sorted(self.effort_map)}; choose one of them or add it to effort_map")
            mapped = self.effort_map[self.effort]
            check(isinstance(mapped, int) and not isinstance(mapped, bool),
                  f"GenerateConfig.effort_map[{self.effort!r}] must be an int, got {mapped!r}")
            check(self.k is None or self.k == mapped,
                  f"GenerateConfig: k={self.k} contradicts effort={self.effort!r} "
                  f"(= k {mapped}); give only one of k and effort")
            self.k = mapped
        if self.k is None:
            self.k = 8
        check(self.k >= 1, f"GenerateConfig.k must be >= 1, got {self.k}; use k=1 for a single sample")
        check(self.max_new_tokens >= 1,
              f"GenerateConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(0.0 < self.top_p <= 1.0, f"GenerateConfig.top_p must be in (0, 1], got {self.top_p}")
        check(self.temperature >= 0,
              f"GenerateConfig.temperature must be >= 0, got {self.temperature}; use "
              f"temperature=0 for greedy decoding or > 0 (e.g. 0.6) for sampling")
        check(self.chunk_size >= 0,
              f"GenerateConfig.chunk_size must be >= 0 (0 = all k at once), got {self.chunk_size}")
        check(self.head_mode in ("auto", "per_step", "deferred"),
              f"GenerateConfig.head_mode must be auto, per_step or deferred, got {self.head_mode!r}")
        check(self.deepconf_topk >= 1,
              f"GenerateConfig.deepconf_topk must be >= 1, got {self.deepconf_topk}")
        check(self.deepconf_window >= 1,
              f"GenerateConfig.deepconf_window must be >= 1, got {self.deepconf_window}")
        check(self.span in ("inference", "train"),
              f"GenerateConfig.span must be 'inference' or 'train', got {self.span!r}")
        if self.temperature <= 0 and self.k > 1:
            warnings.warn(
                f"GenerateConfig: temperature={self.temperature} <= 0 is greedy decoding, so all "
                f"k={self.k} samples are identical; set temperature > 0 (e.g. 0.6) for best-of-N",
                UserWarning, stacklevel=3,
            )

    @property
    def capture_token_stats(self) -> bool:
        """Whether decoding records per-token stats (``token_stats``, None = ``score``)."""
        return bool(self.score if self.token_stats is None else self.token_stats)

    @property
    def rows_per_chunk(self) -> int:
        return self.k if self.chunk_size == 0 else min(self.chunk_size, self.k)

    @classmethod
    def from_dict(cls, data: dict | None) -> "GenerateConfig":
        return from_dict(cls, data)


# -------------------------------------------------------------------- results
@dataclass
class Trajectory:
    """One sampled response. ``token_ids`` generated ids; ``step_positions`` into
    ``prompt_ids + token_ids``; ``step_scores`` sigmoid of the head logit there;
    ``scores`` {aggregator: float in [0, 1]}.

    Training-free self-signals (empty when generated without ``token_stats``):
    ``token_logprobs`` / ``token_self_certainty`` / ``token_confidence`` are
    aligned with ``token_ids`` (element i is for ``token_ids[i]``, EOS included;
    see :func:`token_stats`); ``signals`` = :func:`trajectory_signals` of them:
    ``mean_logprob``, ``self_certainty``, ``deepconf`` (higher = more confident;
    -inf for an empty response, never NaN)."""

    text: str
    token_ids: list[int]
    step_positions: list[int]
    step_scores: list[float]
    scores: dict[str, float]
    answer: str | None
    correct: bool
    first_wrong_step: int | None
    n_steps: int
    hit_max_tokens: bool
    prompt_len: int = 0
    token_logprobs: list[float] = field(default_factory=list)
    token_self_certainty: list[float] = field(default_factory=list)
    token_confidence: list[float] = field(default_factory=list)
    signals: dict[str, float] = field(default_factory=dict)


@dataclass
class ProblemSamples:
    """The k trajectories of one problem, plus timing (seconds)."""

    problem: Any
    trajectories: list[Trajectory]
    gen_seconds: float = 0.0

    @property
    def n_max_tokens_no_answer(self) -> int:
        return sum(1 for t in self.trajectories if t.hit_max_tokens and t.answer is None)


# ------------------------------------------------------------------- sampling
def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None, probe: int = 64) -> torch.Tensor:
    """Sample token ids (R,) from next-token ``logits`` (R, V).

    ``temperature <= 0`` is argmax. Top-p keeps the smallest prefix of the
    probability-sorted vocabulary whose mass reaches ``top_p`` (a token is dropped
    when the mass *before* it is already >= top_p; the top token is always kept).

    Speed: a full (R, V) sort costs milliseconds on CPU, so the nucleus is first
    looked for among the ``probe`` most likely tokens (``topk``); when their mass
    reaches ``top_p`` in every row the nucleus lies inside them and the result is
    exactly the full-sort rule. Otherwise it falls back to a full sort.
    """
    return _sample_next(logits, temperature, top_p, generator, probe)[0]


def _sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None, probe: int = 64,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`sample_next`, plus the indices (R, K) of the K most likely tokens in
    descending order that the top-p rule sorted (None when it sorted none: greedy
    or top_p = 1). Temperature keeps the order, so they are the raw logits' top-K
    too, which :func:`token_stats` reuses instead of a second topk."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1), None
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1), None
    V = probs.shape[-1]
    K = min(max(1, probe), V)
    while True:
        vals, idx = probs.topk(K, dim=-1)                       # (R, K) descending
        if K == V or bool((vals.sum(-1) >= top_p).all()):
            break
        K = V
    drop = (vals.cumsum(-1) - vals) >= top_p
    vals = vals.masked_fill(drop, 0.0)
    choice = torch.multinomial(vals, 1, generator=generator)
    return idx.gather(-1, choice).squeeze(-1), idx


def token_stats(logits: torch.Tensor, ids: torch.Tensor, topk: int = 20,
                top_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Self-signals of tokens ``ids`` (...) sampled from RAW next-token ``logits``
    (..., V) (temperature 1, before top-p). Returns (3, ...) float32:

    0. ``logprob`` = log p(id);
    1. ``self_certainty`` = KL(Uniform || p) = -log V - (1/V) sum_j log p_j
       (Kang et al. 2025; >= 0, higher = more certain);
    2. ``confidence`` = -(1/k) sum over the top-k tokens of log p, k = ``topk``
       (DeepConf token confidence, Fu et al. 2025; higher = more confident).

    One log_softmax over the vocabulary and one topk, vectorised over rows.
    ``top_idx`` (..., >= k): indices of the most likely tokens in descending
    order, already known from sampling (:func:`_sample_next`); then no topk runs.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)                   # (..., V)
    V = logp.shape[-1]
    k = min(int(topk), V)
    lp = logp.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)          # (...)
    sc = -logp.mean(dim=-1) - math.log(V)                               # (...)
    if top_idx is not None and top_idx.shape[-1] >= k:
        top = logp.gather(-1, top_idx[..., :k])                         # (..., k)
    else:
        top = logp.topk(k, dim=-1).values                               # (..., k)
    cf = -top.mean(dim=-1)                                              # (...)
    return torch.stack([lp, sc, cf])                                    # (3, ...)


SIGNALS = ("mean_logprob", "self_certainty", "deepconf")


def trajectory_signals(logprobs: Sequence[float], self_certainty: Sequence[float],
                       confidence: Sequence[float], window: int = 16) -> dict[str, float]:
    """Trajectory-level self-signals from its per-token stats (higher = more confident):

    * ``mean_logprob``: mean token log-prob;
    * ``self_certainty``: mean token self-certainty;
    * ``deepconf``: DeepConf lowest group confidence, the minimum over sliding
      windows of ``window`` consecutive tokens (stride 1) of the mean token
      confidence; a response shorter than ``window`` is one group.

    An empty response gets -inf for all three (never NaN).
    """
    if not logprobs:
        return {s: -math.inf for s in SIGNALS}
    conf = torch.tensor(list(confidence), dtype=torch.float64)          # (n,)
    w = min(int(window), conf.numel())
    groups = conf.unfold(0, w, 1).mean(dim=-1)                          # (n - w + 1,)
    return {"mean_logprob": float(sum(logprobs) / len(logprobs)),
            "self_certainty": float(sum(self_certainty) / len(self_certainty)),
            "deepconf": float(groups.min())}


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(_backbone(model), "generation_config", None), "eos_token_id", None)):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return ids


def _pad_id(tokenizer: Any, eos: set[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = min(eos) if eos else 0
    return int(pad)


def _backbone(model: Any) -> Any:
    return getattr(model, "backbone", model)


def _context_len(model: Any) -> int | None:
    from .sprm import backbone_config

    return getattr(backbone_config(_backbone(model)), "max_position_embeddings", None)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's token ids exactly as the engine feeds them (special tokens added)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device: Any = None):
    """Right-pad token id lists into a batch: ``(ids, attention_mask, lens)`` with
    ``ids`` and ``attention_mask`` (B, L) long (1 on real tokens), ``lens`` (B,)."""
    lens = torch.tensor([len(s) for s in sequences], device=device)
    L = int(lens.max())
    ids = torch.full((len(sequences), L), pad_id, dtype=torch.long, device=device)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    attn = (torch.arange(L, device=device)[None, :] < lens[:, None]).long()
    return ids, attn, lens


def _cache_kw(backbone: Any) -> str:
    """Name of the KV-cache argument: ``cache`` (transformers >= 5.2x) or the older
    ``past_key_values`` (inspected on the base model, through a peft wrapper)."""
    import inspect

    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out: Any) -> Any:
    """The KV cache of a model output (``cache`` or legacy ``past_key_values``)."""
    if isinstance(out, dict) and "cache" in out.keys():
        return out["cache"]
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _device(model: Any) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# -------------------------------------------------------------- core decoding
@dataclass
class _Chunk:
    """Decoded rows of one chunk: ``ids`` (R, P+T) padded; ``lengths`` (R,) full
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


def resolve_head_mode(cfg: GenerateConfig, hidden_size: int, prompt_len: int) -> str:
    """``per_step`` or ``deferred`` for ``cfg.head_mode`` (auto: by buffer size)."""
    if cfg.head_mode != "auto":
        return cfg.head_mode
    mb = cfg.rows_per_chunk * (prompt_len + cfg.max_new_tokens) * hidden_size * 4 / 2 ** 20
    return "deferred" if mb <= cfg.feature_buffer_mb else "per_step"


def _needs_last_hidden(read_at: str) -> bool:
    return read_at != "before_step_token"


@torch.inference_mode()
def decode_chunks(model: Any, prompt_ids: Sequence[int], cfg: GenerateConfig, *,
                  eos: set[int], pad_id: int, generator: torch.Generator | None = None,
                  ) -> list[_Chunk]:
    """Prefill ``prompt_ids`` once, then decode ``cfg.k`` rows in chunks.

    ``model`` is a :class:`~metastone_lab.sprm.ReflectiveModel` (or a bare causal
    LM when ``cfg.score`` is False). Returns one :class:`_Chunk` per chunk.
    """
    backbone = _backbone(model)
    device = _device(backbone)
    score = cfg.score
    P = len(prompt_ids)
    T = cfg.max_new_tokens
    feed_last = score and _needs_last_hidden(cfg.read_at)
    mode = resolve_head_mode(cfg, int(getattr(model, "hidden_size", 0) or 0), P) if score else ""
    conf_head = score and bool(getattr(model, "uses_confidence", False))
    if conf_head:
        # the confidence head reads per-step token stats: keep the features until the
        # step mask is known (deferred), and record the stats it needs
        mode = "deferred"
    fl = getattr(model, "feature_layer", -2)
    stats = cfg.capture_token_stats or conf_head
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache_kw = _cache_kw(backbone)
    out = backbone(input_ids=prompt, use_cache=True, output_hidden_states=score,
                   logits_to_keep=1)
    prefill_cache = _out_cache(out)
    prefill_logits = out.logits[:, -1, :]                      # (1, V)
    if not bool(torch.isfinite(prefill_logits).all()):  # one cheap check per problem
        raise NumericsError(
            f"the backbone's next-token logits after the {P}-token prompt contain NaN/inf: its "
            f"weights are corrupt or diverged, or the dtype overflows (fp16?); load an earlier "
            f"checkpoint or run in float32")
    prefill_head = prefill_feats = None
    if mode == "per_step":
        prefill_head = model.head_logits_from_hidden(out.hidden_states)[0]        # (P,)
    elif mode == "deferred":
        prefill_feats = out.hidden_states[fl][0]                                 # (P, C)
    del out

    chunks: list[_Chunk] = []
    remaining = cfg.k
    while remaining > 0:
        R = min(cfg.rows_per_chunk, remaining)
        remaining -= R
        cache = copy.deepcopy(prefill_cache)
        cache.batch_repeat_interleave(R)
        ids = torch.full((R, P + T), pad_id, dtype=torch.long, device=device)
        ids[:, :P] = prompt
        head = feats = None
        if mode == "per_step":
            head = torch.full((R, P + T), float("nan"), dtype=torch.float32, device=device)
            head[:, :P] = prefill_head
        elif mode == "deferred":
            feats = torch.full((R, P + T, prefill_feats.shape[-1]), float("nan"),
                               dtype=prefill_feats.dtype, device=device)
            feats[:, :P] = prefill_feats
        stat_buf = None
        if stats:   # [logprob, self_certainty, confidence] of the token at each column
            stat_buf = torch.full((3, R, P + T), float("nan"), dtype=torch.float32,
                                  device=device)                                # (3, R, P+T)
        lengths = torch.full((R,), P + T, dtype=torch.long, device=device)
        hit_max = torch.ones(R, dtype=torch.bool, device=device)
        rows = torch.arange(R, device=device)        # chunk row of each cache row
        logits = prefill_logits.expand(R, -1)
        eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=device) if eos else None
        for t in range(T):
            nxt, top = _sample_next(logits, cfg.temperature, cfg.top_p, generator)  # (rows,)
            ids[rows, P + t] = nxt
            if stat_buf is not None:   # from the raw logits that sampled nxt (no second pass)
                stat_buf[:, rows, P + t] = token_stats(logits, nxt, cfg.deepconf_topk,
                                                       top)                     # (3, rows)
            if eos_t is not None and not cfg.ignore_eos:
                done = torch.isin(nxt, eos_t)
            else:
                done = torch.zeros_like(nxt, dtype=torch.bool)
            if done.any():
                lengths[rows[done]] = P + t + 1
                hit_max[rows[done]] = False
            last = t == T - 1
            if last and not feed_last:
                break
            # rows to feed: unfinished ones (+ finished ones once more if their
            # final token's hidden state is needed by the read mode)
            keep = torch.ones_like(done) if feed_last else ~done
            if last:
                keep = torch.ones_like(done)
            if not keep.any():
                break
            if not keep.all():
                cache.batch_select_indices(keep.nonzero().squeeze(-1))
                rows, nxt = rows[keep], nxt[keep]
                done = done[keep]
            out = backbone(input_ids=nxt[:, None], use_cache=True, output_hidden_states=score,
                           **{cache_kw: cache})
            if mode == "per_step":
                head[rows, P + t] = model.head_logits_from_hidden(out.hidden_states)[:, -1]
            elif mode == "deferred":
                feats[rows, P + t] = out.hidden_states[fl][:, -1]
            if last:
                break
            logits = out.logits[:, -1, :]
            cache = _out_cache(out)
            if feed_last and done.any():           # fed their final token; drop them now
                keep = ~done
                if not keep.any():
                    break
                cache.batch_select_indices(keep.nonzero().squeeze(-1))
                rows, logits = rows[keep], logits[keep]
            del out
        Lmax = int(lengths.max())
        stat_buf = [None] * 3 if stat_buf is None else stat_buf[:, :, :Lmax]   # (3, R, Lmax)
        chunks.append(_Chunk(ids=ids[:, :Lmax], lengths=lengths,
                             head=None if head is None else head[:, :Lmax], hit_max=hit_max,
                             feats=None if feats is None else feats[:, :Lmax],
                             tok_logprob=stat_buf[0], tok_self_certainty=stat_buf[1],
                             tok_confidence=stat_buf[2]))
    return chunks


# ----------------------------------------------------------------- step reading
def _step_mask(ids: torch.Tensor, lengths: torch.Tensor, tokenizer: Any, cfg: GenerateConfig,
               prompt_len: int | None) -> torch.Tensor:
    """(R, L) bool step mask of right-padded ``ids`` with the configured segmenter."""
    from .steps import step_mask

    L = ids.shape[1]
    attn = (torch.arange(L, device=ids.device)[None, :] < lengths[:, None]).long()
    kw = dict(cfg.segmenter_options)
    if prompt_len is not None:
        kw["response_start"] = prompt_len
    mask = step_mask(ids, tokenizer, cfg.segmenter, span=cfg.span, read_at=cfg.read_at,
                     attention_mask=attn, **kw)
    return mask.bool() & attn.bool()


@torch.inference_mode()
def finish_chunk(model: Any, chunk: _Chunk, tokenizer: Any, cfg: GenerateConfig,
                 prompt_len: int) -> torch.Tensor:
    """Compute the step mask (R, L) of a decoded chunk and make sure ``chunk.head``
    holds the head logits at every masked position (deferred mode: the head is
    applied here, only to the masked positions' stored features)."""
    from .sprm import scale_grad

    mask = _step_mask(chunk.ids, chunk.lengths, tokenizer, cfg, prompt_len)
    if chunk.head is None and chunk.feats is not None:
        head = torch.full(mask.shape, float("nan"), dtype=torch.float32, device=mask.device)
        if mask.any():
            f = chunk.feats[mask]                                        # (n_steps, C)
            st = None
            if getattr(model, "uses_confidence", False):
                from .confidence import TOPK

                if cfg.deepconf_topk != TOPK:
                    raise ConfigError(
                        f"GenerateConfig.deepconf_topk={cfg.deepconf_topk}: a confidence head was "
                        f"trained on the top-{TOPK} DeepConf confidence; keep deepconf_topk={TOPK} "
                        f"when scoring with head_inputs={model.head_inputs!r}")
                if chunk.tok_logprob is None:
                    raise RuntimeError("the confidence head needs the decoder's token stats "
                                       "(please report this bug)")
                st = torch.stack([chunk.tok_logprob, chunk.tok_self_certainty,
                                  chunk.tok_confidence])                # (3, R, L)
            head[mask] = model.step_head_logits(scale_grad(f, model.grad_scale), mask, stats=st,
                                                response_start=prompt_len,
                                                lookahead=lookahead(cfg.read_at))
        chunk.head = head
        chunk.feats = None
    return mask


def _aggregators(cfg: GenerateConfig) -> list[str]:
    from . import scoring

    names = cfg.aggregators if cfg.aggregators is not None else scoring.AGGREGATORS.names()
    for n in names:
        scoring.AGGREGATORS.get(n)   # clear UnknownNameError listing the valid ones
    return list(names)


def _trajectory_scores(head: torch.Tensor, mask: torch.Tensor,
                       aggregators: Sequence[str]) -> dict[str, torch.Tensor]:
    from . import scoring

    logits = torch.nan_to_num(head, nan=0.0)
    return {a: scoring.aggregate(logits, mask, method=a) for a in aggregators}


def _build_trajectories(chunk: _Chunk, mask: torch.Tensor | None, prompt_len: int,
                        tokenizer: Any, problem: Any, task: Any, eos: set[int], pad_id: int,
                        aggregators: Sequence[str], read_at: str = "",
                        deepconf_window: int = 16) -> list[Trajectory]:
    scores = _trajectory_scores(chunk.head, mask, aggregators) if mask is not None else {}
    if mask is not None and chunk.head is not None:
        read = chunk.head.masked_fill(~mask, 0.0)
        bad = torch.isnan(read).any(dim=1)
        if bad.any():
            raise RuntimeError(
                "in-flight scoring read a position whose hidden state was not computed; "
                f"read_at={read_at!r} (please report this bug)")
    out = []
    skip = set(eos) | {pad_id}
    for r in range(chunk.ids.shape[0]):
        L = int(chunk.lengths[r])
        gen = chunk.ids[r, prompt_len:L].tolist()
        text = tokenizer.decode([i for i in gen if i not in skip], skip_special_tokens=False)
        if mask is not None:
            pos = mask[r].nonzero().squeeze(-1)
            step_pos = pos.tolist()
            step_scores = torch.sigmoid(chunk.head[r, pos]).tolist()
            traj_scores = {a: float(v[r]) for a, v in scores.items()}
        else:
            step_pos, step_scores, traj_scores = [], [], {}
        stats: dict[str, Any] = {}
        if chunk.tok_logprob is not None:
            lp, sc, cf = (x[r, prompt_len:L].tolist() for x in
                          (chunk.tok_logprob, chunk.tok_self_certainty, chunk.tok_confidence))
            stats = dict(token_logprobs=lp, token_self_certainty=sc, token_confidence=cf,
                         signals=trajectory_signals(lp, sc, cf, deepconf_window))
        answer = task.extract_answer(text) if task is not None else None
        correct = bool(task.is_correct(text, problem)) if task is not None else False
        fws = task.first_wrong_step(text, problem) if task is not None else None
        out.append(Trajectory(
            text=text, token_ids=gen, step_positions=step_pos, step_scores=step_scores,
            scores=traj_scores, answer=answer, correct=correct, first_wrong_step=fws,
            n_steps=len(step_pos), hit_max_tokens=bool(chunk.hit_max[r]), prompt_len=prompt_len,
            **stats,
        ))
    return out


def _check_context(model: Any, prompt_len: int, cfg: GenerateConfig, pid: Any) -> None:
    ctx = _context_len(model)
    if ctx is None:
        return
    if prompt_len > ctx:
        raise ShapeError(
            f"problem {pid!r}: the prompt is {prompt_len} tokens but the model context "
            f"(max_position_embeddings) is {ctx}; shorten the prompt or use a longer-context backbone"
        )
    if prompt_len + cfg.max_new_tokens > ctx:
        warnings.warn(
            f"problem {pid!r}: prompt {prompt_len} + max_new_tokens {cfg.max_new_tokens} exceeds "
            f"the model context {ctx}; positions past {ctx} are extrapolated",
            UserWarning, stacklevel=3,
        )


# ------------------------------------------------------------------ public API
def generate_best_of_n(model: Any, tokenizer: Any, problems: Sequence[Any], task: Any,
                       cfg: GenerateConfig | dict | None = None) -> list[ProblemSamples]:
    """Sample ``cfg.k`` trajectories per problem and score their steps in flight.

    ``model``: a :class:`~metastone_lab.sprm.ReflectiveModel` (its head is applied
    to ``model.feature_layer``). ``problems``: objects with ``prompt`` (and ``id``);
    ``task``: judges text (``extract_answer``, ``is_correct``, ``first_wrong_step``)
    or None. The model is put in eval mode (dropout off) for the call and restored.
    """
    if cfg is None or isinstance(cfg, dict):
        cfg = from_dict(GenerateConfig, cfg or {})
    if cfg.score and not hasattr(model, "head_logits_from_hidden"):
        raise ConfigError(
            f"generate_best_of_n: scoring needs a ReflectiveModel (got {type(model).__name__}); "
            f"wrap the backbone with metastone_lab.sprm.ReflectiveModel or set score=False"
        )
    aggs = _aggregators(cfg) if cfg.score else []
    eos = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, eos)
    was_training = model.training
    model.eval()
    results = []
    n_tok, t_all = 0, time.perf_counter()
    try:
        for pi, problem in enumerate(problems):
            threads.rebalance()  # share the cores with metastone-lab jobs started since
            prompt_ids = encode_prompt(tokenizer, problem.prompt)
            _check_context(model, len(prompt_ids), cfg, getattr(problem, "id", pi))
            gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed) * 1_000_003 + pi)
            t0 = time.perf_counter()
            chunks = decode_chunks(model, prompt_ids, cfg, eos=eos, pad_id=pad_id, generator=gen)
            seconds = time.perf_counter() - t0
            trajs: list[Trajectory] = []
            for ch in chunks:
                mask = finish_chunk(model, ch, tokenizer, cfg, len(prompt_ids)) \
                    if cfg.score else None
                trajs += _build_trajectories(ch, mask, len(prompt_ids), tokenizer, problem, task,
                                             eos, pad_id, aggs, cfg.read_at, cfg.deepconf_window)
            results.append(ProblemSamples(problem=problem, trajectories=trajs,
                                          gen_seconds=seconds))
            n_tok += sum(len(t.token_ids) for t in trajs)
            progress.report("sampling", pi + 1, len(problems), "problems",
                            tok_per_s=round(n_tok / max(time.perf_counter() - t_all, 1e-9)))
    finally:
        model.train(was_training)
    return results


@torch.inference_mode()
def reforward_scores(model: Any, tokenizer: Any, sequences: Sequence[Sequence[int]], *,
                     segmenter: str = "reference", read_at: str = "before_step_token",
                     span: str = "inference", segmenter_options: dict | None = None,
                     prompt_lens: Sequence[int] | None = None, batch_size: int = 32,
                     pad_id: int | None = None) -> list[dict[str, list]]:
    """The reference scoring method: one forward over each finished sequence.

    ``sequences`` are full token id lists (prompt + response). Sequences are
    right-padded into batches of ``batch_size``; the step mask is computed with
    :func:`metastone_lab.steps.step_mask` and the head logits read where it is
    True. Returns per sequence ``{"positions": [...], "logits": [...], "scores": [...]}``.
    """
    cfg = GenerateConfig(k=1, segmenter=segmenter, read_at=read_at, span=span,
                         segmenter_options=dict(segmenter_options or {}))
    if pad_id is None:
        pad_id = _pad_id(tokenizer, _eos_ids(model, tokenizer))
    device = _device(model)
    was_training = model.training
    model.eval()
    out: list[dict[str, list]] = []
    try:
        for b in range(0, len(sequences), batch_size):
            batch = [list(s) for s in sequences[b:b + batch_size]]
            ids, attn, lens = pad_right(batch, pad_id, device)
            plen = None
            if prompt_lens is not None:
                pl = set(prompt_lens[b:b + batch_size])
                if len(pl) != 1:
                    # mixed prompt lengths: compute the mask per sequence
                    masks = [
                        _step_mask(ids[i:i + 1], lens[i:i + 1], tokenizer, cfg, prompt_lens[b + i])[0]
                        for i in range(len(batch))
                    ]
                    mask = torch.stack(masks)
                else:
                    plen = pl.pop()
                    mask = _step_mask(ids, lens, tokenizer, cfg, plen)
            else:
                mask = _step_mask(ids, lens, tokenizer, cfg, None)
            if getattr(model, "uses_confidence", False):
                if prompt_lens is None:
                    raise ConfigError("reforward_scores: a head with head_inputs="
                                      f"{model.head_inputs!r} reads the response's token stats; "
                                      "pass prompt_lens= (where each response starts)")
                starts = torch.tensor(list(prompt_lens[b:b + batch_size]))
                res = model(ids, attention_mask=attn, step_mask=mask, response_start=starts,
                            lookahead=lookahead(cfg.read_at))
            else:
                res = model(ids, attention_mask=attn)
            for i in range(len(batch)):
                pos = mask[i].nonzero().squeeze(-1)
                lg = res.step_logits[i, pos].float()
                out.append({"positions": pos.tolist(), "logits": lg.tolist(),
                            "scores": torch.sigmoid(lg).tolist()})
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------- evaluation
def evaluate(samples: Sequence[ProblemSamples], *, aggregator: str = "geometric",
             selectors: Sequence[str] | None = None, ks: Sequence[int] | None = None,
             val_samples: Sequence[ProblemSamples] | None = None, n_boot: int = 1000,
             seed: int = 0, log: bool = True, table_name: str = "bon_eval.json"):
    """Metric tables for best-of-N samples (tidy DataFrame, ``metrics.TABLE_COLUMNS``).

    Rows: accuracy of every selector at every k (``selectors=None``: all
    registered ones, the self-signal ones only when the samples have
    ``signals``; reference grouping + bootstrap
    CI, plus unbiased ``pass@k``), trajectory AUROC / ECE for every aggregator,
    the count of max-token trajectories without an answer and, when
    ``val_samples`` carry step labels, ProcessBench step F1 (threshold chosen on
    ``val_samples``, reported on ``samples``). If ``metastone_lab.tracking`` is
    importable and ``log``, the table goes to ``tracking.active().log_table``.
    """
    import pandas as pd

    from . import metrics
    from .select import SELECTORS, usable_selectors

    groups = [s.trajectories for s in samples]
    if selectors is not None:
        names = list(selectors)
    else:   # all; self-signal selectors only when the samples carry their signals
        names = usable_selectors(groups[0][0]) if groups and groups[0] else SELECTORS.names()
    sel = {n: SELECTORS.get(n) for n in names}
    aggs = sorted(groups[0][0].scores) if groups and groups[0] else []
    parts = [metrics.accuracy_vs_k(groups, sel, ks, aggregator=aggregator, n_boot=n_boot,
                                   seed=seed)]
    if aggs:
        parts.append(metrics.trajectory_metrics(groups, aggs, n_boot=n_boot, seed=seed))
    if val_samples is not None:
        def flat(ss):
            ts = [t for s in ss for t in s.trajectories if t.first_wrong_step is not None]
            return [t.step_scores for t in ts], [t.first_wrong_step for t in ts]
        vs, vl = flat(val_samples)
        ts_, tl = flat(samples)
        if vl and tl:
            parts.append(metrics.step_f1_table(vs, vl, ts_, tl))
    table = pd.concat(parts, ignore_index=True)
    if log:
        _log_table(table, table_name)
    return table


def _log_table(table: Any, name: str) -> None:
    try:
        from . import tracking
    except ImportError:
        return
    tracker = tracking.active()
    if tracker is not None and hasattr(tracker, "log_table"):
        tracker.log_table(table, name)


# ------------------------------------------------------------------- backends
BACKENDS: Registry = Registry("generation backend")
BACKENDS.register("native")(generate_best_of_n)


@BACKENDS.register("vllm")
def generate_best_of_n_vllm(model: Any, tokenizer: Any, problems: Sequence[Any], task: Any,
                            cfg: GenerateConfig | dict | None = None, *, model_path: str | None = None,
                            llm: Any = None, score_batch_size: int = 32,
                            **llm_kwargs: Any) -> list[ProblemSamples]:
    """GPU scale-out: sample with vLLM, score with a batched re-forward.

    vLLM cannot expose the hidden states of sampled tokens, so step scores come
    from :func:`reforward_scores` through ``model`` (the shared backbone + head;
    the reference's two-pass method, batched). ``llm``: an existing
    ``vllm.LLM``; otherwise one is built from ``model_path`` (a local HF
    directory holding the same weights as ``model``). Install with
    ``pip install 'metastone-lab[vllm]'`` (Linux + CUDA). Not used on CPU.
    """
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the 'vllm' generation backend needs the vllm package, which is not installed; "
            "install it on a CUDA machine with pip install 'metastone-lab[vllm]', or use the "
            "'native' backend (generate_best_of_n)"
        ) from None
    if cfg is None or isinstance(cfg, dict):
        cfg = from_dict(GenerateConfig, cfg or {})
    if llm is None:
        if model_path is None:
            raise ConfigError("vllm backend: pass llm=vllm.LLM(...) or model_path=<local HF dir>")
        llm = vllm.LLM(model=str(model_path), seed=cfg.seed, **llm_kwargs)
    params = vllm.SamplingParams(n=cfg.k, temperature=max(cfg.temperature, 0.0), top_p=cfg.top_p,
                                 max_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                 ignore_eos=cfg.ignore_eos)
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    eos = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, eos)
    aggs = _aggregators(cfg)
    results = []
    for problem, pids, ro in zip(problems, prompts, outs):
        seqs = [list(pids) + list(c.token_ids) for c in ro.outputs]
        P = len(pids)
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in seqs])
        rf = reforward_scores(model, tokenizer, seqs, segmenter=cfg.segmenter, read_at=cfg.read_at,
                              span=cfg.span, segmenter_options=cfg.segmenter_options,
                              prompt_lens=[P] * len(seqs), batch_size=score_batch_size,
                              pad_id=pad_id)
        head = torch.zeros(len(seqs), L)
        mask = torch.zeros(len(seqs), L, dtype=torch.bool)
        for i, r in enumerate(rf):
            head[i, r["positions"]] = torch.tensor(r["logits"])
            mask[i, r["positions"]] = True
        hit = torch.tensor([c.finish_reason == "length" for c in ro.outputs])
        ch = _Chunk(ids=ids, lengths=lengths, head=head, hit_max=hit)
        results.append(ProblemSamples(problem, _build_trajectories(
            ch, mask, P, tokenizer, problem, task, eos, pad_id, aggs)))
    return results


__all__ = [
    "GenerateConfig", "Trajectory", "ProblemSamples", "generate_best_of_n", "reforward_scores",
    "evaluate", "sample_next", "decode_chunks", "BACKENDS", "generate_best_of_n_vllm",
    "DEFAULT_EFFORT_MAP", "pad_right", "token_stats", "trajectory_signals", "SIGNALS",
]
