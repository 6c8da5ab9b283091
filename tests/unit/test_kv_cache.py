"""metastone_lab.kv_cache: a reserved-capacity KV layer computes what DynamicLayer does."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from metastone_lab import kv_cache, sampling

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny_llama import tiny_llama  # noqa: E402


def _tiny_llama(vocab=40):
    return tiny_llama(vocab, heads=4, kv_heads=2)


def test_reserved_layer_update_select_repeat_crop_match_dynamic_layer():
    g = torch.Generator().manual_seed(0)
    k0, v0 = (torch.randn(3, 2, 5, 4, generator=g) for _ in range(2))
    dyn = DynamicLayer()
    dyn.update(k0, v0)
    res = kv_cache.ReservedLayer(k0, v0, capacity=7)
    steps = [(torch.randn(3, 2, 1, 4, generator=g), torch.randn(3, 2, 1, 4, generator=g))
             for _ in range(4)]                          # 5 + 4 > 7: the buffer must grow
    for k, v in steps:
        a, b = dyn.update(k, v), res.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert res.get_seq_length() == dyn.get_seq_length() == 9 and res.capacity >= 9
    idx = torch.tensor([2, 0])
    dyn.batch_select_indices(idx)
    res.batch_select_indices(idx)
    dyn.batch_repeat_interleave(2)
    res.batch_repeat_interleave(2)
    assert torch.equal(dyn.keys, res.keys) and torch.equal(dyn.values, res.values)
    dyn.crop(-3)
    res.crop(-3)
    assert torch.equal(dyn.keys, res.keys) and res.get_seq_length() == 6
    with pytest.raises(ValueError, match="negative"):
        res.crop(2)


@torch.inference_mode()
def test_reserved_cache_gives_the_model_the_same_logits_as_a_dynamic_cache():
    model = _tiny_llama()
    ids = torch.tensor([[5, 9, 11, 30], [7, 8, 3, 4]])
    out = model(input_ids=ids, use_cache=True)
    kw = sampling.cache_kwarg(model)
    plain = sampling.output_cache(out)
    reserved = kv_cache.reserve(copy.deepcopy(plain), 3)
    assert all(type(la) is kv_cache.ReservedLayer for la in reserved.layers)
    assert isinstance(reserved, DynamicCache)
    nxt = torch.tensor([[12], [13]])
    for _ in range(5):                                   # past the reserve of 3: it grows
        a = model(input_ids=nxt, use_cache=True, **{kw: plain})
        b = model(input_ids=nxt, use_cache=True, **{kw: reserved})
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
        plain, reserved = sampling.output_cache(a), sampling.output_cache(b)
        nxt = a.logits[:, -1].argmax(-1, keepdim=True)
    assert reserved.get_seq_length() == plain.get_seq_length() == 9


def test_reserve_leaves_other_layers_and_empty_caches_alone():
    assert kv_cache.reserve(None, 4) is None
    c = DynamicCache()
    assert kv_cache.reserve(c, 4) is c                   # no layers yet


@pytest.mark.parametrize("keep", [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9],
                                  [0, 4, 5, 6, 7, 8, 9], [0, 2, 3, 9], [3, 8], [9], [],
                                  [0, 1, 2, 6, 7, 8]])
def test_compact_rows_in_place_equals_index_select(keep):
    """Every pattern of finished rows (a run of one, shifts larger and smaller than the
    run, the last row, none): the in-place move gives buf[keep] exactly."""
    buf = torch.randn(10, 2, 6, 3, generator=torch.Generator().manual_seed(1))
    want = buf[torch.tensor(keep, dtype=torch.long)].clone()
    got = kv_cache.compact_rows(buf, keep)
    assert torch.equal(got, want) and (not keep or got.data_ptr() == buf.data_ptr())


def test_reserved_layer_select_out_of_order_falls_back_to_index_select():
    k0, v0 = (torch.randn(4, 2, 3, 2, generator=torch.Generator().manual_seed(s)) for s in (2, 3))
    res = kv_cache.ReservedLayer(k0, v0, capacity=5)
    res.batch_select_indices(torch.tensor([3, 0, 0]))
    assert torch.equal(res.keys, k0[[3, 0, 0]]) and torch.equal(res.values, v0[[3, 0, 0]])
    res.batch_select_indices(torch.tensor([2]))
    assert torch.equal(res.keys, k0[[0]]) and res.capacity == 5


def _filled(layer, n=5):
    layer.update(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4))
    return layer


def test_ring_template_takes_dynamic_and_wide_sliding_window_layers_only():
    from transformers.cache_utils import DynamicSlidingWindowLayer, StaticLayer

    cache = DynamicCache()
    cache.layers[:] = [_filled(DynamicLayer()), _filled(DynamicSlidingWindowLayer(16))]
    assert kv_cache.ring_template(cache, 16) == cache.layers
    assert kv_cache.ring_template(cache, 17) is None        # the window would cut a row
    cache.layers[:] = [StaticLayer(max_cache_len=16)]
    assert kv_cache.ring_template(cache, 8) is None
    assert kv_cache.ring_template(DynamicCache(), 8) is None  # nothing prefilled


def test_a_ring_attends_like_a_dynamic_cache_whatever_the_column_order():
    """One prompt written at the ring's wrapped columns (around the end of the buffer),
    then decoded: the same logits as the plain DynamicCache path (positions are in
    the keys, the per-row mask picks the columns)."""
    model = _tiny_llama()
    prompt, nxt = [5, 9, 11, 30, 31], [7, 8, 20]
    state, _ = sampling.prefill(model, [prompt])
    ring = kv_cache.Ring(width=12)
    ring.col = 2                                   # the prompt wraps: columns 9, 10, 11, 0, 1
    layers = kv_cache.ring_template(state.cache, 12)
    rings = kv_cache.ring_layers(layers, ring, capacity_rows=2)
    cols = (ring.col - len(prompt) + torch.arange(len(prompt))) % 12
    assert cols.tolist() == [9, 10, 11, 0, 1]
    for rl, la in zip(rings, layers):
        rl.write_prompt(0, 1, cols, la.keys, la.values)
    state.cache.layers[:] = rings
    ring.rows = 1
    mask = torch.full((2, 12), float("-inf"))
    mask[0, cols] = 0.0
    ids = list(prompt)
    for t, tok in enumerate(nxt):
        mask[0, ring.col] = 0.0
        out = model(input_ids=torch.tensor([[tok]]), attention_mask=mask[:1, None, None, :],
                    position_ids=torch.tensor([[len(prompt) + t]]), use_cache=True,
                    **{sampling.cache_kwarg(model): state.cache})
        ring.advance()
        ids.append(tok)
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(out.logits[0, -1], want, atol=1e-5), t
