"""Do a study's held-out selections depend on the torch thread count? (issue 16 §8)

Samples the quickstart's test problems from one trained checkpoint with N torch threads
and writes every sample's tokens, SPRM score and self-signals to a JSON file; ``compare``
then reads two such files and prints, per selector, on how many problems the pick
differs (with exact ties only, and with metastone_lab.select's rule that a
rounding-sized gap is a tie), and for each differing pick the gap between the two
candidates' values.

    python scripts/thread_invariance.py sample CKPT --threads 1 --out /tmp/t1.json
    python scripts/thread_invariance.py sample CKPT --threads 2 --out /tmp/t2.json
    python scripts/thread_invariance.py compare /tmp/t1.json /tmp/t2.json

CKPT: a ``ckpt-<step>`` folder of a quickstart run (``runs/quickstart/default/train/
cfg-*/ckpt-40``). Options ``--n-test`` and ``--k`` shrink the run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def sample(args: argparse.Namespace) -> None:
    os.environ["METASTONE_LAB_THREADS"] = str(args.threads)
    import torch
    import yaml

    from metastone_lab import study
    from metastone_lab.generate import generate_best_of_n
    from metastone_lab.tasks import get_task

    spec = yaml.safe_load(open(args.spec))
    cfg = study.load_study_config(spec["parameters"])
    model, tok = study.prepare_backbone(cfg)
    torch.set_num_threads(args.threads)
    trained = study.load_trained(args.checkpoint, model, tok)
    task = get_task(cfg.task, **cfg.task_options)
    problems = task.problems(cfg.eval_split, args.n_test or cfg.n_test)
    out = generate_best_of_n(trained.model, tok, problems, task,
                             cfg.generate_config(args.k or cfg.k_max))
    rows = [[{"ids": t.token_ids, "correct": t.correct, "answer": t.answer,
              "sprm": t.scores.get(cfg.aggregator), "signals": t.signals}
             for t in ps.trajectories] for ps in out]
    with open(args.out, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "problems": rows}, f)
    print(f"wrote {args.out}: {len(rows)} problems, {torch.get_num_threads()} threads")


def _pick_exact(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):      # lowest index on exact ties only
        if v > values[best]:
            best = i
    return best


def _pick(values: list[float]) -> int:
    """The library's argmax (metastone_lab.select: rounding-sized gaps tie)."""
    from metastone_lab.select import _argmax

    return _argmax(values)


def compare(args: argparse.Namespace) -> None:
    a, b = (json.load(open(p)) for p in (args.a, args.b))
    print(f"threads {a['threads']} vs {b['threads']}, {len(a['problems'])} problems")
    same_tokens = all([t["ids"] for t in pa] == [t["ids"] for t in pb]
                      for pa, pb in zip(a["problems"], b["problems"]))
    print(f"identical sampled tokens: {same_tokens}")
    worst = 0.0
    for pa, pb in zip(a["problems"], b["problems"]):
        for ta, tb in zip(pa, pb):
            for key in ("mean_logprob", "self_certainty", "deepconf"):
                x, y = ta["signals"][key], tb["signals"][key]
                if x != y and abs(x) != float("inf"):
                    worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
    print(f"largest relative difference of a trajectory signal between the runs: {worst:.3g}")
    for rule, pick in (("exact ties", _pick_exact), ("select's tie rule", _pick)):
        print(f"-- picks with {rule}")
        _compare_picks(a, b, pick)


def _compare_picks(a: dict, b: dict, _pick) -> None:
    for key in ("sprm", "mean_logprob", "self_certainty", "deepconf"):
        diffs = []
        for n, (pa, pb) in enumerate(zip(a["problems"], b["problems"])):
            va = [t["sprm"] if key == "sprm" else t["signals"][key] for t in pa]
            vb = [t["sprm"] if key == "sprm" else t["signals"][key] for t in pb]
            ia, ib = _pick(va), _pick(vb)
            if ia != ib:
                diffs.append((n, ia, ib, va[ia] - va[ib], vb[ib] - vb[ia],
                              pa[ia]["correct"], pa[ib]["correct"],
                              pa[ia]["ids"] == pa[ib]["ids"]))
        flips = sum(d[5] != d[6] for d in diffs)
        print(f"{key:15} picks differ on {len(diffs)} problems, correctness on {flips}")
        for d in diffs:
            print(f"   problem {d[0]}: pick {d[1]} vs {d[2]}; gap in run A {d[3]:.3g}, in run B "
                  f"{d[4]:.3g}; correct {d[5]} / {d[6]}; same tokens {d[7]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("checkpoint")
    s.add_argument("--threads", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--spec", default="experiments/quickstart.yaml")
    s.add_argument("--n-test", type=int, default=0)
    s.add_argument("--k", type=int, default=0)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args(argv)
    sample(args) if args.cmd == "sample" else compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
