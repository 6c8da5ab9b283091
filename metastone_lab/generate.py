"""Best-of-N generation with SPRM step scores computed **during** generation.

The reference scores each finished trajectory with a second forward pass
(method.md §6). Here the backbone is shared, so the hidden states the SPRM head
needs are already computed while decoding:

1. The prompt is prefilled **once** (batch 1; once per chunk when ``chunk_size``
   < k); its KV cache is copied and expanded to the chunk's rows
   (``DynamicCache.batch_repeat_interleave``).
   By default the batched engine (:mod:`metastone_lab.engine`) then decodes the
   k rows of many problems in one batch of at most ``max_batch_rows`` rows,
   refilled with waiting problems as rows end (``continuous_batching``);
   :func:`decode_chunks` below is the one-problem-at-a-time path
   (``max_batch_rows=0``, and ``bench inference``).
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

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from . import progress, sampling, threads
from .config import from_dict
from .confidence import lookahead
from .errors import ConfigError, ShapeError
from .engine import Chunk as _Chunk
from .engine import decode_batch, decode_stream, place_model, plan_batches
from .engine import resolve_head_mode  # re-exported (bench, tests): see __all__
from .evaluation import evaluate
from .generate_config import DEFAULT_EFFORT_MAP, GenerateConfig
from .prefix_cache import PrefixStore
from .prefix_ties import PrefixTies, share_prefix_values
from .registry import Registry
from .sampling import encode_prompt, pad_right, sample_next
from .token_signals import SIGNALS, token_stats, trajectory_signals


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
def _context_len(model: Any) -> int | None:
    from .sprm import backbone_config

    return getattr(backbone_config(sampling.base_model(model)), "max_position_embeddings", None)



# -------------------------------------------------------------- core decoding
def decode_chunks(model: Any, prompt_ids: Sequence[int], cfg: GenerateConfig, *,
                  eos: set[int], pad_id: int, generator: torch.Generator | None = None,
                  prefix_store: PrefixStore | None = None) -> list[_Chunk]:
    """One problem at a time (``max_batch_rows: 0``): its ``cfg.k`` rows in chunks of
    at most ``cfg.rows_per_chunk`` rows, each chunk one call of the engine
    (:func:`metastone_lab.engine.decode_batch` with one prompt: the prompt is
    prefilled once per chunk and its cache expanded to the chunk's rows), all
    chunks drawing in turn from ``generator``. Returns one :class:`_Chunk` per chunk.
    """
    chunks: list[_Chunk] = []
    remaining = cfg.k
    while remaining > 0:
        R = min(cfg.rows_per_chunk, remaining)
        remaining -= R
        chunks += decode_batch(model, [prompt_ids], cfg, eos=eos, pad_id=pad_id,
                               generators=[generator], rows_per_prompt=R,
                               prefix_store=prefix_store)
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
    if chunk.head is not None:  # equal in exact arithmetic over a shared prefix: equal here
        ties = chunk.ties if chunk.ties is not None else PrefixTies(chunk.ids)
        chunk.head = share_prefix_values(chunk.head, ties.sources(lookahead(cfg.read_at)))
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
def problem_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator problem ``index`` of a call samples from, seeded
    ``seed * 1_000_003 + index`` (independent of its batch)."""
    return torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + int(index))


