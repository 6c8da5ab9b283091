"""The one sampling loop (metastone_lab.sampling): KV-cached decoding equals full
forwards, left padding equals unpadded rows, the EOS rule, the RNG policy, and
that no other module decodes step by step with a KV cache."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from metastone_lab import sampling

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny_llama import tiny_llama  # noqa: E402

PKG = Path(sampling.__file__).parent


def _tiny_llama(vocab=40, eos=1):
    return tiny_llama(vocab, eos=eos)


def _greedy_full_forward(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_left_padded_greedy_decoding_matches_full_forwards():
    model = _tiny_llama()
    prompts = [[5, 9, 11, 30, 31], [7, 8], [20, 3, 4]]     # three lengths: left padding
    got = sampling.sample(model, prompts, max_new_tokens=6, eos={-1}, pad_id=0, temperature=0)
    for p, g in zip(prompts, got):
        assert g == _greedy_full_forward(model, p, 6)


def test_rows_of_one_length_need_no_padding_and_agree_with_padded_rows():
    model = _tiny_llama()
    alone = sampling.sample(model, [[7, 8]], n=2, max_new_tokens=5, eos={-1}, pad_id=0,
                            temperature=0)
    mixed = sampling.sample(model, [[7, 8], [5, 9, 11, 30]], max_new_tokens=5, eos={-1},
                            pad_id=0, temperature=0)
    state, _ = sampling.prefill(model, [[7, 8], [7, 8]])
    assert state.attention_mask is None and state.position is None
    assert alone[0] == alone[1] == mixed[0]


def test_eos_ends_a_row_is_kept_and_the_rest_is_padding():
    model = _tiny_llama()
    free = sampling.sample(model, [[3, 4, 5]], max_new_tokens=6, eos={-1}, pad_id=0,
                           temperature=0)[0]
    stop = free[2]                      # make the third greedy token an EOS id
    state, _ = sampling.prefill(model, [[3, 4, 5]])
    dec = sampling.decode(model, state, max_new_tokens=6, eos={stop}, pad_id=0, temperature=0)
    first = free.index(stop)
    assert dec.rows()[0] == free[:first + 1] and dec.lengths.tolist() == [first + 1]
    assert dec.tokens[0, first + 1:].eq(0).all() and not bool(dec.hit_max[0])
    state, _ = sampling.prefill(model, [[3, 4, 5]])
    bench = sampling.decode(model, state, max_new_tokens=6, eos={stop}, pad_id=0,
                            temperature=0, ignore_eos=True)
    assert bench.rows()[0] == free and bool(bench.hit_max[0])


def test_rng_policy_seeded_generator_repeats_and_global_rng_is_used_without_one():
    model = _tiny_llama()
    kw = dict(n=8, max_new_tokens=6, eos={1}, pad_id=0, temperature=1.0)
    a = sampling.sample(model, [[3, 4, 5], [9, 10]], generator=torch.Generator().manual_seed(1), **kw)
    b = sampling.sample(model, [[3, 4, 5], [9, 10]], generator=torch.Generator().manual_seed(1), **kw)
    assert a == b and len({tuple(s) for s in a[:8]}) > 1
    torch.manual_seed(5)
    c = sampling.sample(model, [[3, 4, 5]], **kw)
    torch.manual_seed(5)
    assert sampling.sample(model, [[3, 4, 5]], **kw) == c


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[3.0, 2.9, -5.0, -6.0]])
    seen = {int(sampling.sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(s)))
            for s in range(50)}
    assert seen == {0, 1}


def test_hooks_see_every_sampled_token_and_every_fed_position():
    model = _tiny_llama()
    state, _ = sampling.prefill(model, [[3, 4, 5]], output_hidden_states=True)
    state = state.repeat(3)
    toks, fed = [], []
    dec = sampling.decode(model, state, max_new_tokens=4, eos={-1}, pad_id=0, temperature=1.0,
                          generator=torch.Generator().manual_seed(0), output_hidden_states=True,
                          on_token=lambda t, rows, nxt, lg, top: toks.append((t, nxt.clone())),
                          on_forward=lambda t, rows, out: fed.append((t, len(rows),
                                                                      len(out.hidden_states))))
    assert [t for t, _ in toks] == [0, 1, 2, 3]
    assert torch.equal(torch.stack([x for _, x in toks], 1), dec.tokens)
    assert [t for t, _, _ in fed] == [0, 1, 2] and all(n == 3 for _, n, _ in fed)


def _kv_cached_forward_loops(path: Path) -> list[int]:
    """Lines of ``for``/``while`` loops in ``path`` that call a model with a cache argument."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hits = []
    for loop in ast.walk(tree):
        if not isinstance(loop, (ast.For, ast.While)):
            continue
        for node in ast.walk(loop):
            if isinstance(node, ast.Call) and any(
                    k.arg in ("past_key_values", "cache", "use_cache") or k.arg is None
                    and isinstance(k.value, ast.Dict) for k in node.keywords):
                if any(k.arg == "use_cache" for k in node.keywords):
                    hits.append(loop.lineno)
                    break
    return hits


