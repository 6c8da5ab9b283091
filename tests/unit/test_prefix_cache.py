"""metastone_lab.prefix_cache: block prefill computes what one forward does, and a
stored block gives exactly the numbers the prompt would compute for it."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from metastone_lab import prefix_cache, sampling

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny_llama import tiny_llama  # noqa: E402


def _tiny_llama(vocab=40):
    return tiny_llama(vocab, heads=4, kv_heads=2)


def test_block_ends_always_leave_a_last_block():
    assert prefix_cache.block_ends(10, 4) == [4, 8, 10]
    assert prefix_cache.block_ends(8, 4) == [4, 8]          # the last full block gives logits
    assert prefix_cache.block_ends(3, 4) == [3]
    assert prefix_cache.block_ends(10, 0) == [10]


def test_block_prefill_matches_one_forward():
    model = _tiny_llama()
    prompt = [2, 5, 7, 9, 11, 3, 4, 6, 8, 10, 12]
    whole, out = sampling.prefill(model, [prompt], output_hidden_states=True)
    st, feats = prefix_cache.prefill_prompt(model, prompt, block=4, store=None, feature_layer=-2)
    assert feats.shape == (len(prompt), 32)
    assert torch.allclose(feats, out.hidden_states[-2][0], atol=1e-5)
    assert torch.allclose(st.logits, whole.logits, atol=1e-5)
    for a, b in zip(st.cache.layers, whole.cache.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)


def test_a_stored_block_gives_the_same_numbers_as_computing_it():
    model = _tiny_llama()
    shared = [2, 5, 7, 9, 11, 3, 4, 6]                       # two full blocks of 4
    a, b = shared + [8, 10, 12], shared + [13, 14]
    ref_state, ref_feats = prefix_cache.prefill_prompt(model, b, block=4, store=None,
                                                        feature_layer=-2)
    store = prefix_cache.PrefixStore()
    prefix_cache.prefill_prompt(model, a, block=4, store=store, feature_layer=-2)
    assert (store.hits, store.misses, len(store)) == (0, 2, 2)
    st, feats = prefix_cache.prefill_prompt(model, b, block=4, store=store, feature_layer=-2)
    assert store.hits == 2                                    # both blocks taken, not computed
    assert torch.equal(feats, ref_feats) and torch.equal(st.logits, ref_state.logits)
    for x, y in zip(st.cache.layers, ref_state.cache.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
    # a prompt that differs inside the first block shares nothing
    prefix_cache.prefill_prompt(model, [2, 5, 7, 1] + shared[4:] + [9], block=4, store=store,
                                feature_layer=None)
    assert store.hits == 2


def test_the_store_keeps_at_most_its_budget():
    model = _tiny_llama()
    store = prefix_cache.PrefixStore(max_mb=0.01)             # ~10 KiB: a few blocks
    for first in range(3, 30):
        prefix_cache.prefill_prompt(model, [2, first, 5, 6, 7, 8, 9, 10, 11], block=4,
                                    store=store, feature_layer=-2)
    assert 0 < store._bytes <= store.max_bytes and len(store) < 2 * 27
    held = sum(t.numel() * t.element_size() for kv, f, _ in store._blocks.values()
               for t in [x for pair in kv for x in pair] + [f])
    assert store._bytes == held                               # the count follows evictions
