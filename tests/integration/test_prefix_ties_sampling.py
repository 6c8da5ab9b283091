"""Ties that exact arithmetic makes are exact ties in the sampler's output, whatever the
floating-point rounding (issue 16 §8: thread count and batch composition change the last
bits; DeepConf's lowest window of a shared opening then broke the tie another way).

The rounding is simulated by adding independent noise of 1e-6 (relative; float32's
rounding between two thread counts is ~1e-7) to every token statistic and head logit the
sampler computes: rows with a shared prefix then get different values there, as they may
on another machine. Sampled tokens do not depend on them (the stats are computed after
sampling; the head does not steer decoding), so every run below samples the same tokens."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_generate import PROMPT, FakeTask, Prob, make_model, make_tokenizer  # noqa: E402

from metastone_lab import generate as G
from metastone_lab import select
from metastone_lab.confidence import lookahead

K, T = 16, 20


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok, seed=0)


def _run(model, tok, monkeypatch, noise_seed, head_mode, max_batch_rows=None):
    """Sample with rounding-like noise (None = none) on the token stats and head logits."""
    with monkeypatch.context() as mp:
        if noise_seed is not None:
            g = torch.Generator().manual_seed(noise_seed)
            stats, head, from_hidden = G.token_stats, model.step_head_logits, \
                model.head_logits_from_hidden

            def jitter(x):
                return x * (1 + 1e-6 * torch.randn(x.shape, generator=g))

            mp.setattr(G, "token_stats", lambda *a, **kw: jitter(stats(*a, **kw)))
            mp.setattr(model, "step_head_logits", lambda *a, **kw: jitter(head(*a, **kw)))
            mp.setattr(model, "head_logits_from_hidden",
                       lambda *a, **kw: jitter(from_hidden(*a, **kw)))
        cfg = G.GenerateConfig(k=K, max_new_tokens=T, temperature=0.3, top_p=1.0,
                               head_mode=head_mode, deepconf_window=4, seed=0,
                               max_batch_rows=max_batch_rows)
        return G.generate_best_of_n(model, tok, [Prob(PROMPT)], FakeTask(), cfg)[0].trajectories


def _shared(a, b) -> int:
    n = 0
    for x, y in zip(a.token_ids, b.token_ids):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("head_mode", ["deferred", "per_step"])
@pytest.mark.parametrize("max_batch_rows", [None, 0])   # the batched engine / one problem at a time
def test_shared_prefix_values_are_equal_under_rounding_noise(tok, model, monkeypatch, head_mode,
                                                             max_batch_rows):
    trajs = _run(model, tok, monkeypatch, noise_seed=1, head_mode=head_mode,
                 max_batch_rows=max_batch_rows)
    pairs = [(a, b, _shared(a, b)) for i, a in enumerate(trajs) for b in trajs[i + 1:]]
    assert max(m for *_, m in pairs) >= 3, "no two samples share an opening: test is vacuous"
    la = lookahead("before_step_token")
    n_steps_compared = 0
    for a, b, m in pairs:
        for name in ("token_logprobs", "token_self_certainty", "token_confidence"):
            assert getattr(a, name)[:m] == getattr(b, name)[:m], name
        P = a.prompt_len
        sa = {p: s for p, s in zip(a.step_positions, a.step_scores) if p - P + la < m}
        sb = {p: s for p, s in zip(b.step_positions, b.step_scores) if p - P + la < m}
        assert sa == sb
        n_steps_compared += len(sa)
    assert n_steps_compared > 0, "no step inside a shared prefix: the head part is vacuous"


def test_selections_do_not_depend_on_rounding(tok, model, monkeypatch):
    """Every selector picks the same sample with and without the noise (and for two noise
    draws), over every pair of samples (best-of-2, as the k=2 column of an evaluation):
    ties are exact, and the lowest index wins them."""
    runs = [_run(model, tok, monkeypatch, noise_seed=s, head_mode="deferred")
            for s in (None, 1, 2)]
    assert [t.token_ids for t in runs[0]] == [t.token_ids for t in runs[1]] \
        == [t.token_ids for t in runs[2]]
    dc = [t.signals["deepconf"] for t in runs[0]]
    ties = [(i, j) for i in range(K) for j in range(i + 1, K) if dc[i] == dc[j]
            and runs[0][i].token_ids != runs[0][j].token_ids]
    assert ties, "no DeepConf tie between different samples: vacuous"
    names = [n for n in select.usable_selectors(runs[0][0]) if n not in ("random", "oracle")]
    assert {"deepconf_bon", "deepconf_vote", "sprm_bon"} <= set(names)

    def picks(r):
        out = {}
        for i in range(K):
            for j in range(i + 1, K):
                pair = [r[i], r[j]]
                for n in names:
                    sel = select.select(pair, n)
                    out[n, i, j] = (i, j)[next(q for q, t in enumerate(pair) if t is sel)]
        return out

    base = picks(runs[0])
    assert base == picks(runs[1]) and base == picks(runs[2])
    assert all(base["deepconf_bon", i, j] == i for i, j in ties)   # lowest index wins
