"""Screen (no training): does scoring the conclusion as a step close the gap between a
step-level confidence signal and the whole-response mean log-prob? docs/testbed.md, section 3.

    python scripts/screen_conclusion.py <temperature> <n validation problems>

Samples 32 trajectories per validation problem from the tiny default backbone and ranks
each problem's samples by (a) the mean over steps of the step's mean token log-prob,
(b) the same with the conclusion (the tokens after the last step marker) as one more step,
(c) their min variants, (d) the mean log-prob of the whole response; prints the
within-problem AUROC and best-of-32 accuracy of each, beside majority vote."""
import json, sys, time
import numpy as np
from metastone_lab import study
T = float(sys.argv[1]); n = int(sys.argv[2]); k = 32
cfg = study.load_study_config(dict(backbone="tiny", task="arith", train_mode="none", train_steps=0,
        temperature=T, k_max=k, n_test=n, n_val=0, eval_split="val", seed=0,
        train={"head_inputs": "confidence"}))
t0 = time.time()
model, tok = study.prepare_backbone(cfg)
trained = study.train_reflective(cfg, model, tok)
from metastone_lab.generate import generate_best_of_n
from metastone_lab.tasks import get_task
task = get_task("arith")
probs = task.problems("val", n)
samples = generate_best_of_n(trained.model, tok, probs, task, cfg.generate_config(k))
marker = tok.convert_tokens_to_ids(".\n\n")
def spans(t):
    ids, lp = t.token_ids, t.token_logprobs
    cuts = [i for i, x in enumerate(ids) if x == marker]
    out, s = [], 0
    for c in cuts:
        out.append(lp[s:c + 1]); s = c + 1
    return out, lp[s:]
feats = {}
rows = []
for ps in samples:
    for t in ps.trajectories:
        st, concl = spans(t)
        sm = [float(np.mean(x)) for x in st if len(x)]
        cm = float(np.mean(concl)) if len(concl) else 0.0
        smin = [float(np.min(x)) for x in st if len(x)]
        cmin = float(np.min(concl)) if len(concl) else 0.0
        n_ops = ps.problem.meta["n_ops"]
        kind = "ok" if t.correct else ("short" if t.n_steps < n_ops else "long" if t.n_steps > n_ops else "wrong_step")
        rows.append(dict(pid=ps.problem.id, correct=t.correct, answer=t.answer, kind=kind,
            steps_mean=np.mean(sm) if sm else -9, steps_plus_concl=np.mean(sm + [cm]) if sm else -9,
            steps_min=min(smin) if smin else -9, steps_min_plus_concl=min(smin + [cmin]) if smin else -9,
            concl_mean=cm, mean_logprob=t.signals.get("mean_logprob", -9)))
import pandas as pd
df = pd.DataFrame(rows)
print("error kinds:", df[~df.correct].kind.value_counts().to_dict(), "n traj", len(df))
def auroc_within(col):
    vals = []
    for _, g in df.groupby("pid"):
        pos, neg = g[g.correct][col].values, g[~g.correct][col].values
        if len(pos) and len(neg):
            vals.append(((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))
    return float(np.mean(vals)), len(vals)
def bon(col):
    return float(np.mean([g.loc[g[col].idxmax(), "correct"] for _, g in df.groupby("pid")]))
maj = float(np.mean([ (g.answer.value_counts().index[0] == g[g.correct].answer.iloc[0]) if g.correct.any() and g.answer.notna().any() else False for _, g in df.groupby("pid")]))
print(f"T={T} pass@1 {df.correct.mean():.3f} pass@{k} {df.groupby('pid').correct.any().mean():.3f} majority {maj:.3f}")
for col in ["steps_mean", "steps_plus_concl", "steps_min", "steps_min_plus_concl", "concl_mean", "mean_logprob"]:
    a, m = auroc_within(col)
    print(f"{col:24s} within {a:.3f} (mixed {m})  bon@{k} {bon(col):.3f}")
print(f"{time.time()-t0:.0f}s")
