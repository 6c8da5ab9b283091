"""Policy-confidence features of a reasoning step: the ``hidden+confidence`` and
``confidence`` heads.

A named deviation from the reference SPRM (method.md §1), off by default. The
reference head reads one hidden state per step. On the tiny ``arith`` backbone
that hidden state does not carry whether the step's token was one the model
would have written (docs/testbed.md: oracle-label probes rank a problem's own
samples at chance), while the policy's output distribution does. This module
gives the head what the decoder has already computed at every sampled token
(:func:`metastone_lab.token_signals.token_stats`, from the raw logits, no extra
forward) summarised over the step, next to the hidden state:

==================  ====================================================
``last_logprob``    g(log p) of the span's last token (the step token)
``min_logprob``     g(lowest token log p in the step)
``mean_logprob``    g(mean token log p in the step)
``self_certainty``  mean token KL(Uniform || p) in the step, / log V
``min_confidence``  lowest DeepConf token confidence in the step, / log V
==================  ====================================================

``g(lp) = -log(SURPRISE_FLOOR - lp)`` (monotone, higher = more confident) spreads
out log-probs near 0: a sampled token the policy gave p = 0.999 and one it gave
p = 0.9 differ by 0.001 vs 0.1 in log p, which a ReLU head initialised near 0
cannot tell apart (measured: a head on raw log-probs scored 72 of 100 problems'
best samples as exact ties), but by about 4.5 in g.

A step spans the response tokens after the previous step (or from the response
start) through its **step token**: the read position itself (``read_at:
step_token``), or the token after it (``before_step_token``, the reference read:
the step token was sampled from the logits at the read position, so its stats
are known when the mark is; ``lookahead = 1``, :func:`lookahead`). The
features are causal: everything they use was known when the step was marked.
For the conclusion mark (``steps.step_mask(conclusion=True)``) the step token is
the response's last token (the EOS), so a premature or unlikely end is seen. The
head stays self-supervised: it still learns from outcome labels only.

``head_inputs="confidence"`` is the ablation that drops the hidden state: the
head is then a small MLP on these features alone, which shows how much of a
``hidden+confidence`` head's ranking the hidden state contributes.
"""
from __future__ import annotations

import math

import torch

#: the features, in column order
CONFIDENCE_FEATURES = ("last_logprob", "min_logprob", "mean_logprob", "self_certainty",
                       "min_confidence")
N_CONFIDENCE = len(CONFIDENCE_FEATURES)
#: top-k of the DeepConf token confidence the head reads (GenerateConfig.deepconf_topk must match)
TOPK = 20
#: the smallest surprise ``-log p`` that :func:`step_features` resolves
SURPRISE_FLOOR = 1e-4


def _g(lp: torch.Tensor) -> torch.Tensor:
    """``-log(SURPRISE_FLOOR - lp)`` for log-probs ``lp <= 0``: higher = more confident."""
    return -torch.log(SURPRISE_FLOOR - lp.clamp_max(0.0))
#: ReflectiveModel.head_inputs values
HEAD_INPUTS = ("hidden", "hidden+confidence", "confidence")


def stats_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, topk: int = TOPK) -> torch.Tensor:
    """Token stats (3, B, L) of the tokens ``input_ids`` (B, L) under the LM ``logits``
    (B, L, V) of one forward: column ``q`` is for token ``q`` (predicted at ``q - 1``),
    column 0 is NaN. Same rows as :func:`token_signals.token_stats` (logprob, self-certainty,
    DeepConf confidence), so training reads what the decoder records."""
    from .token_signals import token_stats

    B, L = input_ids.shape
    out = torch.full((3, B, L), float("nan"), dtype=torch.float32, device=input_ids.device)
    if L > 1:
        out[:, :, 1:] = token_stats(logits[:, :-1].detach(), input_ids[:, 1:], topk=topk)
    return out


def lookahead(read_at: str) -> int:
    """How many tokens after its read position a step's span runs: 1 for the
    reference read (``before_step_token``: the span ends with the step token), else 0."""
    return 1 if read_at == "before_step_token" else 0


def step_features(stats: torch.Tensor, mask: torch.Tensor, response_start: torch.Tensor | int,
                  vocab_size: int, lookahead: int = 0) -> torch.Tensor:
    """Confidence features (N, :data:`N_CONFIDENCE`) of the N masked read positions.

    ``stats`` (3, B, L) token stats aligned with the sequence (column q = token q; NaN
    where unknown), ``mask`` (B, L) bool read positions, ``response_start`` (B,) or an
    int: the first response column, ``lookahead``: a step read at ``p`` spans through
    column ``p + lookahead`` (its step token; :func:`lookahead` of the read position;
    clipped to the row, never past the next read). Rows come in ``mask.nonzero()`` order, i.e. the
    order of ``features[mask]``. A step with no known response token (a read position
    before ``response_start``, or NaN stats) gets a fixed row, never NaN: g(0) for the
    three log-prob features, 1 for self-certainty (its maximum, a one-hot p) and 0 for
    the DeepConf feature. The decoder and a training forward give the same row.
    """
    B, L = mask.shape
    if isinstance(response_start, int):
        starts = [response_start] * B
    else:
        starts = [int(v) for v in response_start.reshape(-1).tolist()]
    logv = math.log(max(int(vocab_size), 2))
    rows: list[torch.Tensor] = []
    st = stats.float()
    for b in range(B):
        begin = starts[b]
        reads = mask[b].nonzero().flatten().tolist()
        for i, p in enumerate(reads):
            lo = max(begin, 1)
            end = min(p + lookahead, L - 1, reads[i + 1] - 1 if i + 1 < len(reads) else L - 1)
            end = max(end, p)
            seg = st[:, b, lo:end + 1]                # (3, n); empty for a read before lo
            lp, sc, cf = seg[0], seg[1], seg[2]
            ok = ~torch.isnan(lp)
            if ok.numel() and ok.any():
                lpk, sck, cfk = lp[ok], sc[ok], cf[ok]
                last = lp[-1] if bool(ok[-1]) else lpk[-1]
                rows.append(torch.stack([_g(last), _g(lpk.min()), _g(lpk.mean()),
                                         sck.mean() / logv, cfk.min() / logv]))
            else:
                z = _g(torch.zeros((), device=stats.device))
                rows.append(torch.stack([z, z, z, torch.ones((), device=stats.device),
                                         torch.zeros((), device=stats.device)]))
            begin = end + 1
    if not rows:
        return torch.zeros((0, N_CONFIDENCE), dtype=torch.float32, device=stats.device)
    return torch.stack(rows).float()
