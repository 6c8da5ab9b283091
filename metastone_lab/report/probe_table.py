"""The representation probe's section (``metastone-lab probe``, experiment ``probe``):
its table, rebuilt from the run's flat metrics, and its discussion bullet."""
from __future__ import annotations

import re

from .stats import fmt, load_runs, stat


def load_probe(uri: str | None) -> dict | None:
    """The latest finished ``metastone-lab probe`` run as {"rows": [...], "attrs": {...},
    "run_id", "params"}, rebuilt from its flat metrics; None when the store has none."""
    from ..probe import COLUMNS, PROBE_EXPERIMENT

    t = load_runs(PROBE_EXPERIMENT, uri, children_only=False, dedupe=False)
    if not len(t):
        return None
    r = t.iloc[-1]
    rows: dict[tuple[str, str], dict] = {}
    attrs = {}
    for col, v in r.items():
        if not str(col).startswith("metrics.") or v is None or v != v:
            continue
        parts = str(col)[len("metrics."):].split(".")
        if len(parts) == 3 and parts[2] in COLUMNS:
            rows.setdefault((parts[0], parts[1]), {"feature": parts[0], "labels": parts[1]})[
                parts[2]] = float(v)
        elif len(parts) == 1:
            attrs[parts[0]] = float(v)
    params = {str(c)[len("params."):]: v for c, v in r.items() if str(c).startswith("params.")}

    def order(row):  # embeddings, layer_1..N, then the log-prob baseline
        f = row["feature"]
        depth = 0 if f == "embeddings" else int(f[6:]) if re.fullmatch(r"layer_\d+", f) \
            else 10 ** 6
        return depth, row["labels"]

    return {"rows": sorted(rows.values(), key=order), "attrs": attrs, "run_id": r["run_id"],
            "params": params}


def _probe_ci(row: dict, key: str, lo: str, hi: str) -> str:
    v = row.get(key)
    if v is None:
        return "n/a"
    if row.get(lo) is None or row.get(hi) is None:
        return f"{v:.3f}"
    return f"{v:.3f} [{row[lo]:.3f}, {row[hi]:.3f}]"


def probe_section(uri: str | None) -> tuple[list[str], dict | None]:
    """The representation-probe table (markdown lines) and the parsed run."""
    pr = load_probe(uri)
    L = ["## Representation probe: what the step-position features encode", "",
         "Can *any* head on these features rank a problem's samples? `metastone-lab probe` "
         "samples k trajectories per problem from the frozen policy, reads every hidden layer "
         "at the reference step positions, and fits a logistic-regression probe per layer on "
         "train-split rollouts, with the **oracle step labels** (correct = before the task's "
         "first wrong step, which no self-supervised head sees) or with the outcome label on "
         "every step (what the SPR loss sees). Held-out test trajectories are scored by the "
         "geometric mean of the probe's step probabilities. `policy_logprob` ranks the same "
         "samples by the policy's own mean token log-prob (no training). Within-problem AUROC "
         "and best-of-k carry 95 % bootstrap CIs over test problems (one probe run).", ""]
    if pr is None:
        return L + ["Not run (experiment `probe` has no finished runs; `metastone-lab probe`).",
                    ""], None
    a, p = pr["attrs"], pr["params"]
    L += [f"Run {pr['run_id'][:8]}: backbone `{p.get('backbone', '?')}`, "
          f"{p.get('n_train', '?')} train / {a.get('n_test_problems', float('nan')):.0f} test "
          f"problems x k={a.get('k', float('nan')):.0f} (T={p.get('temperature', '?')}), "
          f"{a.get('n_train_steps', float('nan')):.0f} train steps / "
          f"{a.get('n_test_steps', float('nan')):.0f} test steps; test pass@1 "
          f"{a.get('pass_at_1', float('nan')):.3f}, pass@k {a.get('pass_at_k', float('nan')):.3f}; "
          f"{a.get('seconds', float('nan')):.0f} s.", "",
          "| feature | labels | step AUROC | trajectory AUROC (pooled) | within-problem AUROC "
          "| best-of-k |", "|---|---|---|---|---|---|"]
    for row in pr["rows"]:
        step = row.get("step_auroc")
        traj = row.get("traj_auroc")
        L.append(f"| {row['feature']} | {row['labels']} | "
                 f"{'n/a' if step is None else f'{step:.3f}'} | "
                 f"{'n/a' if traj is None else f'{traj:.3f}'} | "
                 f"{_probe_ci(row, 'within_auroc', 'within_lo', 'within_hi')} | "
                 f"{_probe_ci(row, 'bon_at_k', 'bon_lo', 'bon_hi')} |")
    return L + [""], pr


def probe_bullet(pr: dict, base) -> str | None:
    """The discussion's bullet on the probe: the best hidden-state and confidence probes
    against the policy's own log-prob (and the trained head's within-problem AUROC)."""
    rows = [r for r in pr["rows"] if r.get("within_auroc") is not None]
    oracle = [r for r in rows if r["labels"] == "oracle_step"]
    lp = next((r for r in rows if r["feature"] == "policy_logprob"), None)
    if not oracle or lp is None:
        return None
    nan = float("nan")

    def ci(r):
        return {"mean": r["within_auroc"], "lo": r.get("within_lo", nan),
                "hi": r.get("within_hi", nan), "n": 1}

    hidden = [r for r in oracle if "confidence" not in r["feature"]]
    conf = [r for r in oracle if "confidence" in r["feature"]]
    lpw = ci(lp)
    k = pr["attrs"].get("k", float("nan"))
    text = "**What the step-position features encode (representation probe)**: "
    if hidden:
        bh = max(hidden, key=lambda r: r["within_auroc"])
        text += (f"the best oracle-label probe on a hidden state ({bh['feature']}) ranks a "
                 f"problem's samples at within-problem AUROC {fmt(ci(bh))}, best-of-{k:.0f} "
                 f"{_probe_ci(bh, 'bon_at_k', 'bon_lo', 'bon_hi')}; ")
    if conf:
        bc = max(conf, key=lambda r: r["within_auroc"])
        text += (f"on the policy-confidence features ({bc['feature']}) {fmt(ci(bc))}, "
                 f"best-of-{k:.0f} {_probe_ci(bc, 'bon_at_k', 'bon_lo', 'bon_hi')}; ")
    text += (f"the policy's own mean token log-prob {fmt(lpw)}, best-of-k "
             f"{_probe_ci(lp, 'bon_at_k', 'bon_lo', 'bon_hi')} "
             f"(pass@1 {pr['attrs'].get('pass_at_1', float('nan')):.3f}). ")
    if hidden and ci(bh)["hi"] < lpw["lo"]:  # False when a CI is missing (nan)
        text += ("The hidden states at the step positions do not expose which of a problem's "
                 "samples are right, not even to a probe trained with the true step labels; the "
                 "policy's confidence in the step's tokens does, which is why the default head "
                 "reads it (`head_inputs: confidence`, a named deviation).")
    else:
        text += "The hidden-state features are not clearly worse than the policy's log-prob."
    sprm = stat(base, "auroc_within.geometric") if len(base) else None
    if sprm is not None:
        text += f" The trained SPRM head: {fmt(sprm)}."
    return text
