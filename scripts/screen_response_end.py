"""Offline screen of scored validation samples (scripts/screen_val.py's dump): which
part of a response the step-level signal misses at k = 32. docs/testbed.md, section 3.

    python scripts/screen_response_end.py dump.pkl

Ranks each problem's samples by training-free proxies of the head's inputs (the min over
steps of the step's lowest token log-prob, and the mean over steps of its mean token
log-prob) under four definitions of the last step, and prints best-of-32 accuracy and
within-problem AUROC of each, beside the head and the whole-response mean log-prob:
- current: the steps, plus the conclusion of a response that has a ``</think>``;
- A: also the tail of a response without ``</think>`` (it stopped early);
- B: the EOS in the conclusion's span;
- C: both (what ``conclusion: true`` does now)."""
import pickle
import sys

import numpy as np

test = pickle.load(open(sys.argv[1], "rb"))


def best_of_n(score):
    return float(np.mean([ps.trajectories[int(np.argmax([score(t) for t in ps.trajectories]))].correct
                          for ps in test]))


def within(score):
    a = []
    for ps in test:
        y = np.array([t.correct for t in ps.trajectories])
        if y.all() or not y.any():
            continue
        s = np.array([score(t) for t in ps.trajectories])
        pos, neg = s[y], s[~y]
        a.append((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
    return float(np.mean(a))


def steps_and_tail(t):
    """Token log-prob segments of the marked steps, and the tokens after the last mark."""
    lp, lo, segs = np.array(t.token_logprobs), 0, []
    for p in t.step_positions:
        hi = p - t.prompt_len + 1
        segs.append(lp[lo:hi])
        lo = hi
    return [s for s in segs if len(s)], list(lp[lo:])


def segments(t, tail_without_think, eos_in_conclusion):
    segs, tail = steps_and_tail(t)
    if not eos_in_conclusion and not t.hit_max_tokens and tail:
        tail = tail[:-1]
    if "</think>" in t.text:
        if eos_in_conclusion and tail and segs:
            segs[-1] = np.concatenate([segs[-1], tail])
    elif tail_without_think and tail:
        segs.append(np.array(tail))
    return segs


print(f"{'scorer':44s} bon@32  within")
for name, f in [("head (geometric)", lambda t: t.scores["geometric"]),
                ("whole-response mean log-prob", lambda t: t.signals["mean_logprob"])]:
    print(f"{name:44s} {best_of_n(f):.3f}   {within(f):.3f}")
for name, a, b in [("current", False, False), ("A: tail without </think>", True, False),
                   ("B: EOS in the conclusion", False, True), ("C: both", True, True)]:
    for agg, red in [("min step-min", lambda ss: min(s.min() for s in ss)),
                     ("mean step-mean", lambda ss: float(np.mean([s.mean() for s in ss])))]:
        f = lambda t: red(segments(t, a, b)) if segments(t, a, b) else -99.0  # noqa: E731
        print(f"{name + ', ' + agg:44s} {best_of_n(f):.3f}   {within(f):.3f}")
samples = [t for ps in test for t in ps.trajectories]
print(f"samples without </think>: {np.mean(['</think>' not in t.text for t in samples]):.4f}")