def test_no_other_module_decodes_step_by_step_with_a_kv_cache():
    offenders = {str(p.relative_to(PKG)): _kv_cached_forward_loops(p)
                 for p in PKG.rglob("*.py") if p.name != "sampling.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert _kv_cached_forward_loops(PKG / "sampling.py")   # the check does see the one loop


@pytest.mark.parametrize("seqs", [[[1, 2, 3], [4]], [[5]]])
def test_padding_helpers_shapes(seqs):
    ids, attn, lens = sampling.pad_right(seqs, pad_id=0)
    assert ids.shape == attn.shape == (len(seqs), max(map(len, seqs)))
    assert lens.tolist() == [len(s) for s in seqs] and attn.sum(-1).tolist() == lens.tolist()
    ids, attn, pos = sampling.pad_left(seqs, pad_id=0)
    assert attn.sum(-1).tolist() == [len(s) for s in seqs]
    assert [row[-len(s):] for row, s in zip(ids.tolist(), seqs)] == seqs
    assert pos[:, -1].tolist() == [len(s) - 1 for s in seqs]


def _alone(model, prompt, n, gen, **kw):
    state, _ = sampling.prefill(model, [prompt])
    return sampling.decode(model, state.repeat(n), generator=gen, **kw).rows()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_merged_states_of_several_prompts_decode_as_each_alone(temperature):
    """Caches prefilled apart and joined with left padding (merge_states), one generator
    per group of rows: each prompt's rows get exactly the tokens they get decoded alone,
    whatever shares the batch."""
    model = _tiny_llama()
    prompts = [[5, 9, 11, 30, 31], [7, 8], [20, 3, 4]]           # three lengths
    kw = dict(max_new_tokens=7, eos={1}, pad_id=0, temperature=temperature, top_p=0.9)
    want = [_alone(model, p, 3, torch.Generator().manual_seed(10 + i), **kw)
            for i, p in enumerate(prompts)]
    for order, rep in (([0, 1, 2], False), ([2, 0], False), ([1], False), ([0, 1, 2], True),
                       ([1], True)):
        if rep:     # the engine's call: 1-row states, repeated and reserved by merge_states
            states = [sampling.prefill(model, [prompts[i]])[0] for i in order]
            merged = sampling.merge_states(states, repeats=3, reserve_tokens=8)
            assert merged.cache.layers[0]._k.shape[-2] == max(len(prompts[i]) for i in order) + 8
        else:
            states = [sampling.prefill(model, [prompts[i]])[0].repeat(3) for i in order]
            merged = sampling.merge_states(states)
        assert (merged.attention_mask is None) == (len({len(prompts[i]) for i in order}) == 1)
        groups = torch.arange(len(order)).repeat_interleave(3)
        gens = [torch.Generator().manual_seed(10 + i) for i in order]
        got = sampling.decode(model, merged, groups=groups, generators=gens, **kw).rows()
        for j, i in enumerate(order):
            assert got[3 * j:3 * j + 3] == want[i], (order, i)
    if temperature > 0:
        assert len({tuple(r) for rows in want for r in rows}) > 3   # not vacuous


def test_merge_states_pads_the_cache_on_the_left():
    model = _tiny_llama()
    a, _ = sampling.prefill(model, [[5, 9, 11, 30]])
    b, _ = sampling.prefill(model, [[7, 8]])
    kb = b.cache.layers[0].keys.clone()                            # (1, H, 2, D)
    m = sampling.merge_states([a, b])
    keys = m.cache.layers[0].keys
    assert keys.shape[0] == 2 and keys.shape[-2] == 4
    assert torch.equal(keys[1:, :, 2:], kb) and keys[1:, :, :2].eq(0).all()
    assert m.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert m.position.tolist() == [[3], [1]]


def test_draw_matches_the_weights_in_frequency():
    # 40k draws from one fixed distribution: every empirical frequency within 5
    # standard errors of its probability (a wrong CDF index or an off-by-one is far out)
    w = torch.tensor([0.0, 0.1, 0.0, 0.4, 0.2, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 40_000
    ids = sampling.draw(w.expand(n, -1), g)                        # (n,)
    freq = torch.bincount(ids, minlength=len(w)).double() / n
    se = (w.double() * (1 - w.double()) / n).sqrt()
    assert bool((freq[w == 0] == 0).all())                         # never a zero weight
    assert bool(((freq - w.double()).abs() <= 5 * se + 1e-12).all()), freq


def test_draw_never_picks_a_zero_weight_at_the_uniform_edges():
    # zero weight first and last (a large vocabulary's softmax underflows to 0);
    # u = 0 and the largest float32 below 1 are the two edges of torch.rand
    w = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0]])
    cdf = w.cumsum(-1)
    u_max = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    for u, want in ((0.0, 1), (0.25, 3), (float(u_max), 3)):
        assert int(sampling.pick_by_cdf(cdf, torch.tensor([[u]]))) == want
    # u * total == total (u = 1, outside torch.rand's range, stands in for a rounding
    # up): the target is kept below the total, so still the last positive weight
    assert int(sampling.pick_by_cdf(cdf, torch.tensor([[1.0]]))) == 3


