"""The batched best-of-N engine (metastone_lab.engine): rows of several problems in one
left-padded decode batch give each problem the samples it gets decoded alone, scored
in flight as a re-forward scores them; bad input fails clearly."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_generate import (SEGMENTERS, FakeTask, Prob, make_model, make_tokenizer,  # noqa: E402
                           score_bound)

from metastone_lab import engine, sampling
from metastone_lab.errors import ConfigError, ShapeError
from metastone_lab.generate import GenerateConfig, generate_best_of_n, reforward_scores

PROMPTS = ["Start with 7 . Add 5 . What is the result ?\n<think>",
           "Add 3 ?\n<think>",
           "Start with 2 . Add 4 . Add 1 . Add 9 . What is the result ?\n<think>"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


@pytest.fixture(scope="module")
def eos_model(tok):
    m = make_model(tok, seed=1)
    boost = torch.zeros(len(tok))
    boost[tok.eos_token_id] = 2.0     # rows end at different lengths: rows retire mid-batch
    m.backbone.lm_head.register_forward_hook(lambda mod, inp, out: out + boost.to(out.device))
    return m


def probs():
    return [Prob(p, pid=f"p{i}") for i, p in enumerate(PROMPTS)]


def test_prompts_have_different_lengths(tok):
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) == 3   # left padding exercised


def _same_trajectories(a, b, bound, what):
    assert [t.token_ids for t in a] == [t.token_ids for t in b], what
    for t, u in zip(a, b):
        assert t.step_positions == u.step_positions and t.hit_max_tokens == u.hit_max_tokens
        assert t.step_scores == pytest.approx(u.step_scores, abs=bound), what
        for name in ("token_logprobs", "token_self_certainty", "token_confidence"):
            x, y = getattr(t, name), getattr(u, name)
            assert len(x) == len(y) and all(abs(p - q) <= 1e-5 * max(1.0, abs(q))
                                            for p, q in zip(x, y)), (what, name)
        assert set(t.signals) == set(u.signals)


@pytest.mark.parametrize("head_mode", ["per_step", "deferred"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_problems_samples_do_not_depend_on_its_batch(tok, model, eos_model, temperature,
                                                       head_mode):
    """Three problems in one batch, one at a time (max_batch_rows = k), two in flight
    with the third joining when rows end (2k: continuous batching refills) and the
    per-problem chunked path (max_batch_rows = 0): the same token ids, step
    positions and (within rounding) step scores and token stats for every problem.
    Sampling uses the EOS-prone model (rows retire mid-batch); greedy the step-prone one."""
    k = 1 if temperature == 0 else 4
    m = model if temperature == 0 else eos_model
    kw = dict(k=k, max_new_tokens=16, temperature=temperature, top_p=0.9, seed=3,
              head_mode=head_mode, chunk_size=32, segmenter="fixed",
              segmenter_options={"n": 3})
    runs = {rows: generate_best_of_n(m, tok, probs(), FakeTask(),
                                     GenerateConfig(**kw, max_batch_rows=rows))
            for rows in (0, k, 2 * k, 3 * k)}
    assert engine.plan_batches([k] * 3, 3 * k) == [[0, 1, 2]]
    for i, p in enumerate(PROMPTS):
        pids = tok(p)["input_ids"]
        seqs = [pids + t.token_ids for t in runs[0][i].trajectories]
        bound = score_bound(m, seqs)
        for rows in (k, 2 * k, 3 * k):
            _same_trajectories(runs[rows][i].trajectories, runs[0][i].trajectories, bound,
                               f"problem {i}, max_batch_rows={rows}")
    all_t = [t for ps in runs[3 * k] for t in ps.trajectories]
    assert sum(t.n_steps for t in all_t) >= 3, "test is vacuous: too few steps"
    if temperature > 0:
        assert len({tuple(t.token_ids) for t in all_t}) > 3
        assert len({len(t.token_ids) for t in all_t}) > 1, "rows all retired together"


def test_decode_batch_composition_and_order_do_not_change_a_problem(tok, model):
    """decode_batch directly: problem 2 alone, after problem 0, or first of three."""
    cfg = GenerateConfig(k=3, max_new_tokens=12, temperature=1.0, top_p=0.95)
    eos = sampling.eos_ids(model, tok)
    pad = sampling.pad_id_for(tok, eos)
    ids = [tok(p)["input_ids"] for p in PROMPTS]

    def run(order):
        gens = [torch.Generator().manual_seed(100 + i) for i in order]
        chunks = engine.decode_batch(model, [ids[i] for i in order], cfg, eos=eos, pad_id=pad,
                                     generators=gens)
        return dict(zip(order, chunks))

    alone = run([2])[2]
    for order in ([0, 2], [2, 1, 0]):
        ch = run(order)[2]
        assert torch.equal(ch.ids, alone.ids) and torch.equal(ch.lengths, alone.lengths)
        assert torch.equal(torch.isnan(ch.tok_logprob), torch.isnan(alone.tok_logprob))
        ok = ~torch.isnan(alone.tok_logprob)
        assert torch.allclose(ch.tok_logprob[ok], alone.tok_logprob[ok], atol=1e-5)


@pytest.mark.parametrize("head_mode", ["per_step", "deferred"])
@pytest.mark.parametrize("read_at", ["before_step_token", "step_token"])
@pytest.mark.parametrize("segmenter,options", SEGMENTERS)
def test_inflight_scores_equal_reforward_in_multi_problem_batches(tok, model, segmenter, options,
                                                                  read_at, head_mode):
    """The equivalence of test_generate.test_inflight_scores_equal_reforward, with the
    three problems' rows in one left-padded batch (bound: tests/_tolerance.py)."""
    cfg = GenerateConfig(k=4, max_new_tokens=20, temperature=1.0, segmenter=segmenter,
                         segmenter_options=options, read_at=read_at, seed=3,
                         head_mode=head_mode, max_batch_rows=12)
    out = generate_best_of_n(model, tok, probs(), None, cfg)
    n_steps, all_scores = 0, []
    for p, ps in zip(PROMPTS, out):
        pids = tok(p)["input_ids"]
        seqs = [pids + t.token_ids for t in ps.trajectories]
        ref = reforward_scores(model, tok, seqs, segmenter=segmenter, segmenter_options=options,
                               read_at=read_at, prompt_lens=[len(pids)] * len(seqs))
        tol = score_bound(model, seqs)
        for t, r in zip(ps.trajectories, ref):
            assert t.step_positions == r["positions"]
            assert t.step_scores == pytest.approx(r["scores"], abs=tol)
            assert not any(math.isnan(s) for s in t.step_scores)
            n_steps += t.n_steps
            all_scores += t.step_scores
    assert n_steps >= 6, "test is vacuous: too few steps sampled"
    assert max(all_scores) - min(all_scores) > 1e-3