def generate_best_of_n(model: Any, tokenizer: Any, problems: Sequence[Any], task: Any,
                       cfg: GenerateConfig | dict | None = None, *,
                       indices: Sequence[int] | None = None) -> list[ProblemSamples]:
    """Sample ``cfg.k`` trajectories per problem and score their steps in flight.

    ``model``: a :class:`~metastone_lab.sprm.ReflectiveModel` (its head is applied
    to ``model.feature_layer``). ``problems``: objects with ``prompt`` (and ``id``);
    ``task``: judges text (``extract_answer``, ``is_correct``, ``first_wrong_step``)
    or None. The model is put in eval mode (dropout off) for the call and restored
    (and moved / cast in place when ``cfg.device`` / ``cfg.dtype`` ask for it).

    Problems are decoded by the batched engine (:mod:`metastone_lab.engine`) with at
    most ``cfg.batch_rows`` rows in flight, a waiting problem joining as rows end
    (``continuous_batching``; False: fixed batches of whole problems), or one at a
    time in chunks of ``chunk_size`` rows when ``max_batch_rows == 0``. Problem i
    samples from its own generator, seeded ``seed * 1_000_003 + indices[i]``, whatever
    its batch; ``indices`` (default ``range(len(problems))``) are the problems' places
    in the full list when ``problems`` is one shard of it (:mod:`metastone_lab.shard`),
    so a shard samples the tokens those problems sample in the full run (bit for bit,
    scores included, with fixed batches of whole batches per shard). A problem whose
    prompt exceeds the model context fails alone: the others are decoded, then a
    ShapeError names the failed ids; its ``.results`` holds every problem's
    ProblemSamples (empty trajectories for the failed ones). ``gen_seconds`` of a
    problem decoded with others is their decode time / their number.
    """
    if cfg is None or isinstance(cfg, dict):
        cfg = from_dict(GenerateConfig, cfg or {})
    seed_index = list(range(len(problems)) if indices is None else indices)
    if len(seed_index) != len(problems):
        raise ConfigError(f"generate_best_of_n: {len(seed_index)} indices for {len(problems)} "
                          f"problems; pass one global index per problem (or none)")
    if cfg.score and not hasattr(model, "head_logits_from_hidden"):
        raise ConfigError(
            f"generate_best_of_n: scoring needs a ReflectiveModel (got {type(model).__name__}); "
            f"wrap the backbone with metastone_lab.sprm.ReflectiveModel or set score=False"
        )
    place_model(model, cfg)
    aggs = _aggregators(cfg) if cfg.score else []
    eos = sampling.eos_ids(model, tokenizer)
    pad_id = sampling.pad_id_for(tokenizer, eos)
    was_training = model.training
    model.eval()
    results: list[ProblemSamples | None] = [None] * len(problems)
    failed: list[str] = []
    prompts: dict[int, list[int]] = {}
    for pi, problem in enumerate(problems):
        ids = encode_prompt(tokenizer, problem.prompt)
        try:
            _check_context(model, len(ids), cfg, getattr(problem, "id", pi))
        except ShapeError as e:
            failed.append(str(e))
            results[pi] = ProblemSamples(problem=problem, trajectories=[])
            continue
        prompts[pi] = ids
    order = list(prompts)
    budget = cfg.batch_rows
    n_tok, done, t_all = 0, 0, time.perf_counter()
    store = PrefixStore()   # prompt blocks shared across this call's problems (prefix_cache)

    def seed_of(pi: int) -> torch.Generator:
        return problem_generator(cfg.seed, seed_index[pi])

    def finish(pi: int, chunks: list[_Chunk], seconds: float) -> None:
        nonlocal n_tok, done
        P = len(prompts[pi])
        trajs: list[Trajectory] = []
        for ch in chunks:
            mask = finish_chunk(model, ch, tokenizer, cfg, P) if cfg.score else None
            trajs += _build_trajectories(ch, mask, P, tokenizer, problems[pi], task, eos,
                                         pad_id, aggs, cfg.read_at, cfg.deepconf_window)
        results[pi] = ProblemSamples(problem=problems[pi], trajectories=trajs,
                                     gen_seconds=seconds)
        n_tok += sum(len(t.token_ids) for t in trajs)
        done += 1
        progress.report("sampling", done, len(order), "problems",
                        tok_per_s=round(n_tok / max(time.perf_counter() - t_all, 1e-9)))

    try:
        if budget == 0:                         # one problem at a time
            for pi in order:
                threads.rebalance()  # share the cores with metastone-lab jobs started since
                t0 = time.perf_counter()
                chunks = decode_chunks(model, prompts[pi], cfg, eos=eos, pad_id=pad_id,
                                       generator=seed_of(pi), prefix_store=store)
                finish(pi, chunks, time.perf_counter() - t0)
        elif not cfg.continuous_batching:       # fixed batches of whole problems
            for batch in plan_batches([cfg.k] * len(order), budget):
                threads.rebalance()
                t0 = time.perf_counter()
                chunks = decode_batch(model, [prompts[order[j]] for j in batch], cfg, eos=eos,
                                      pad_id=pad_id,
                                      generators=[seed_of(order[j]) for j in batch],
                                      prefix_store=store)
                seconds = (time.perf_counter() - t0) / len(batch)
                for j, ch in zip(batch, chunks):
                    finish(order[j], [ch], seconds)
        elif order:                             # continuous batching over all problems
            threads.rebalance()

            def on_chunk(j: int, ch: _Chunk) -> None:
                finish(order[j], [ch], 0.0)

            decode_stream(model, [prompts[pi] for pi in order], cfg, eos=eos, pad_id=pad_id,
                          generators=[seed_of(pi) for pi in order], on_chunk=on_chunk,
                          max_rows=budget, prefix_store=store)
            per = (time.perf_counter() - t_all) / len(order)
            for pi in order:
                results[pi].gen_seconds = per
    finally:
        model.train(was_training)
    out = [r for r in results if r is not None]
    if failed:
        err = ShapeError(f"{len(failed)} of {len(problems)} problems failed (the other "
                         f"{len(problems) - len(failed)} were decoded; see .results): "
                         + "; ".join(failed))
        err.results = out
        raise err
    return out


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
        pad_id = sampling.pad_id_for(tokenizer, sampling.eos_ids(model, tokenizer))
    device = sampling.device_of(model)
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
                starts = torch.tensor(list(prompt_lens[b:b + batch_size]), device=device)
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
    eos = sampling.eos_ids(model, tokenizer)
    pad_id = sampling.pad_id_for(tokenizer, eos)
    aggs = _aggregators(cfg)
    results = []
    for problem, pids, ro in zip(problems, prompts, outs):
        seqs = [list(pids) + list(c.token_ids) for c in ro.outputs]
        P = len(pids)
        ids, _, lengths = pad_right(seqs, pad_id)
        L = ids.shape[1]
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
    "resolve_head_mode", "problem_generator",
]
