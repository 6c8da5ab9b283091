"""Attention for one-token decode steps on CPU: the batched engine's kernel choice.

``decode_attention(device, dtype)`` is the context :func:`sampling.decode_stream` runs
its loop in. On CPU it

- has transformers' SDPA run grouped-query heads with ``enable_gqa=True`` under a mask
  (its ``TRANSFORMERS_SDPA_FORCE_GQA`` switch, read at every call). With the ring
  cache's 4-D mask its default packs the query heads instead, which measured ~14%
  slower on SmolLM2 (48 problems x k 8 at 2 threads: 67.3 / 68.2 s vs 77.4 / 79.3 s,
  the same tokens);
- for a bfloat16 / float16 model, replaces the ``sdpa`` attention function for
  one-token queries with :func:`grouped_decode_attention`: torch's CPU flash kernel
  is ~4x slower in bfloat16 than in float32 at these shapes (measured 25.3 vs 5.8 ms
  for 128 rows x 9 heads x 235 columns), while two grouped matmuls in bfloat16 take
  2.7 ms. Prefill (queries longer than one token) runs SDPA's float32 kernel on
  inputs cast up, and casts its output back.

On CUDA nothing is changed (masked GQA falls back to the math kernel there, and the
flash kernels are fast in half precision). Both switches are restored on exit.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_HALF = (torch.bfloat16, torch.float16)


def grouped_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             scaling: float | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' eager attention for one-token queries, with the query heads of a
    key/value head grouped instead of the keys repeated.

    query (B, H, 1, D); key / value (B, Hk, S, D) with H = g * Hk; attention_mask
    (B, 1, 1, S) additive, or bool (True = attend, transformers' sdpa masks), or None
    -> output (B, 1, H, D) (transformers' layout), None.
    Scores q.k^T * scaling + mask in the model dtype, softmax in float32 cast back
    (as ``eager_attention_forward``), times the values.
    """
    B, H, _, D = query.shape
    Hk, S = key.shape[1], key.shape[2]
    g = H // Hk
    scale = D ** -0.5 if scaling is None else scaling
    q = query.reshape(B, Hk, g, D)                                    # (B, Hk, g, D)
    scores = torch.matmul(q, key.transpose(-1, -2)) * scale           # (B, Hk, g, S)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask.reshape(B, 1, 1, S), float("-inf"))
    elif attention_mask is not None:
        scores = scores + attention_mask.reshape(B, 1, 1, S)
    weights = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value)                                # (B, Hk, g, D)
    return out.reshape(B, H, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _usable(query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
            kwargs: dict) -> bool:
    """A decode step :func:`grouped_decode_attention` computes as eager would."""
    if query.shape[2] != 1 or query.shape[1] % key.shape[1]:
        return False
    if kwargs.get("dropout", 0.0) or kwargs.get("softcap") is not None \
            or kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        return False
    return attention_mask is None or (attention_mask.dtype in (query.dtype, torch.bool)
                                      and attention_mask.numel() == key.shape[0] * key.shape[2])


def param_dtype(module: Any) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (float32 if none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextlib.contextmanager
def decode_attention(device: torch.device, dtype: torch.dtype):
    """Run the body with the CPU decode kernels above (see the module docstring);
    ``dtype`` is the model's. Nothing changes on other devices."""
    if device.type != "cpu":
        yield
        return
    env, old_env = "TRANSFORMERS_SDPA_FORCE_GQA", os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    os.environ[env] = "1"
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, old_fn = "sdpa" in local, local.get("sdpa")
    if dtype in _HALF:
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            if not args and _usable(query, key, attention_mask, kwargs):
                return grouped_decode_attention(module, query, key, value, attention_mask,
                                                scaling=kwargs.get("scaling"))
            if query.shape[2] > 1:      # prefill: the float32 kernel, cast back
                mask = (attention_mask.float() if attention_mask is not None
                        and attention_mask.is_floating_point() else attention_mask)
                out, weights = sdpa(module, query.float(), key.float(), value.float(), mask,
                                    *args, **kwargs)
                return out.to(query.dtype), weights
            return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

        ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = old_env
        if dtype in _HALF:
            if had:
                local["sdpa"] = old_fn
            else:
                local.pop("sdpa", None)


__all__ = ["decode_attention", "grouped_decode_attention", "param_dtype"]