# ------------------------------------------------------------------- bad input
def test_batch_budget_smaller_than_k_names_both_numbers():
    with pytest.raises(ConfigError, match=r"max_batch_rows=4.*k=8"):
        GenerateConfig(k=8, max_batch_rows=4)
    with pytest.raises(ConfigError, match=r"max_batch_rows=5.*k=6"):
        engine.plan_batches([6], 5)
    assert GenerateConfig(k=200).batch_rows == 200 and GenerateConfig(k=8).batch_rows == 128
    assert engine.plan_batches([4] * 5, 8) == [[0, 1], [2, 3], [4]]


def test_a_prompt_longer_than_the_context_fails_alone(tok):
    small = make_model(tok, max_pos=40)
    long = Prob("Start " * 50 + "<think>", pid="too-long")
    ok = [Prob(PROMPTS[0], pid="a"), long, Prob(PROMPTS[1], pid="b")]
    with pytest.raises(ShapeError, match=r"(?s)'too-long'.*context") as e:
        generate_best_of_n(small, tok, ok, None, GenerateConfig(k=2, max_new_tokens=4))
    assert "'a'" not in str(e.value) and "'b'" not in str(e.value)
    res = e.value.results
    assert [r.problem.id for r in res] == ["a", "too-long", "b"]
    assert [len(r.trajectories) for r in res] == [2, 0, 2]


def test_device_cuda_without_cuda_names_the_alternatives(tok, model):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match=r"device: cpu or device: auto"):
        generate_best_of_n(model, tok, probs()[:1], None, GenerateConfig(k=2, device="cuda"))
    with pytest.raises(ConfigError, match="device must be"):
        GenerateConfig(device="tpu")
    with pytest.raises(ConfigError, match="dtype must be"):
        GenerateConfig(dtype="int8")


def test_dtype_bfloat16_runs(tok):
    m = make_model(tok, seed=4)
    out = generate_best_of_n(m, tok, probs()[:2], None,
                             GenerateConfig(k=2, max_new_tokens=6, dtype="bfloat16", device="cpu"))
    assert next(m.backbone.parameters()).dtype == torch.bfloat16
    # the head keeps float32: scores of bfloat16 features at float32 resolution
    assert {p.dtype for p in m.head.parameters()} == {torch.float32}
    assert all(len(ps.trajectories) == 2 for ps in out)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_bench_engine_cli_prints_json_last(capsys, dtype):
    import json

    pytest.importorskip("metastone_lab.backbones.build")
    from metastone_lab.cli import main

    rc = main(["bench", "engine", "--backbone", "random-small", "--problems", "3", "--k", "2",
               "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0", "--batch-rows", "4"]
              + (["--dtype", dtype] if dtype else []))
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["dtype"] == (dtype or "float32")
    for key in ("tokens_per_s", "per_problem_tokens_per_s", "hf_tokens_per_s",
                "speedup_vs_per_problem", "speedup_vs_hf", "scoring_overhead",
                "roofline_tokens_per_s", "roofline_fraction", "peak_rss_gib"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["batches"] == 2 and res["batch_rows"] == 4 and res["clock"] == "wall"
    for name, st in res["ratios"].items():          # per-round ratios: median, min, max
        assert st["median"] == res[name] and st["min"] <= st["median"] <= st["max"], name
    assert main(["bench", "engine", "--k", "4", "--batch-rows", "2"]) == 2   # ConfigError
