"""GRPO math: group-normalised advantages, the clipped surrogate and the
low-variance (k3) KL estimator. Pure tensor functions, no model code.

Token-level means can be normalised by a *global* token count so that a
data-parallel step (gradients averaged over ranks) equals the single-process
step on the same global batch.
"""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, n: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: ``(r - mean_group) / (std_group + eps)``.

    Args:
        rewards: (G*n,) rewards, the ``n`` trajectories of a prompt contiguous.
        n: group size.
    Returns:
        (G*n,) advantages. A group whose rewards are all equal gets exactly 0
        (no NaN: the std is 0 and the numerator is 0; we also zero it explicitly).
    """
    if rewards.dim() != 1 or rewards.numel() % n:
        raise ValueError(f"group_advantages: rewards of shape {tuple(rewards.shape)} "
                         f"is not a multiple of the group size n={n}")
    r = rewards.float().view(-1, n)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    adv = (r - mean) / (std + eps)
    adv = torch.where(std > 0, adv, torch.zeros_like(adv))
    return adv.reshape(-1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next tokens.

    logits (B, L, V), input_ids (B, L) -> (B, L-1): entry t is log p(input_ids[t+1] | ..t).
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def masked_token_mean(x: torch.Tensor, mask: torch.Tensor, denom: float | torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Token-level mean of ``x`` over ``mask`` (same shape). ``denom`` overrides the
    local token count (pass the global count / world size under data parallelism)."""
    m = mask.to(x.dtype)
    d = m.sum() if denom is None else denom
    return (x * m).sum() / torch.clamp(torch.as_tensor(d, dtype=x.dtype, device=x.device), min=1.0)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip: float = 0.2,
                      denom: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """PPO/GRPO clipped objective (to minimise), token-level mean.

    logp, old_logp, mask: (B, T); advantages: (B,) broadcast over tokens.
    Returns (loss, {"clip_frac": float}).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1).to(logp.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv
    per_token = -torch.minimum(unclipped, clipped)
    loss = masked_token_mean(per_token, mask, denom)
    with torch.no_grad():
        frac = masked_token_mean(((ratio - 1).abs() > clip).float(), mask).item()
    return loss, {"clip_frac": frac}


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Low-variance KL estimator (Schulman's k3), per token, >= 0:
    ``exp(ref - logp) - (ref - logp) - 1``. Shapes (B, T) -> (B, T)."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1.0
