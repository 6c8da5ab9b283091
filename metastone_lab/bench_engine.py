"""``metastone-lab bench engine``: the batched best-of-N engine against the
one-problem-per-batch path and HF ``generate``, and against a matmul roofline.

Every path decodes the same ``--problems`` arith test prompts, ``--k`` samples
each, exactly ``--max-new-tokens`` tokens per sample (``ignore_eos`` for ours,
``min_new_tokens`` for HF), so each run produces N*k*T tokens. All paths run in
one process, interleaved after warm-up (``bench.interleaved_runs``); rates are
medians, and each ratio is the median over the rounds of the ratio of the two paths
that ran side by side in that round (its median, min and max are under ``ratios``),
on the ``--clock`` (wall by default; ``cpu`` = process CPU
time, steadier on a shared machine; both are in ``seconds``):

* ``tokens_per_s``: the batched engine with in-flight scoring (decode + head +
  token stats + step mask + trajectory scores), ``engine.decode_stream`` over all
  problems with ``--batch-rows`` rows in flight (what ``generate_best_of_n`` runs;
  with every row decoding T tokens, refilling happens only between whole batches);
* ``per_problem_tokens_per_s``: the same, one problem per batch (the
  per-problem path, ``generate.decode_chunks`` with ``chunk_size = k``);
* ``hf_tokens_per_s``: ``model.generate(num_return_sequences=k, do_sample=True)``
  over the same batches of problems, left-padded (no scoring);
* ``scoring_overhead``: the batched engine with scoring / without;
* ``roofline_tokens_per_s``: the matmul FLOP rate measured here at the model's
  decode shapes ((batch rows, in) x (in, out) for every linear layer of one
  decoder layer and the LM head, timed in the same round-robin) divided by
  2 x parameters FLOPs per token; ``roofline_fraction`` = tokens_per_s / it;
* ``peak_rss_gib``: peak RSS after the batched engine's first run, before the
  baselines run.

``--dtype bfloat16`` casts the backbone for every path (the head stays float32);
the roofline's matmuls then run in that dtype too. ``--device`` (``auto``: CUDA when
present) places the model and the roofline's matmuls; on CUDA every timed run ends
with ``torch.cuda.synchronize()`` and ``peak_gpu_gib`` (``max_memory_allocated``) is
added beside ``peak_rss_gib``; the JSON is otherwise the same.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from . import cli_help


def engine_parser() -> argparse.ArgumentParser:
    p = cli_help.parser(
        "metastone-lab bench engine",
        "Benchmark the batched best-of-N engine (several problems per decode batch) against "
        "one problem per batch, HF generate and a matmul roofline. The last output line is "
        "one JSON object.")
    p.add_argument("--backbone", default="tiny",
                   help="backbone spec for load_backbone (tiny, smollm2 when installed, a local "
                        "HF dir), or 'random' / 'random-small' (random weights, for tests)")
    p.add_argument("--problems", type=int, default=16, help="arith test prompts")
    p.add_argument("--k", type=int, default=8, help="samples per problem")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per sample (exactly)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds (every path once per round, interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of every path first")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="rows per decode batch (default: GenerateConfig's max_batch_rows)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--segmenter", default="paragraph",
                   help="step segmenter (paragraph works with every tokenizer; SmolLM2's "
                        "splits the reference marker)")
    p.add_argument("--skip-hf", action="store_true", help="skip the HF generate baseline")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the backbone to this dtype for every path and the roofline "
                        "(default: as loaded); the scoring head stays float32")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where every path runs: auto (CUDA when present, else CPU), cpu, cuda")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="clock of every figure: wall or process CPU time")
    return p


def linear_shapes(config: Any) -> list[tuple[int, int, int]]:
    """(in, out, count) of the matmuls one token costs in a Llama-like model: per
    decoder layer q/o (C x C), k/v (C x kv), gate/up (C x I), down (I x C); then
    the LM head (C x V)."""
    C, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    heads = config.num_attention_heads
    kv = C // heads * getattr(config, "num_key_value_heads", heads)
    L = config.num_hidden_layers
    return [(C, C, 2 * L), (C, kv, 2 * L), (C, I, 2 * L), (I, C, L), (C, V, 1)]


def make_matmul_probe(config: Any, rows: int, dtype: Any,
                      device: Any = "cpu") -> tuple[Callable[[], None], float]:
    """A function running each decode-shaped matmul ((rows, in) x (in, out), one of
    every distinct shape, ``count`` times) and the FLOPs it does (2 rows in out each)."""
    import torch

    shapes = linear_shapes(config)
    xs = {(i, o): (torch.randn(rows, i, dtype=dtype, device=device),
                   torch.randn(i, o, dtype=dtype, device=device))
          for i, o, _ in shapes}
    flops = float(sum(2 * rows * i * o * n for i, o, n in shapes))

    def run() -> None:
        for i, o, n in shapes:
            a, b = xs[(i, o)]
            for _ in range(n):
                torch.matmul(a, b)
    return run, flops


def run_engine_bench(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Run the engine benchmark; returns the result dict (see the module docstring)."""
    import torch

    from . import generate as G
    from . import sampling
    from .bench import _load, _peak_rss_gib, interleaved_runs, ratio_stats, run_medians
    from .engine import decode_stream, plan_batches
    from .prefix_cache import PrefixStore
    from .sprm import ReflectiveModel
    from .tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = resolve_device(getattr(args, "device", "cpu"))
    lm, tok = _load(args.backbone)
    lm.eval()
    lm.to(device=device)
    if getattr(args, "dtype", None):
        lm.to(dtype=getattr(torch, args.dtype))
    model = ReflectiveModel(lm).eval().to(device)   # the head follows (float32)
    cuda = device.type == "cuda"
    prompt_ids = [G.encode_prompt(tok, p.prompt)
                  for p in get_task("arith").problems("test", args.problems)]
    k, T, N = args.k, args.max_new_tokens, len(prompt_ids)
    base = dict(k=k, max_new_tokens=T, chunk_size=k, temperature=args.temperature,
                top_p=args.top_p, ignore_eos=True, seed=args.seed, segmenter=args.segmenter)
    if args.batch_rows is not None:
        base["max_batch_rows"] = args.batch_rows
    cfg_score = G.GenerateConfig(**base, score=True)
    cfg_plain = G.GenerateConfig(**base, score=False)
    rows = cfg_score.batch_rows
    batches = [[i] for i in range(N)] if rows == 0 else plan_batches([k] * N, rows)
    eos = sampling.eos_ids(model, tok)
    pad = sampling.pad_id_for(tok, eos)
    aggs = G._aggregators(cfg_score)
    log(f"bench engine: backbone={args.backbone} problems={N} k={k} max_new_tokens={T} "
        f"batch_rows={rows} batches={len(batches)} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} clock={args.clock} dtype={next(lm.parameters()).dtype} "
        f"device={device}")

    def gens(idx):
        return [G.problem_generator(args.seed, i) for i in idx]

    def finish(ch, P, cfg) -> None:   # step mask + head readout + trajectory scores
        if cfg.score:
            mask = G.finish_chunk(model, ch, tok, cfg, P)
            G._trajectory_scores(ch.head, mask, aggs)
            torch.sigmoid(ch.head[mask])

    # one PrefixStore per pass, as generate_best_of_n keeps one per call (both paths)
    def engine(cfg) -> None:
        decode_stream(model, prompt_ids, cfg, eos=eos, pad_id=pad, generators=gens(range(N)),
                      on_chunk=lambda i, ch: finish(ch, len(prompt_ids[i]), cfg),
                      max_rows=rows or k, prefix_store=PrefixStore())

    def per_problem() -> None:
        store = PrefixStore()
        for i, pids in enumerate(prompt_ids):
            for ch in G.decode_chunks(model, pids, cfg_score, eos=eos, pad_id=pad,
                                      generator=gens([i])[0], prefix_store=store):
                finish(ch, len(pids), cfg_score)

    def hf() -> None:
        torch.manual_seed(args.seed)
        with torch.inference_mode():
            for b in batches:
                ids, attn, _ = sampling.pad_left([prompt_ids[i] for i in b], pad, device)
                lm.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                            temperature=args.temperature, top_p=args.top_p, top_k=0,
                            num_return_sequences=k, max_new_tokens=T, min_new_tokens=T,
                            pad_token_id=pad)

    dtype = next(lm.parameters()).dtype
    matmul, flops = make_matmul_probe(lm.config, k * len(batches[0]), dtype, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    engine(cfg_score)                       # peak RSS of the engine, before any baseline
    peak = _peak_rss_gib()
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    fns = {"engine_scored": lambda: engine(cfg_score), "engine_plain": lambda: engine(cfg_plain),
           "per_problem": per_problem, "matmul": matmul}
    if not args.skip_hf:
        fns["hf_generate"] = hf
    if cuda:   # device work is asynchronous: a timed run ends when the GPU is done
        fns = {n: synchronized(f, device) for n, f in fns.items()}
    runs = interleaved_runs(fns, args.repeats, args.warmup)
    t = run_medians(runs)
    c = args.clock
    # per round, the paths of a ratio ran side by side: median / min / max over rounds
    ratios = {"speedup_vs_per_problem": ratio_stats(runs, "per_problem", "engine_scored", c),
              "speedup_vs_hf": ratio_stats(runs, "hf_generate", "engine_scored", c),
              "scoring_overhead": ratio_stats(runs, "engine_scored", "engine_plain", c)}
    tokens = N * k * T
    n_params = sum(p.numel() for p in lm.parameters())
    rate = {n: tokens / max(v[c], 1e-12) for n, v in t.items() if n != "matmul"}
    roof = flops / max(t["matmul"][c], 1e-12) / (2 * n_params)
    for n, v in t.items():
        log(f"  {n:<14}: wall {v['wall']:.3f} s   cpu {v['cpu']:.3f} s")
    log(f"  matmul rate   : {flops / t['matmul'][c] / 1e9:.2f} GFLOP/s ({c}); "
        f"params {n_params / 1e6:.1f} M; peak RSS {peak:.3f} GiB")
    r4 = (lambda x: None if x is None else round(x, 4))
    hf_rate = rate.get("hf_generate")
    return {
        "tokens_per_s": round(rate["engine_scored"], 1),
        "per_problem_tokens_per_s": round(rate["per_problem"], 1),
        "hf_tokens_per_s": None if hf_rate is None else round(hf_rate, 1),
        "speedup_vs_per_problem": ratios["speedup_vs_per_problem"]["median"],
        "speedup_vs_hf": None if hf_rate is None else ratios["speedup_vs_hf"]["median"],
        "scoring_overhead": ratios["scoring_overhead"]["median"],
        "ratios": ratios,
        "roofline_tokens_per_s": round(roof, 1),
        "roofline_fraction": r4(rate["engine_scored"] / roof),
        "peak_rss_gib": round(peak, 4),
        **({"peak_gpu_gib": round(peak_gpu, 4)} if cuda else {}),
        "device": str(device),
        "clock": c, "backbone": args.backbone, "dtype": str(dtype).removeprefix("torch."), "problems": N, "k": k, "max_new_tokens": T,
        "batch_rows": rows, "batches": len(batches), "threads": torch.get_num_threads(),
        "repeats": args.repeats, "warmup": args.warmup, "params": n_params,
        "matmul_gflop_per_s": round(flops / t["matmul"][c] / 1e9, 3),
        "seconds": {n: {kk: round(vv, 4) for kk, vv in v.items()} for n, v in t.items()},
    }


def resolve_device(name: str) -> Any:
    """``auto``: CUDA when present, else CPU; ``cuda`` without CUDA: ConfigError."""
    import torch

    from .errors import ConfigError

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench engine: --device cuda, but CUDA is not available on this "
                          "machine; use --device cpu or --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def synchronized(fn: Callable[[], Any], device: Any) -> Callable[[], None]:
    """``fn`` followed by ``torch.cuda.synchronize(device)``."""
    import torch

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)
    return run


def cli_engine(argv: list[str] | None = None) -> int:
    """``metastone-lab bench engine``: last output line is one JSON object."""
    args = engine_parser().parse_args(argv)
    from .errors import ConfigError

    for name in ("problems", "k", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"bench engine: --{name.replace('_', '-')} must be >= 1, "
                              f"got {getattr(args, name)}")
    if args.batch_rows is not None and 0 < args.batch_rows < args.k:
        raise ConfigError(f"bench engine: --batch-rows {args.batch_rows} is smaller than one "
                          f"problem's --k {args.k} rows")
    result = run_engine_bench(args)
    print(json.dumps(result), flush=True)
    return 0


__all__ = ["engine_parser", "run_engine_bench", "cli_engine", "linear_shapes",
           "make_matmul_probe", "resolve_device", "synchronized"]
