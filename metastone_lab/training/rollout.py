"""Rollouts: sample ``n`` trajectories per prompt from the current policy,
judge them with the task verifier, and pack them into a right-padded training
batch (:class:`RolloutBatch`).

Sampling is the project's one loop, :func:`metastone_lab.sampling.sample`: the
prompt encoding, EOS rule and top-p of the evaluation engine, drawing from the
global torch RNG (so checkpoints that save the RNG make runs reproducible).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .grpo import group_advantages


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
    from ..sampling import pad_right

    ids, attn, lens = pad_right([list(p) + list(r) for p, r in zip(prompts, responses)], pad_id)
    if ids.shape[1] < 2:                       # at least one predicted position
        ids = torch.cat([ids, torch.full_like(ids, pad_id)], dim=1)
        attn = torch.cat([attn, torch.zeros_like(attn)], dim=1)
    L = ids.shape[1]
    tmask = torch.zeros((len(prompts), L - 1), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tmask[i, len(p) - 1:int(lens[i]) - 1] = True
    rw = torch.tensor([float(x) for x in rewards])
    corr = torch.tensor([bool(c) for c in (correct if correct is not None else
                                           [x > 0.5 for x in rewards])])
    return RolloutBatch(ids, attn, torch.tensor([len(p) for p in prompts]), tmask, rw,
                        group_advantages(rw, n), corr, list(texts), list(first_wrong), n)


def rollout(model: Any, tokenizer: Any, task: Any, problems: Sequence[Any], *, n: int,
            temperature: float, max_new_tokens: int, top_p: float = 1.0) -> RolloutBatch:
    """Sample ``n`` trajectories for each problem, judge them, pack a batch. Prompts
    are encoded by :func:`metastone_lab.sampling.encode_prompt`, exactly as the
    evaluation engine feeds them (BOS included for tokenizers that add one)."""
    from .. import sampling

    eos = sampling.eos_ids(model, tokenizer)
    pad = sampling.pad_id_for(tokenizer, eos)
    p_ids = [sampling.encode_prompt(tokenizer, p.prompt) for p in problems]
    rep = [ids for ids in p_ids for _ in range(n)]
    resp = sampling.sample(model, rep, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, eos=eos, pad_id=pad)
    texts, correct, fw = [], [], []
    for j, r in enumerate(resp):
        prob = problems[j // n]
        text = tokenizer.decode([x for x in r if x not in eos], skip_special_tokens=True)
        texts.append(text)
        correct.append(bool(task.is_correct(text, prob)))
        fw.append(task.first_wrong_step(text, prob))
    return pack(rep, resp, [float(c) for c in correct], n=n, pad_id=pad, correct=correct,
                texts=texts, first_wrong=fw)
