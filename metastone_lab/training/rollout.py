"""Rollouts: sample ``n`` trajectories per prompt from the current policy,
judge them with the task verifier, and pack them into a right-padded training
batch (:class:`RolloutBatch`).

The sampler is a small KV-cached loop over any ``transformers`` causal LM (or
peft model): left-padded prompts, temperature sampling from the global torch
RNG (so checkpoints that save the RNG make runs reproducible), stop at eos.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .grpo import group_advantages


def _cache_kwarg(model: Any) -> str:
    """``cache`` (transformers >= 5.2x) or the older ``past_key_values``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _past(out: Any) -> Any:
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


@torch.no_grad()
def sample(model: Any, prompts: Sequence[Sequence[int]], *, temperature: float,
           max_new_tokens: int, eos_id: int, pad_id: int,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """Sample one continuation per prompt (token id lists) -> response ids (eos kept
    when produced; at most ``max_new_tokens``)."""
    if not prompts:
        return []
    dev = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=dev)
    attn = torch.zeros((B, P), dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attn[i, P - len(p):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    cache_kw = _cache_kwarg(model)
    past, logits = _past(out), out.logits[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    toks: list[torch.Tensor] = []
    last_pos = pos[:, -1:]
    for t in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        toks.append(tok)
        finished |= tok == eos_id
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
        last_pos = last_pos + 1
        out = model(input_ids=tok.unsqueeze(-1), attention_mask=attn, position_ids=last_pos,
                    use_cache=True, **{cache_kw: past})
        past, logits = _past(out), out.logits[:, -1]
    gen = torch.stack(toks, dim=1).tolist()
    res = []
    for row in gen:
        r = []
        for x in row:
            r.append(x)
            if x == eos_id:
                break
        res.append(r)
    return res


@dataclass
class RolloutBatch:
    """A packed batch of B = G*n trajectories (right padded).

    input_ids, attention_mask: (B, L); response_start: (B,) index of the first
    response token; token_mask: (B, L-1) True where position t predicts a response
    token (t+1 in the response); rewards, advantages: (B,); correct: (B,) bool.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: torch.Tensor
    token_mask: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    correct: torch.Tensor
    texts: list[str] = field(default_factory=list)
    first_wrong: list[int | None] = field(default_factory=list)
    n: int = 1

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_response_tokens(self) -> int:
        return int(self.token_mask.sum())

    def rows(self, idx: Sequence[int] | slice) -> "RolloutBatch":
        """A sub-batch (e.g. one data-parallel shard); advantages are kept as computed."""
        if isinstance(idx, slice):
            idx = list(range(len(self)))[idx]
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        L = int(self.attention_mask[ix].sum(-1).max()) if len(ix) else 1
        return RolloutBatch(
            self.input_ids[ix, :L], self.attention_mask[ix, :L], self.response_start[ix],
            self.token_mask[ix, :L - 1], self.rewards[ix], self.advantages[ix], self.correct[ix],
            [self.texts[i] for i in idx] if self.texts else [],
            [self.first_wrong[i] for i in idx] if self.first_wrong else [], self.n)

    def to(self, device: Any) -> "RolloutBatch":
        t = {k: getattr(self, k).to(device) for k in
             ("input_ids", "attention_mask", "response_start", "token_mask", "rewards",
              "advantages", "correct")}
        return RolloutBatch(**t, texts=self.texts, first_wrong=self.first_wrong, n=self.n)


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
         rewards: Sequence[float], *, n: int, pad_id: int, correct: Sequence[bool] | None = None,
         texts: Sequence[str] = (), first_wrong: Sequence[int | None] = ()) -> RolloutBatch:
    """Pack prompt/response id lists (the n samples of a prompt contiguous) into a batch
    and compute group-normalised advantages."""
    B = len(prompts)
    lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    L = max(max(lens), 2)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    tmask = torch.zeros((B, L - 1), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[i, :len(seq)] = 1
        tmask[i, len(p) - 1:len(seq) - 1] = True
    rw = torch.tensor([float(x) for x in rewards])
    corr = torch.tensor([bool(c) for c in (correct if correct is not None else
                                           [x > 0.5 for x in rewards])])
    return RolloutBatch(ids, attn, torch.tensor([len(p) for p in prompts]), tmask, rw,
                        group_advantages(rw, n), corr, list(texts), list(first_wrong), n)


def rollout(model: Any, tokenizer: Any, task: Any, problems: Sequence[Any], *, n: int,
            temperature: float, max_new_tokens: int) -> RolloutBatch:
    """Sample ``n`` trajectories for each problem, judge them, pack a batch. Prompts
    are encoded by :func:`metastone_lab.generate.encode_prompt`, exactly as the
    evaluation engine feeds them (BOS included for tokenizers that add one)."""
    from ..generate import encode_prompt

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    p_ids = [encode_prompt(tokenizer, p.prompt) for p in problems]
    rep = [ids for ids in p_ids for _ in range(n)]
    resp = sample(model, rep, temperature=temperature, max_new_tokens=max_new_tokens,
                  eos_id=eos, pad_id=pad)
    texts, correct, fw = [], [], []
    for j, r in enumerate(resp):
        prob = problems[j // n]
        text = tokenizer.decode([x for x in r if x != eos], skip_special_tokens=True)
        texts.append(text)
        correct.append(bool(task.is_correct(text, prob)))
        fw.append(task.first_wrong_step(text, prob))
    return pack(rep, resp, [float(c) for c in correct], n=n, pad_id=pad, correct=correct,
                texts=texts, first_wrong=fw)
