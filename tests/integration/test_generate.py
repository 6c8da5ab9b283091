"""Best-of-N engine: config validation, sampling, in-flight vs re-forward scores."""
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tolerance import EPS32, head_terms, llama_terms, rounding_bound  # noqa: E402

from metastone_lab import generate as G
from metastone_lab import sampling
from metastone_lab.errors import ConfigError, ShapeError
from metastone_lab.generate import GenerateConfig, generate_best_of_n, reforward_scores

WORDS = (["<pad>", "<eos>", "<unk>", ".\n\n", "<think>", "</think>", "\n\n", "\n", " "]
         + list("0123456789") + ["+", "-", "*", "=", ".", "?", "Start", "with", "Add",
                                 "The", "answer", "is", "What", "result"])


def make_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z]+|\d|[^\w\s]|\s"), behavior="isolated")
    tk.add_tokens([AddedToken(t, normalized=False) for t in (".\n\n", "<think>", "</think>", "\n\n")])
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(tok, seed=0, max_pos=256, step_bias=2.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from metastone_lab.sprm import ReflectiveModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_pos, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    lm = LlamaForCausalLM(cfg)
    bias = torch.zeros(len(tok))   # make step tokens / newlines frequent and EOS rarer
    for w, b in ((".\n\n", step_bias), ("\n\n", 1.0), (".", 1.0), ("<eos>", -1.0)):
        bias[tok.convert_tokens_to_ids(w)] = b
    lm.lm_head.register_forward_hook(lambda mod, inp, out: out + bias.to(out.device))
    model = ReflectiveModel(lm)
    with torch.no_grad():   # a head with spread-out logits so a wrong read is visible
        model.head[0].weight.mul_(20.0)
    return model.eval()


class Prob:
    def __init__(self, prompt, answer="12", pid="p0"):
        self.prompt, self.answer, self.id = prompt, answer, pid


class FakeTask:
    """Answer = the digit after 'is' at the end; step labels = -1 if correct else 0."""

    def extract_answer(self, text):
        import re
        m = re.findall(r"is\s*(\d)", text.split("</think>")[-1]) if "</think>" in text else []
        return m[-1] if m else None

    def is_correct(self, text, problem):
        a = self.extract_answer(text)
        return a is not None and a == problem.answer

    def first_wrong_step(self, text, problem):
        return -1 if self.is_correct(text, problem) else 0


def score_bound(model, seqs) -> float:
    """How far an in-flight step probability may be from the re-forward one by rounding
    alone (tests/_tolerance.py): the KV-cached, chunked forward and the full forward
    compute the same logit; they differ by at most the rounding bound of the layers
    and the head (n terms, on the scale of the largest step logit of these sequences),
    and sigmoid' <= 1/4, plus the sigmoid's own rounding of each (2 eps32)."""
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    attn = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(ids.to(dev), attention_mask=attn.to(dev)).step_logits.cpu()
    scale = float(logits[attn.bool()].abs().max())
    cfg = model.backbone.config
    n = llama_terms(cfg, L) + head_terms(cfg.hidden_size, model.head[0].out_features)
    return rounding_bound(n, scale) / 4 + 2 * EPS32


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


PROMPT = "Start with 7 . Add 5 . What is the result ?\n<think>"


# ------------------------------------------------------------------------ config
def test_config_validation():
    with pytest.raises(ConfigError, match="k must be >= 1"):
        GenerateConfig(k=0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerateConfig(k=2, max_new_tokens=0)
    with pytest.warns(UserWarning, match="identical"):
        GenerateConfig(k=4, temperature=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GenerateConfig(k=1, temperature=0.0)  # greedy single sample: fine
    with pytest.raises(ConfigError, match="unknown key"):
        GenerateConfig.from_dict({"kk": 3})


def test_head_mode_auto_respects_buffer_budget():
    small = GenerateConfig(k=4, max_new_tokens=10, feature_buffer_mb=1.0)
    assert G.resolve_head_mode(small, 32, 10) == "deferred"
    big = GenerateConfig(k=32, max_new_tokens=8192, feature_buffer_mb=1.0)
    assert G.resolve_head_mode(big, 1536, 100) == "per_step"
    with pytest.raises(ConfigError, match="head_mode"):
        GenerateConfig(head_mode="lazy")


def test_effort_modes():
    assert [GenerateConfig(effort=e).k for e in ("low", "medium", "high")] == [2, 8, 32]
    assert GenerateConfig(effort="high", effort_map={"high": 64}).k == 64
    with pytest.raises(ConfigError, match="effort_map"):
        GenerateConfig(effort="extreme")
    with pytest.raises(ConfigError, match="contradicts"):
        GenerateConfig(k=4, effort="low")


def test_sample_next_top_p_and_greedy():
    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    s = G.sample_next(logits, 1.0, 0.5, g)
    assert set(s.tolist()) == {0}                     # top token alone reaches p=0.5
    s = G.sample_next(logits, 1.0, 0.99, g)
    assert set(s.tolist()) == {0, 1}                  # the tail is cut
    assert G.sample_next(logits[:3], 0.0, 1.0, g).tolist() == [0, 0, 0]


# ---------------------------------------------------------------------- engine
def test_generate_returns_full_trajectories(tok, model):
    from metastone_lab import scoring

    cfg = GenerateConfig(k=5, max_new_tokens=24, chunk_size=2, temperature=1.0, top_p=1.0)
    out = generate_best_of_n(model, tok, [Prob(PROMPT)], FakeTask(), cfg)
    assert len(out) == 1 and len(out[0].trajectories) == 5
    P = len(tok(PROMPT)["input_ids"])
    for t in out[0].trajectories:
        assert set(t.scores) == set(scoring.AGGREGATORS.names())
        assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in t.scores.values())
        assert t.n_steps == len(t.step_positions) == len(t.step_scores)
        assert 1 <= len(t.token_ids) <= 24
        eos_in = tok.eos_token_id in t.token_ids
        assert t.hit_max_tokens == (not eos_in)
        if eos_in:
            assert t.token_ids[-1] == tok.eos_token_id and t.token_ids.count(tok.eos_token_id) == 1
        assert all(p >= P - 1 for p in t.step_positions)
        assert t.prompt_len == P
        if t.n_steps == 0:
            assert t.scores["geometric"] == 0.0  # documented empty-score rule
        assert t.correct == FakeTask().is_correct(t.text, None or Prob(PROMPT))
    assert sum(t.n_steps for t in out[0].trajectories) > 0
    # different samples (temperature 1) and a reproducible seed
    texts = [t.token_ids for t in out[0].trajectories]
    assert len({tuple(x) for x in texts}) > 1
    again = generate_best_of_n(model, tok, [Prob(PROMPT)], FakeTask(), cfg)
    assert [t.token_ids for t in again[0].trajectories] == texts


def test_chunking_does_not_change_samples_shape_and_model_mode_restored(tok, model):
    model.train()
    cfg = GenerateConfig(k=3, max_new_tokens=8, chunk_size=0, temperature=1.0)
    out = generate_best_of_n(model, tok, [Prob(PROMPT)], None, cfg)
    assert model.training  # restored
    model.eval()
    assert len(out[0].trajectories) == 3


def test_ignore_eos_gives_full_length(tok, model):
    cfg = GenerateConfig(k=4, max_new_tokens=12, temperature=1.0, ignore_eos=True)
    out = generate_best_of_n(model, tok, [Prob(PROMPT)], FakeTask(), cfg)
    assert all(len(t.token_ids) == 12 and t.hit_max_tokens for t in out[0].trajectories)
    # max tokens with no answer: incorrect and counted
    n = out[0].n_max_tokens_no_answer
    assert n == sum(t.answer is None for t in out[0].trajectories)
    assert all(not t.correct for t in out[0].trajectories if t.answer is None)


SEGMENTERS = [("reference", {}), ("paragraph", {}), ("sentence", {}),
              ("regex", {"pattern": r"\.\n\n"}), ("fixed", {"n": 3}),
              ("reference", {"conclusion": True})]


@pytest.mark.parametrize("head_mode", ["per_step", "deferred"])
@pytest.mark.parametrize("read_at", ["before_step_token", "step_token"])
@pytest.mark.parametrize("segmenter,options", SEGMENTERS)
def test_inflight_scores_equal_reforward(tok, model, segmenter, options, read_at, head_mode):
    # top_p 0.95: GenerateConfig's default when this test was written (the conclusion case
    # relies on its samples reaching </think>)
    cfg = GenerateConfig(k=6, max_new_tokens=20, chunk_size=4, temperature=1.0, top_p=0.95,
                         segmenter=segmenter, segmenter_options=options, read_at=read_at, seed=3,
                         head_mode=head_mode)
    out = generate_best_of_n(model, tok, [Prob(PROMPT)], None, cfg)[0].trajectories
    prompt_ids = tok(PROMPT)["input_ids"]
    seqs = [prompt_ids + t.token_ids for t in out]
    ref = reforward_scores(model, tok, seqs, segmenter=segmenter, segmenter_options=options,
                           read_at=read_at, prompt_lens=[len(prompt_ids)] * len(seqs),
                           batch_size=4)
    n_steps = 0
    all_scores = []
    tol = score_bound(model, seqs)
    for t, r in zip(out, ref):
        assert t.step_positions == r["positions"]
        assert t.step_scores == pytest.approx(r["scores"], abs=tol)
        n_steps += t.n_steps
        all_scores += t.step_scores
    assert n_steps >= 3, "test is vacuous: too few steps sampled"
    if options.get("conclusion"):   # every response's end was read (the EOS is its step token)
        back = 2 if read_at == "before_step_token" else 1
        ends = [t for t in out if len(t.token_ids) >= 2]
        assert ends and all(t.step_positions[-1] == len(prompt_ids) + len(t.token_ids) - back
                            for t in ends)
        assert any(tok.convert_tokens_to_ids("</think>") in t.token_ids for t in out)
    # scores differ across positions, so reading the wrong position would be caught
    assert max(all_scores) - min(all_scores) > 1e-3


@pytest.mark.parametrize("head_mode", ["per_step", "deferred"])
def test_reforward_with_final_token_read(tok, model, head_mode):
    """read_at='step_token' on a sequence that ends with a step token needs the
    final token's hidden state: the engine feeds it once more."""
    cfg = GenerateConfig(k=8, max_new_tokens=6, temperature=1.0, read_at="step_token",
                         segmenter="fixed", segmenter_options={"n": 1}, ignore_eos=True,
                         head_mode=head_mode)
    out = generate_best_of_n(model, tok, [Prob(PROMPT)], None, cfg)[0].trajectories
    prompt_ids = tok(PROMPT)["input_ids"]
    P = len(prompt_ids)
    ref = reforward_scores(model, tok, [prompt_ids + t.token_ids for t in out],
                           segmenter="fixed", segmenter_options={"n": 1}, read_at="step_token",
                           prompt_lens=[P] * len(out))
    last_scored = 0
    tol = score_bound(model, [prompt_ids + t.token_ids for t in out])
    for t, r in zip(out, ref):
        assert not any(math.isnan(s) for s in t.step_scores)
        assert t.step_positions == r["positions"]
        assert t.step_scores == pytest.approx(r["scores"], abs=tol)
        last_scored += (P + len(t.token_ids) - 1) in t.step_positions
    assert last_scored > 0, "no trajectory had its final token scored; test is vacuous"


def test_prompt_longer_than_context(tok):
    small = make_model(tok, max_pos=16)
    long_prompt = "Start " * 20 + "<think>"
    n = len(tok(long_prompt)["input_ids"])
    with pytest.raises(ShapeError, match=rf"(?s){n} tokens.*context.* 16"):
        generate_best_of_n(small, tok, [Prob(long_prompt)], None, GenerateConfig(k=2))


def test_bare_backbone_rejected_for_scoring(tok, model):
    with pytest.raises(ConfigError, match="ReflectiveModel"):
        generate_best_of_n(model.backbone, tok, [Prob(PROMPT)], None, GenerateConfig(k=2))
    # without scoring a bare LM works (benchmark baseline)
    out = generate_best_of_n(model.backbone, tok, [Prob(PROMPT)], None,
                             GenerateConfig(k=2, max_new_tokens=4, score=False))
    assert out[0].trajectories[0].scores == {}


def test_evaluate_table(tok, model):
    cfg = GenerateConfig(k=4, max_new_tokens=16, temperature=1.0)
    probs = [Prob(PROMPT, pid=f"p{i}") for i in range(3)]
    samples = generate_best_of_n(model, tok, probs, FakeTask(), cfg)
    tab = G.evaluate(samples, ks=[1, 2, 4], n_boot=20, val_samples=samples, log=False)
    assert {"accuracy", "auroc", "ece", "max_tokens_no_answer"} <= set(tab.metric)
    acc = tab[tab.metric == "accuracy"]
    assert set(acc.selector) >= {"sprm_bon", "majority", "oracle", "pass@k"}
    assert set(acc.k) == {1, 2, 4}


def test_vllm_backend_is_honest(tok, model):
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="vllm"):
        G.BACKENDS.get("vllm")(model, tok, [Prob(PROMPT)], None, GenerateConfig(k=2))


def test_sample_next_probe_matches_full_sort_distribution():
    """The top-k probe must give the same nucleus as a full sort, whether or not
    the probe covers it (flat logits force the fallback)."""
    g = torch.Generator().manual_seed(0)
    for scale in (0.3, 6.0):   # flat (fallback path) and peaked (probe path)
        logits = torch.randn(1, 300, generator=g) * scale
        probs = torch.softmax(logits, -1)[0]
        sp, si = probs.sort(descending=True)
        keep = set(si[((sp.cumsum(0) - sp) < 0.9)].tolist())
        draws = G.sample_next(logits.repeat(4000, 1), 1.0, 0.9, g, probe=4)
        assert set(draws.tolist()) <= keep
        if len(keep) <= 20:     # every nucleus token gets drawn
            assert set(draws.tolist()) == keep


def test_bench_inference_cli_prints_json_last(capsys):
    import json

    pytest.importorskip("metastone_lab.backbones.build")
    from metastone_lab.bench import cli_inference

    rc = cli_inference(["--backbone", "random-small", "--k", "2", "--max-new-tokens", "3",
                        "--n-prompts", "1", "--repeats", "1", "--warmup", "0"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    for key in ("k", "p1_scoring_overhead", "reforward_overhead", "p2_hf_generate_over_ours",
                "p5_peak_rss_gib"):
        assert key in res
    assert res["k"] == 2 and res["p1_scoring_overhead"] > 0 and res["p5_peak_rss_gib"] > 0
    st = res["ratios"]["p1_scoring_overhead"]       # per-round ratios: median within min, max
    assert st["median"] == res["p1_scoring_overhead"] and st["min"] <= st["median"] <= st["max"]
    aa = res["ratios"]["a_a_control"]                # the noise floor: the plain path vs itself
    assert aa["min"] <= aa["median"] <= aa["max"] and aa["min"] > 0


# ------------------------------------------------------- training-free self-signals
@pytest.fixture(scope="module")
def eos_model(tok):
    """The micro model with EOS made likely, so rows finish at different lengths."""
    m = make_model(tok, seed=1)
    boost = torch.zeros(len(tok))
    boost[tok.eos_token_id] = 2.0
    m.backbone.lm_head.register_forward_hook(lambda mod, inp, out: out + boost)
    return m


def test_token_stats_formulas_by_hand():
    """p = (1/2, 1/4, 1/4) (logits = log p) and a uniform row, V = 3, top-k = 2."""
    ln2, ln3 = math.log(2.0), math.log(3.0)
    logits = torch.tensor([[-ln2, -2 * ln2, -2 * ln2], [0.7, 0.7, 0.7]])
    lp, sc, cf = G.token_stats(logits, torch.tensor([1, 0]), topk=2)
    # log p(sampled): log 1/4 and log 1/3
    assert lp.tolist() == pytest.approx([-2 * ln2, -ln3], abs=1e-6)
    # KL(U || p) = -log V - (1/V) sum_j log p_j = -ln3 + (ln2 + 2 ln2 + 2 ln2) / 3; uniform: 0
    assert sc.tolist() == pytest.approx([-ln3 + 5 * ln2 / 3, 0.0], abs=1e-6)
    # DeepConf: -(1/k) sum of the top-k log p = (ln2 + 2 ln2) / 2; uniform: ln3
    assert cf.tolist() == pytest.approx([1.5 * ln2, ln3], abs=1e-6)
    assert G.token_stats(logits, torch.tensor([0, 0]), topk=50).shape == (3, 2)  # k > V: all
    # the top-k indices the sampler already sorted (any temperature) give the same stats
    g = torch.Generator().manual_seed(0)
    big = torch.randn(5, 40, generator=g) * 3
    nxt, top = sampling.sample_next_with_top(big, 0.6, 0.9, g)
    assert top is not None and top.shape[-1] >= 20
    assert torch.allclose(G.token_stats(big, nxt, 20, top), G.token_stats(big, nxt, 20))


def test_token_stats_in_row_blocks_equal_one_piece(monkeypatch):
    """token_stats works in blocks of rows (small float32 temporaries); every stat is
    row-wise, so blocks of 3 rows (and a ragged last block, 3-D input) give the
    one-piece values."""
    from metastone_lab import token_signals

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 50, generator=g) * 4).to(torch.bfloat16)   # (2, 7, V)
    ids = torch.randint(0, 50, (2, 7), generator=g)
    top = logits.float().topk(8, dim=-1).indices
    whole = token_signals._token_stats(logits, ids, 5, top)                  # (3, 2, 7)
    monkeypatch.setattr(token_signals, "BLOCK_ELEMENTS", 3 * 50)
    blocked = token_signals.token_stats(logits, ids, 5, top)
    assert blocked.shape == (3, 2, 7)
    assert torch.allclose(blocked, whole, rtol=0, atol=1e-6)
    assert torch.allclose(token_signals.token_stats(logits[0], ids[0], 5), whole[:, 0],
                          rtol=0, atol=1e-6)


def test_trajectory_signals_windows_and_empty():
    s = G.trajectory_signals([-1.0, -3.0], [0.5, 1.5], [1.0, 2.0], window=16)
    assert s == {"mean_logprob": -2.0, "self_certainty": 1.0, "deepconf": 1.5}  # one group
    conf = [4.0, 1.0, 3.0, 2.0, 5.0]
    s = G.trajectory_signals([0.0] * 5, [0.0] * 5, conf, window=2)
    assert s["deepconf"] == pytest.approx(2.0)       # windows 2.5, 2.0, 2.5, 3.5 -> min
    assert G.trajectory_signals(conf, conf, conf, window=1)["deepconf"] == 1.0
    empty = G.trajectory_signals([], [], [], window=16)
    assert set(empty) == set(G.SIGNALS) and all(v == -math.inf for v in empty.values())
    with pytest.raises(ConfigError, match="deepconf_window"):
        GenerateConfig(deepconf_window=0)


def test_inflight_token_stats_equal_reforward(tok, eos_model):
    """The stats captured while decoding (from the logits that sampled each token,
    temperature and top-p notwithstanding: RAW logits) equal the stats of a full
    forward over the finished sequences, column for column."""
    from _tolerance import EPS32, llama_terms, rounding_bound

    cfg = GenerateConfig(k=8, max_new_tokens=20, chunk_size=4, temperature=0.7, top_p=0.9,
                         deepconf_topk=5)
    prompt_ids = tok(PROMPT)["input_ids"]
    P = len(prompt_ids)
    eos = sampling.eos_ids(eos_model, tok)
    pad = sampling.pad_id_for(tok, eos)
    chunks = G.decode_chunks(eos_model, prompt_ids, cfg, eos=eos, pad_id=pad,
                             generator=torch.Generator().manual_seed(0))
    n_tokens = finished = 0
    for ch in chunks:
        stats = torch.stack([ch.tok_logprob, ch.tok_self_certainty, ch.tok_confidence])
        assert stats.shape == (3, *ch.ids.shape) and stats.dtype == torch.float32
        cols = torch.arange(ch.ids.shape[1])[None, :]
        resp = (cols >= P) & (cols < ch.lengths[:, None])           # (R, L) response columns
        assert torch.isnan(stats[:, ~resp]).all() and torch.isfinite(stats[:, resp]).all()
        with torch.no_grad():
            attn = (cols < ch.lengths[:, None]).long()
            logits = eos_model.backbone(ch.ids, attention_mask=attn).logits      # (R, L, V)
        # the token at column j was sampled from the logits at position j - 1
        want = G.token_stats(logits[:, :-1], ch.ids[:, 1:], cfg.deepconf_topk)  # (3, R, L-1)
        m = resp[:, 1:]
        got, want = stats[:, :, 1:][:, m], want[:, m]                            # (3, n)
        # Tolerance from float32 rounding alone (tests/_tolerance.py): the KV-cached and
        # the full forward compute each logit with at most n = llama_terms rounded
        # operations on terms of the logits' magnitude, so they differ by delta <=
        # 2 n eps32 max|logit|. log_softmax moves by <= 2 delta (x_j and logsumexp each
        # by delta); the mean over V (self-certainty) and over the top-k (confidence:
        # the top-k sum is 1-Lipschitz in each logit) by no more. Each path's own
        # log_softmax + mean adds <= (V + 2) eps32 max|log p| of rounding.
        delta = rounding_bound(llama_terms(eos_model.backbone.config, ch.ids.shape[1]),
                               float(logits.abs().max()))
        tol = 2 * delta + rounding_bound(logits.shape[-1] + 2,
                                         max(1.0, float(want.abs().max())), EPS32)
        assert (got - want).abs().max() <= tol, ((got - want).abs().max(), tol)
        n_tokens += int(resp.sum())
        finished += int((ch.lengths < P + cfg.max_new_tokens).sum())
    assert n_tokens >= 30, "test is vacuous: too few tokens sampled"
    assert finished, "no row ended with EOS before max_new_tokens; test is vacuous"


def test_trajectory_token_stats_and_signals(tok, eos_model):
    cfg = GenerateConfig(k=5, max_new_tokens=24, chunk_size=2, temperature=1.0, deepconf_window=4)
    out = generate_best_of_n(eos_model, tok, [Prob(PROMPT)], FakeTask(), cfg)[0].trajectories
    assert any(tok.eos_token_id in t.token_ids for t in out), "no EOS sampled; test is vacuous"
    for t in out:   # aligned with token_ids, EOS included
        n = len(t.token_ids)
        assert len(t.token_logprobs) == len(t.token_self_certainty) == len(t.token_confidence) == n
        assert all(lp <= 0 for lp in t.token_logprobs)
        assert all(sc >= -1e-6 for sc in t.token_self_certainty)   # a KL divergence
        assert t.signals == G.trajectory_signals(t.token_logprobs, t.token_self_certainty,
                                                 t.token_confidence, window=4)
        assert all(math.isfinite(v) for v in t.signals.values())
    # the self-signal selectors are in evaluate's table automatically
    tab = G.evaluate([G.ProblemSamples(Prob(PROMPT), out)], ks=[1, 5], n_boot=10, log=False)
    sels = set(tab[tab.metric == "accuracy"].selector)
    assert {f"{s}_{m}" for s in G.SIGNALS for m in ("bon", "vote")} <= sels


def test_token_stats_off_for_the_unscored_baseline(tok, model):
    """score=False keeps the benchmark baseline bare unless token_stats=True is asked."""
    prompt_ids = tok(PROMPT)["input_ids"]
    eos = sampling.eos_ids(model, tok)
    kw = dict(eos=eos, pad_id=sampling.pad_id_for(tok, eos))
    bare = G.decode_chunks(model.backbone, prompt_ids,
                           GenerateConfig(k=2, max_new_tokens=4, score=False), **kw)
    assert bare[0].tok_logprob is None and bare[0].tok_confidence is None
    assert G.decode_chunks(model, prompt_ids, GenerateConfig(k=2, max_new_tokens=4,
                                                             token_stats=False), **kw
                           )[0].tok_logprob is None
    out = generate_best_of_n(model.backbone, tok, [Prob(PROMPT)], None,
                             GenerateConfig(k=2, max_new_tokens=4, score=False,
                                            token_stats=True))
    t = out[0].trajectories[0]
    assert t.scores == {} and len(t.token_logprobs) == len(t.token_ids)
    assert set(t.signals) == set(G.SIGNALS)
    # without signals, evaluate leaves the self-signal selectors out (no error)
    from metastone_lab.select import SIGNAL_OF, usable_selectors
    assert not set(SIGNAL_OF) & set(usable_selectors({"signals": {}}))


def test_rollout_cache_keeps_token_stats_and_loads_old_entries():
    import json

    from metastone_lab.rollout_cache import samples_from_json, samples_to_json
    from metastone_lab.tasks.base import Problem

    t = G.Trajectory(text="", token_ids=[], step_positions=[], step_scores=[], scores={},
                     answer=None, correct=False, first_wrong_step=None, n_steps=0,
                     hit_max_tokens=False, signals=G.trajectory_signals([], [], [], 16))
    u = G.Trajectory(text="x", token_ids=[5], step_positions=[], step_scores=[], scores={},
                     answer="1", correct=True, first_wrong_step=-1, n_steps=0,
                     hit_max_tokens=False, token_logprobs=[-0.5], token_self_certainty=[1.25],
                     token_confidence=[2.0], signals=G.trajectory_signals([-0.5], [1.25], [2.0]))
    prob = Problem(id="p", question="q", answer="1", prompt="q <think>")
    rows = json.loads(json.dumps(samples_to_json([G.ProblemSamples(prob, [t, u])])))
    back = samples_from_json(rows)[0].trajectories
    assert back[0].signals == {s: -math.inf for s in G.SIGNALS}       # -inf survives JSON
    assert back[1] == u
    for r in rows[0]["trajectories"]:   # an entry written before the token stats existed
        for key in ("token_logprobs", "token_self_certainty", "token_confidence", "signals"):
            del r[key]
    old = samples_from_json(rows)[0].trajectories[1]
    assert old.token_logprobs == [] and old.signals == {} and old.token_ids == [5]


# ------------------------------------------------- the hidden+confidence head
@pytest.fixture(scope="module")
def conf_model(tok):
    """The micro model with the confidence head (a named deviation, confidence.py)."""
    from metastone_lab.sprm import ReflectiveModel

    base = make_model(tok, seed=2)
    torch.manual_seed(5)
    m = ReflectiveModel(base.backbone, head_inputs="hidden+confidence")
    with torch.no_grad():
        m.head[0].weight.mul_(20.0)
    return m.eval()


def test_confidence_step_features_by_hand():
    from metastone_lab.confidence import N_CONFIDENCE, step_features

    nan = float("nan")
    lp = torch.tensor([[nan, nan, -1.0, -0.5, -2.0, -0.1, -0.3]])
    sc = torch.tensor([[nan, nan, 2.0, 4.0, 1.0, 3.0, 3.0]])
    cf = torch.tensor([[nan, nan, 5.0, 6.0, 4.0, 7.0, 8.0]])
    stats = torch.stack([lp, sc, cf])                       # (3, 1, 7)
    mask = torch.tensor([[False, False, False, True, False, False, True]])
    V = 100
    f = step_features(stats, mask, 2, V)
    assert f.shape == (2, N_CONFIDENCE)
    logv = math.log(V)
    # step 1 = tokens 2..3, step 2 = tokens 4..6
    g = lambda lp: -math.log(1e-4 - lp)  # noqa: E731 (confidence.SURPRISE_FLOOR)
    want = torch.tensor([[g(-0.5), g(-1.0), g(-0.75), 3.0 / logv, 5.0 / logv],
                         [g(-0.3), g(-2.0), g(-0.8), (7.0 / 3) / logv, 4.0 / logv]])
    assert torch.allclose(f, want, atol=1e-6)   # exact sums of a few float32 values
    # the prompt (columns < response_start) never enters a step, even with known stats
    stats2 = stats.clone()
    stats2[:, :, :2] = -50.0
    assert torch.equal(step_features(stats2, mask, 2, V), f)
    # a read before the response (a training step mask may keep P-1) gets the fixed row,
    # the same whether the prompt's stats are known (training) or NaN (the decoder)
    early = torch.tensor([[False, True, False, True, False, False, False]])
    rows_train = step_features(stats2, early, 2, V)
    rows_engine = step_features(stats, early, 2, V)
    assert torch.equal(rows_train, rows_engine)
    assert rows_train[0].tolist() == pytest.approx([g(0.0)] * 3 + [1.0, 0.0])
    assert rows_train[1].tolist() == pytest.approx(f[0].tolist())


def test_confidence_step_features_run_through_the_step_token():
    """lookahead=1 (the reference read, before the step token): a step read at p spans
    through p + 1, never past the next read or the row."""
    from metastone_lab.confidence import lookahead, step_features

    assert lookahead("before_step_token") == 1 and lookahead("step_token") == 0
    nan = float("nan")
    lp = torch.tensor([[nan, nan, -1.0, -0.5, -2.0, -0.1, -0.3]])
    sc = torch.tensor([[nan, nan, 2.0, 4.0, 1.0, 3.0, 3.0]])
    cf = torch.tensor([[nan, nan, 5.0, 6.0, 4.0, 7.0, 8.0]])
    stats = torch.stack([lp, sc, cf])
    V = 100
    logv = math.log(V)
    g = lambda lp: -math.log(1e-4 - lp)  # noqa: E731
    # reads at 3 and 5: steps are tokens 2..4 (step token 4) and 5..6 (the row's end)
    f = step_features(stats, torch.tensor([[0, 0, 0, 1, 0, 1, 0]]).bool(), 2, V, lookahead=1)
    want = torch.tensor([[g(-2.0), g(-2.0), g(-3.5 / 3), (7.0 / 3) / logv, 4.0 / logv],
                         [g(-0.3), g(-0.3), g(-0.2), 3.0 / logv, 7.0 / logv]])
    assert torch.allclose(f, want, atol=1e-6)
    # adjacent reads: the first step stops before the next read; a read at the row's
    # last column has nothing after it
    f = step_features(stats, torch.tensor([[0, 0, 0, 1, 1, 0, 1]]).bool(), 2, V, lookahead=1)
    assert f[0].tolist() == pytest.approx([g(-0.5), g(-1.0), g(-0.75), 3.0 / logv, 5.0 / logv], abs=1e-6)
    assert f[1].tolist() == pytest.approx([g(-0.1), g(-2.0), g(-1.05), 2.0 / logv, 4.0 / logv], abs=1e-6)
    assert f[2].tolist() == pytest.approx([g(-0.3), g(-0.3), g(-0.3), 3.0 / logv, 8.0 / logv], abs=1e-6)


def test_confidence_head_needs_the_step_mask(tok, conf_model):
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with pytest.raises(ConfigError, match="step_mask"):
        conf_model(ids)


@pytest.mark.parametrize("read_at", ["before_step_token", "step_token"])
def test_confidence_head_inflight_equals_reforward(tok, conf_model, read_at):
    """In flight the head reads the decoder's token stats; the re-forward computes them
    from one full forward: equal up to rounding."""
    from _tolerance import EPS32, head_terms, llama_terms, rounding_bound

    cfg = GenerateConfig(k=6, max_new_tokens=20, chunk_size=4, temperature=1.0, seed=4,
                         read_at=read_at)
    out = generate_best_of_n(conf_model, tok, [Prob(PROMPT)], None, cfg)[0].trajectories
    prompt_ids = tok(PROMPT)["input_ids"]
    seqs = [prompt_ids + t.token_ids for t in out]
    ref = reforward_scores(conf_model, tok, seqs, read_at=read_at,
                           prompt_lens=[len(prompt_ids)] * len(seqs), batch_size=4)
    c = conf_model.backbone.config
    L = max(len(s) for s in seqs)
    # logits, token stats (log_softmax over V) and the head on C + 5 inputs; the step
    # logit is on the scale of the largest one read, sigmoid' <= 1/4
    scale = max(abs(v) for r in ref for v in r["logits"]) if any(r["logits"] for r in ref) else 1
    n = llama_terms(c, L) + c.vocab_size + head_terms(conf_model.head_input_size,
                                                      conf_model.head[0].out_features)
    tol = rounding_bound(n, scale) / 4 + 2 * EPS32
    n_steps = 0
    for t, r in zip(out, ref):
        assert t.step_positions == r["positions"]
        assert t.step_scores == pytest.approx(r["scores"], abs=tol)
        n_steps += t.n_steps
    assert n_steps >= 3, "test is vacuous: too few steps sampled"


def test_confidence_head_changes_with_the_policy_confidence(tok, conf_model):
    """The head really reads the confidence features: the same hidden state with other
    token stats gives another score."""
    from metastone_lab.confidence import N_CONFIDENCE

    feats = torch.zeros(1, 4, conf_model.hidden_size)
    mask = torch.tensor([[False, False, True, True]])
    st_a = torch.zeros(3, 1, 4)
    st_b = st_a.clone()
    st_b[0] = -5.0                                  # the policy was unsure of every token
    a = conf_model.masked_head_logits(feats, mask, stats=st_a, response_start=1)
    b = conf_model.masked_head_logits(feats, mask, stats=st_b, response_start=1)
    assert a.shape == b.shape == (2,)
    assert conf_model.head_input_size == conf_model.hidden_size + N_CONFIDENCE
    assert not torch.allclose(a, b)


def test_confidence_only_head_ignores_the_hidden_state(tok):
    from metastone_lab.confidence import N_CONFIDENCE
    from metastone_lab.sprm import ReflectiveModel

    m = ReflectiveModel(make_model(tok, seed=3).backbone, head_inputs="confidence").eval()
    assert m.head_input_size == N_CONFIDENCE
    mask = torch.tensor([[False, True, True]])
    st = torch.randn(3, 1, 3)
    a = m.masked_head_logits(torch.zeros(1, 3, m.hidden_size), mask, stats=st, response_start=1)
    b = m.masked_head_logits(torch.randn(1, 3, m.hidden_size), mask, stats=st, response_start=1)
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="head_inputs"):
        ReflectiveModel(m.backbone, head_inputs="logits")
