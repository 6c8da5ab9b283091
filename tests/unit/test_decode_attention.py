"""The CPU decode kernel (metastone_lab.decode_attention): grouped-query attention for
one-token queries equals transformers' eager attention, and the context swaps and
restores transformers' sdpa function only for half-precision models on CPU."""
import os

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from metastone_lab.decode_attention import decode_attention, grouped_decode_attention


class _Attn(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.training = False


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_grouped_decode_attention_equals_eager(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    B, S, D = 5, 11, 8
    q = torch.randn(B, heads, 1, D, generator=g)
    k = torch.randn(B, kv_heads, S, D, generator=g)
    v = torch.randn(B, kv_heads, S, D, generator=g)
    mask = torch.zeros(B, 1, 1, S)
    mask[0, ..., :4] = float("-inf")          # left padding of row 0
    mask[3, ..., 7:] = float("-inf")          # ring columns another row owns
    want, _ = eager_attention_forward(_Attn(heads // kv_heads), q, k, v, mask, scaling=0.3)
    got, none = grouped_decode_attention(None, q, k, v, mask, scaling=0.3)
    assert none is None and got.shape == want.shape == (B, 1, heads, D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_context_swaps_sdpa_only_for_half_precision_on_cpu():
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    env = os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    with decode_attention(torch.device("cpu"), torch.float32):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    with decode_attention(torch.device("cpu"), torch.bfloat16):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not before
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before
    assert os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") == env
    with pytest.raises(RuntimeError, match="boom"):
        with decode_attention(torch.device("cpu"), torch.bfloat16):
            raise RuntimeError("boom")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before


def test_bool_mask_equals_the_additive_mask():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 4, 1, 8, generator=g), torch.randn(3, 2, 6, 8, generator=g)
    keep = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    keep[1, ..., :2] = False
    add = torch.zeros(3, 1, 1, 6).masked_fill(~keep, float("-inf"))
    a, _ = grouped_decode_attention(None, q, k, k, keep, scaling=0.3)
    b, _ = grouped_decode_attention(None, q, k, k, add, scaling=0.3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mask", [None, "bool"])
def test_half_precision_prefill_is_sdpa_in_float32_cast_back(mask):
    """Queries longer than one token (prefill) are not the grouped kernel's: sdpa's
    float32 kernel computes them (causal when the mask is None)."""
    q = torch.randn(2, 4, 3, 8).to(torch.bfloat16)
    k = torch.randn(2, 2, 3, 8).to(torch.bfloat16)
    m = None if mask is None else torch.ones(2, 1, 3, 3, dtype=torch.bool).tril()
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with decode_attention(torch.device("cpu"), torch.bfloat16):
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](_Attn(2), q, k, k, m, scaling=0.35)
    want, _ = before(_Attn(2), q.float(), k.float(), k.float(), m, scaling=0.35)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want.to(torch.bfloat16), rtol=0, atol=0)
