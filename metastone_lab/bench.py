"""Benchmarks behind ``metastone-lab bench ...``.

Each subcommand is a ``cli_*(argv) -> int`` function that prints human-readable
lines and, as its **last line**, one JSON object with the figures.

``bench inference`` (:func:`cli_inference`) - best-of-N generation with in-flight
SPRM scoring. All baselines run in the same process, on the same prompts, after a
warm-up, in ``--repeats`` interleaved rounds (every path once per round, prompt by
prompt: A B C on prompt 1, C B A on prompt 2, ...; :func:`interleaved_runs`). Each ratio below is computed per round from the two
paths that ran side by side; the JSON gives its median (the headline key) and, under
``ratios``, its median, min and max over the rounds:

* ``p1_scoring_overhead`` = (our BoN decode + in-flight scoring + step readout)
  / (the same decode without scoring). Goal <= 1.03.
* ``reforward_overhead`` = (reference-style scoring: one batched forward over each
  finished trajectory + step mask) / (our unscored decode). For contrast.
* ``p2_hf_generate_over_ours`` = ``model.generate(num_return_sequences=k)`` time /
  our scored BoN time at the same k and the same sampled length (both forced to
  exactly ``max_new_tokens``: ``min_new_tokens`` for HF, ``ignore_eos`` for ours).
  Goal >= 1.5.
* ``a_a_control`` = the unscored decode / itself, run again in the same rounds: its
  spread (under ``ratios``) is the noise floor of every ratio here on this machine.
* ``p5_peak_rss_gib`` = peak RSS (``ru_maxrss``) of the process after our BoN at
  k, measured before the HF / re-forward baselines run. Goal <= 2 GiB.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence
from . import cli_help


# ------------------------------------------------------------------ helpers
def _peak_rss_gib() -> float:
    """Peak resident set size of this process in GiB (Linux ru_maxrss is KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 ** 3) if sys.platform == "darwin" else r / (1024 ** 2)


def interleaved_runs(fns: dict[str, Callable[[], Any] | Sequence[Callable[[], Any]]],
                     repeats: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds of every run of each fn: ``warmup`` untimed rounds,
    then ``repeats`` timed rounds, each running every fn once.

    A fn may be a list of parts (e.g. one per prompt): a round then runs part j of
    every fn before part j + 1, and a fn's time in the round is the sum of its parts,
    so the paths compared in one ratio run next to each other at a fine grain. The
    order snakes (A B C, C B A, ...) from one part (or round) to the next, so that
    load drift on a shared machine hits all alike.
    Returns ``{name: {"wall": [s] * repeats, "cpu": [s] * repeats}}``."""
    parts = {n: list(f) if isinstance(f, (list, tuple)) else [f] for n, f in fns.items()}
    depth = max(len(p) for p in parts.values())
    names = list(fns)
    for _ in range(warmup):
        for p in parts.values():
            for fn in p:
                fn()
    runs: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in fns}
    turn = 0
    for _ in range(repeats):
        wall = dict.fromkeys(names, 0.0)
        cpu = dict.fromkeys(names, 0.0)
        for j in range(depth):
            for n in (names if turn % 2 == 0 else names[::-1]):
                if j < len(parts[n]):
                    w0, c0 = time.perf_counter(), time.process_time()
                    parts[n][j]()
                    cpu[n] += time.process_time() - c0
                    wall[n] += time.perf_counter() - w0
            turn += 1
        for n in names:
            runs[n]["wall"].append(wall[n])
            runs[n]["cpu"].append(cpu[n])
    return runs


def run_medians(runs: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """``{name: {"wall": median, "cpu": median}}`` of :func:`interleaved_runs`' output."""
    return {n: {c: statistics.median(v[c]) for c in ("wall", "cpu")} for n, v in runs.items()}


def ratio_stats(runs: dict[str, dict[str, list[float]]], a: str, b: str, clock: str,
                ) -> dict[str, float] | None:
    """Median, min and max over the rounds of the per-round ratio ``a / b`` (the two
    paths ran side by side in each round); None when either path did not run."""
    if a not in runs or b not in runs:
        return None
    q = [x / max(y, 1e-12) for x, y in zip(runs[a][clock], runs[b][clock])]
    return {"median": round(statistics.median(q), 4), "min": round(min(q), 4),
            "max": round(max(q), 4)}


def _interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                         ) -> dict[str, dict[str, float]]:
    """Medians of :func:`interleaved_runs` (wall and CPU seconds per fn)."""
    return run_medians(interleaved_runs(fns, repeats, warmup))