def test_draw_is_seeded_by_its_generator_and_unnormalised_weights_are_fine():
    w = torch.rand(16, 50, generator=torch.Generator().manual_seed(1))
    a = sampling.draw(w, torch.Generator().manual_seed(7))
    b = sampling.draw(w * 3.0, torch.Generator().manual_seed(7))   # scale does not matter
    assert torch.equal(a, b)
    assert not torch.equal(a, sampling.draw(w, torch.Generator().manual_seed(8)))


def test_repeated_prompts_are_prefilled_once_and_decode_as_a_padded_batch():
    """sample()'s rows in groups (rollout's n samples per prompt): one batch-1 prefill per
    prompt, its cache written n times; the logits and greedy samples are those of the
    left-padded prefill of every row."""
    model = _tiny_llama()
    rows = [[5, 9, 11, 30, 31]] * 3 + [[7, 8]] * 3
    calls = []
    real = model.forward
    model.forward = lambda *a, **kw: (calls.append(kw["input_ids"].shape), real(*a, **kw))[1]
    st = sampling._prefill_rows(model, rows, pad_id=0, reserve_tokens=4)
    model.forward = real
    assert calls == [(1, 5), (1, 2)]
    ref, _ = sampling.prefill(model, rows, pad_id=0)
    assert torch.allclose(st.logits, ref.logits, atol=1e-5)
    kw = dict(max_new_tokens=4, eos={-1}, pad_id=0, temperature=0.0)
    assert sampling.decode(model, st, **kw).rows() == sampling.decode(model, ref, **kw).rows()
    st = sampling._prefill_rows(model, [[5, 9], [5, 9], [7, 8]], pad_id=0, reserve_tokens=4)
    assert st.logits.shape[0] == 3                     # unequal runs: one padded prefill


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)])
@pytest.mark.parametrize("feed_last", [False, True])
def test_decode_stream_refills_ended_rows_and_each_prompt_decodes_as_alone(heads, kv_heads,
                                                                           feed_last):
    """Continuous batching: six prompts of three lengths through room for two prompts'
    rows at a time (a ring cache of width max prompt + T + 1). Each prompt's rows get
    exactly the tokens they get decoded alone with decode(), prompts join while other
    prompts' rows are still decoding, and every slot a row leaves goes to a joining row
    (at most max_rows slots are ever named)."""
    model = tiny_llama(eos=1, heads=heads, kv_heads=kv_heads)
    boost = torch.zeros(40)
    boost[1] = 2.5                         # EOS likely enough that rows end mid-stream
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + boost)
    prompts = [[5, 9, 11, 30, 31], [7, 8], [20, 3, 4], [6, 6, 6, 6], [9], [12, 13, 14]]
    T, r = 9, 3
    kw = dict(max_new_tokens=T, eos={1}, pad_id=0, temperature=1.0, top_p=0.9)
    want = [_alone(model, p, r, torch.Generator().manual_seed(10 + i), **kw)
            for i, p in enumerate(prompts)]
    joined, finished, active_at_join, left, named = [], {}, [], [], set()

    def entries():
        for i, p in enumerate(prompts):
            st = sampling.prefill(model, [p])[0]
            yield sampling.Joining(st, r, torch.Generator().manual_seed(10 + i))

    def on_join(g, slots):
        named.update(slots.tolist())
        joined.append(g)
        active_at_join.append(sum(1 for x in joined[:-1] if x not in finished))

    def on_finish(g, dec):
        finished[g] = dec.rows()

    sampling.decode_stream(model, entries(), max_rows=2 * r,
                           width=max(map(len, prompts)) + T + 1, feed_last=feed_last,
                           on_join=on_join, on_leave=lambda g, j, s: left.append((g, j, s)),
                           on_finish=on_finish, **kw)
    assert named == set(range(2 * r))
    assert sorted((g, j) for g, j, _ in left) == [(g, j) for g in range(len(prompts))
                                                  for j in range(r)]
    assert joined == list(range(len(prompts))) and sorted(finished) == joined
    for i in range(len(prompts)):
        assert finished[i] == want[i], i
    assert max(active_at_join[2:]) >= 1, "no prompt joined while another was decoding"
    lens = {len(row) for rows in want for row in rows}
    assert len(lens) > 1 and min(lens) < T, "rows all ran to max_new_tokens: test is vacuous"


def test_decode_stream_rejects_a_prompt_wider_than_its_ring():
    model = tiny_llama()
    st = sampling.prefill(model, [[5, 6, 7, 8]])[0]
    with pytest.raises(ValueError, match="does not fit the ring's width 8"):
        sampling.decode_stream(model, [sampling.Joining(st, 2)], max_rows=2, width=8,
                               max_new_tokens=4, eos={1}, pad_id=0, on_finish=lambda g, d: None)
