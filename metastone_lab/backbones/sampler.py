"""A small batched temperature sampler with a KV cache, used to measure the
tiny backbone's pass@k right after its build. (The full generation engine with
in-flight SPRM scoring is ``metastone_lab.generate``.)

Prompts are grouped by token length, so no padding is needed: every row of a
batch shares its positions. Finished rows keep sampling but their tokens after
eos are dropped.
"""
from __future__ import annotations

from collections import defaultdict

import torch


@torch.no_grad()
def sample(model, prompts: list[list[int]], n: int, *, eos_id: int, max_new_tokens: int = 64,
           temperature: float = 0.8, batch_size: int = 512, seed: int = 0) -> list[list[list[int]]]:
    """``n`` samples for each prompt: ``out[i][j]`` = new token ids (eos excluded).

    Each forward call sees ``input_ids`` of shape (B, L) on the first step, then
    (B, 1) with the cache; logits (B, V) of the last position are sampled at
    ``temperature`` (0 = greedy).
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out: list[list[list[int]]] = [[None] * n for _ in prompts]  # type: ignore[list-item]
    groups: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, p in enumerate(prompts):
        for j in range(n):
            groups[len(p)].append((i, j))
    for length in sorted(groups):
        rows = groups[length]
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            ids = torch.tensor([prompts[i] for i, _ in chunk], dtype=torch.long)
            new = _sample_batch(model, ids, eos_id, max_new_tokens, temperature, gen)
            for (i, j), seq in zip(chunk, new):
                out[i][j] = seq
    return out


def _cache_kwarg(model) -> str:
    """``cache`` (transformers >= 5.2x) or the older ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _sample_batch(model, ids: torch.Tensor, eos_id: int, max_new: int, temperature: float,
                  gen: torch.Generator) -> list[list[int]]:
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool)
    steps: list[torch.Tensor] = []
    cache_kw = _cache_kwarg(model)
    past = None
    x = ids
    for _ in range(max_new):
        o = model(input_ids=x, use_cache=True, logits_to_keep=1, **{cache_kw: past})
        past = getattr(o, cache_kw)
        logits = o.logits[:, -1, :].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        else:
            tok = logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, eos_id), tok)
        steps.append(tok)
        done |= tok == eos_id
        if bool(done.all()):
            break
        x = tok[:, None]
    mat = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(B)]
    return [row[: row.index(eos_id)] if eos_id in row else row for row in mat]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