def _random_backbone(seed: int = 0, tiny: bool = False):
    """The default tiny architecture with random weights (development fallback).

    ``tiny=True`` builds a much smaller model (tests)."""
    from .backbones.build import TinyBackboneConfig, make_model
    from .backbones.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = TinyBackboneConfig(seed=seed)
    if tiny:
        cfg = TinyBackboneConfig(seed=seed, hidden_size=32, num_layers=2, num_heads=2,
                                 intermediate_size=64)
    return make_model(cfg, tok).eval(), tok


def _load(spec: str):
    if spec in ("random", "random-small"):
        return _random_backbone(tiny=spec == "random-small")
    from .backbones import load_backbone

    return load_backbone(spec)


# ----------------------------------------------------------------- inference
def inference_parser() -> argparse.ArgumentParser:
    p = cli_help.parser(
        "metastone-lab bench inference",
        "Benchmark best-of-N generation with in-flight SPRM scoring against "
        "unscored decoding, reference re-forward scoring and HF generate.")
    p.add_argument("--backbone", default="tiny",
                   help="backbone spec for load_backbone ('tiny' default, 'smollm2', a local "
                        "HF dir), 'random' (tiny architecture, random weights) or "
                        "'random-small' (a toy, for tests)")
    p.add_argument("--head", default=None, help="score_module.pt to load (default: a random head)")
    p.add_argument("--k", type=int, default=32, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens sampled per trajectory at most")
    p.add_argument("--n-prompts", type=int, default=4, help="arith test prompts")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds (every path once per round, interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--segmenter", default="reference", help="step segmenter (metastone_lab.steps)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--skip-hf", action="store_true", help="skip the HF generate baseline")
    p.add_argument("--head-mode", default="auto", choices=["auto", "per_step", "deferred"],
                   help="in-flight head mode for the headline P1 (both are also reported)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="clock of the headline ratios: wall or process CPU time "
                        "(steadier on a shared machine with --threads 1); both are reported")
    return p


def run_inference_bench(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Run the inference benchmark; returns the result dict (see module docstring)."""
    import torch

    from . import generate as G
    from . import sampling
    from .sprm import ReflectiveModel, load_score_module
    from .tasks import get_task

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    lm, tok = _load(args.backbone)
    lm.eval()
    head = None
    if args.head:
        head = load_score_module(args.head, int(lm.config.hidden_size))
    model = ReflectiveModel(lm, head=head).eval()
    prompts = [p.prompt for p in get_task("arith").problems("test", args.n_prompts)]
    prompt_ids = [G.encode_prompt(tok, p) for p in prompts]
    k, T = args.k, args.max_new_tokens
    base = dict(k=k, max_new_tokens=T, chunk_size=k, temperature=args.temperature,
                top_p=args.top_p, segmenter=args.segmenter, ignore_eos=True, seed=args.seed)
    cfg_plain = G.GenerateConfig(**base, score=False)
    cfg_score = G.GenerateConfig(**base, score=True, head_mode=args.head_mode)
    other = "per_step" if G.resolve_head_mode(cfg_score, model.hidden_size, len(prompt_ids[0])) \
        == "deferred" else "deferred"
    cfg_other = G.GenerateConfig(**base, score=True, head_mode=other)
    eos = sampling.eos_ids(model, tok)
    pad = sampling.pad_id_for(tok, eos)
    aggs = G._aggregators(cfg_score)
    log(f"bench inference: backbone={args.backbone} k={k} max_new_tokens={T} "
        f"prompts={len(prompt_ids)} threads={args.threads} repeats={args.repeats} "
        f"head_mode={G.resolve_head_mode(cfg_score, model.hidden_size, len(prompt_ids[0]))}")

    finished: list[list[list[int]]] = []

    def ours(cfg: G.GenerateConfig, j: int, keep: bool = False) -> None:
        pids = prompt_ids[j]   # prompt j from its own generator (all rows run T tokens)
        gen = G.problem_generator(args.seed, j)
        for ch in G.decode_chunks(model, pids, cfg, eos=eos, pad_id=pad, generator=gen):
            if cfg.score:   # step mask + head readout + trajectory scores count as scoring
                mask = G.finish_chunk(model, ch, tok, cfg, len(pids))
                G._trajectory_scores(ch.head, mask, aggs)
                torch.sigmoid(ch.head[mask])
            if keep:
                finished.append([ch.ids[r, :int(ch.lengths[r])].tolist()
                                 for r in range(ch.ids.shape[0])])

    # P5 first: peak RSS of our scored BoN, before any baseline touches memory
    for j in range(len(prompt_ids)):
        ours(cfg_score, j)
    peak = _peak_rss_gib()
    for j in range(len(prompt_ids)):
        ours(cfg_plain, j, keep=True)

    def reforward(j: int) -> None:
        G.reforward_scores(model, tok, finished[j], segmenter=args.segmenter,
                           prompt_lens=[len(prompt_ids[j])] * len(finished[j]), batch_size=k,
                           pad_id=pad)

    def hf(j: int) -> None:
        torch.manual_seed(args.seed * 1_000_003 + j)
        with torch.inference_mode():
            lm.generate(input_ids=torch.tensor([prompt_ids[j]]), do_sample=True,
                        temperature=args.temperature, top_p=args.top_p, top_k=0,
                        num_return_sequences=k, max_new_tokens=T, min_new_tokens=T,
                        pad_token_id=pad)

    def per_prompt(fn: Callable[..., None], *a: Any) -> list[Callable[[], None]]:
        # one part per prompt: the paths alternate prompt by prompt (interleaved_runs)
        return [lambda j=j: fn(*a, j) for j in range(len(prompt_ids))]

    # ours_plain_again: the unscored path once more, an A/A control whose per-round
    # ratio to ours_plain (ideally 1) shows the measurement's own noise on this machine
    fns = {"ours_plain": per_prompt(ours, cfg_plain), "ours_scored": per_prompt(ours, cfg_score),
           "ours_plain_again": per_prompt(ours, cfg_plain),
           f"ours_scored_{other}": per_prompt(ours, cfg_other), "reforward": per_prompt(reforward)}
    if not args.skip_hf:
        fns["hf_generate"] = per_prompt(hf)
    runs = interleaved_runs(fns, args.repeats, args.warmup)
    t = run_medians(runs)
    c = args.clock
    pairs = {"p1_scoring_overhead": ("ours_scored", "ours_plain"),
             f"p1_scoring_overhead_{other}": (f"ours_scored_{other}", "ours_plain"),
             "reforward_overhead": ("reforward", "ours_plain"),
             "a_a_control": ("ours_plain_again", "ours_plain"),
             "p2_hf_generate_over_ours": ("hf_generate", "ours_scored")}
    stats = {n: ratio_stats(runs, a, b, c) for n, (a, b) in pairs.items()}

    def ratio(name: str, clock: str = c) -> float | None:
        st = stats[name] if clock == c else ratio_stats(runs, *pairs[name], clock)
        return None if st is None else st["median"]

    for n, v in t.items():
        log(f"  {n:<26}: wall {v['wall']:.3f} s   cpu {v['cpu']:.3f} s")
    for n, st in stats.items():
        if st is not None:
            log(f"  {n:<30}: median {st['median']:.4f}  min {st['min']:.4f}  "
                f"max {st['max']:.4f}  ({args.repeats} rounds, {c})")
    log(f"  peak RSS after our BoN    : {peak:.3f} GiB")
    tokens = len(prompt_ids) * k * T
    return {
        "k": k,
        "p1_scoring_overhead": ratio("p1_scoring_overhead"),
        "reforward_overhead": ratio("reforward_overhead"),
        "p2_hf_generate_over_ours": ratio("p2_hf_generate_over_ours"),
        "p5_peak_rss_gib": round(peak, 4),
        "clock": c,
        "ratios": stats,
        "head_mode": cfg_score.head_mode if cfg_score.head_mode != "auto" else
        G.resolve_head_mode(cfg_score, model.hidden_size, len(prompt_ids[0])),
        f"p1_scoring_overhead_{other}": ratio(f"p1_scoring_overhead_{other}"),
        "other_clock": {n: ratio(n, "cpu" if c == "wall" else "wall")
                        for n in ("p1_scoring_overhead", "reforward_overhead",
                                  "p2_hf_generate_over_ours")},
        "backbone": args.backbone,
        "max_new_tokens": T,
        "n_prompts": len(prompt_ids),
        "threads": args.threads,
        "repeats": args.repeats,
        "seconds": {n: {kk: round(vv, 4) for kk, vv in v.items()} for n, v in t.items()},
        "ours_scored_tokens_per_s": round(tokens / t["ours_scored"]["wall"], 1),
    }


def cli_inference(argv: list[str] | None = None) -> int:
    """``metastone-lab bench inference``: last output line is one JSON object."""
    args = inference_parser().parse_args(argv)
    from .errors import ConfigError

    for name in ("k", "max_new_tokens", "n_prompts", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"bench inference: --{name.replace('_', '-')} must be >= 1, "
                              f"got {getattr(args, name)}")
    result = run_inference_bench(args)
    print(json.dumps(result), flush=True)
    return 0


# =========================================================================== train bench
# ``metastone-lab bench train``: seconds per joint step (GRPO + SPR, one forward) vs a
# policy-only GRPO step on the SAME rollouts, in the same process (owned by the
# training engineer; appended to this module).

def train_parser() -> argparse.ArgumentParser:
    ap = cli_help.parser(
        "metastone-lab bench train",
        "Benchmark a joint GRPO+SPR step against a policy-only GRPO step on the "
        "same rollouts. The last output line is one JSON object.")
    ap.add_argument("--backbone", default="tiny",
                    help="backbone spec (tiny | micro | smollm2 | dir), or 'random' for the "
                         "tiny architecture with random weights")
    ap.add_argument("--n", type=int, default=8, help="group size (trajectories per prompt)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="tokens per rollout at most")
    ap.add_argument("--kl-coef", type=float, default=1e-3, help="KL penalty to the reference policy")
    ap.add_argument("--repeats", type=int, default=7,
                    help="timed rounds, each one joint and one policy-only step (>= 5 for "
                         "a median, min and max worth reading)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="rollout seed")
    return ap


def _train_bench_backbone(spec: str):
    if spec == "random":
        from .backbones.build import TinyBackboneConfig, make_model
        from .backbones.tokenizer import build_tokenizer

        tok = build_tokenizer()
        return make_model(TinyBackboneConfig(), tok), tok
    from .backbones import load_backbone

    return load_backbone(spec)


def run_train_bench(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Time ``Trainer.update`` (joint) and ``Trainer.update(policy_only=True)`` on one
    fixed rollout batch, interleaved (A B, B A, ...; :func:`interleaved_runs`) after
    warm-up. ``ratio`` is the median over the rounds of the per-round joint / policy
    time; ``ratio_stats`` its median, min and max; the step times are medians."""
    import tempfile

    import torch

    from .train import TrainConfig, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = _train_bench_backbone(args.backbone)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(backbone=args.backbone, n=args.n, prompts_per_step=args.prompts,
                          max_new_tokens=args.max_new_tokens, kl_coef=args.kl_coef,
                          eval_every=0, checkpoint_every=0, output_dir=tmp, seed=args.seed)
        t = Trainer(cfg, model=model, tokenizer=tok)
        batch = t.make_rollouts(t.train_problems(1))
        tokens = int(batch.attention_mask.sum())
        log(f"bench train: backbone={args.backbone} batch={len(batch)}x{batch.input_ids.shape[1]}"
            f" tokens={tokens} response_tokens={batch.n_response_tokens} "
            f"pass_rate={float(batch.correct.float().mean()):.3f} threads={torch.get_num_threads()}")
        # policy_again: an A/A control (the policy-only step once more), whose per-round
        # ratio to policy (ideally 1) is the noise floor of the ratio on this machine
        fns = {"joint": lambda: t.update(batch), "policy": lambda: t.update(batch, policy_only=True),
               "policy_again": lambda: t.update(batch, policy_only=True)}
        runs = interleaved_runs(fns, args.repeats, args.warmup)
    med = run_medians(runs)
    joint, policy = med["joint"]["wall"], med["policy"]["wall"]
    stats = ratio_stats(runs, "joint", "policy", "wall")
    res = {"joint_step_s": round(joint, 5), "policy_step_s": round(policy, 5),
           "ratio": stats["median"], "ratio_stats": stats,
           "a_a_control": ratio_stats(runs, "policy_again", "policy", "wall"),
           "tokens_per_s": round(tokens / joint, 1),
           "tokens": tokens, "batch": len(batch), "backbone": args.backbone,
           "repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads(),
           "head_params": t.param_counts["head"], "lora_params": t.param_counts["lora"],
           "backbone_params": t.param_counts["backbone"]}
    log(f"joint {joint * 1e3:.1f} ms  policy-only {policy * 1e3:.1f} ms  ratio (per round) "
        f"median {stats['median']:.4f} min {stats['min']:.4f} max {stats['max']:.4f}")
    return res


def cli_train(argv: list[str] | None = None) -> int:
    """``metastone-lab bench train``; prints one JSON object as the last line."""
    args = train_parser().parse_args(argv)
    res = run_train_bench(args, log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(res))
    return 0
