"""Representation probe: do the backbone's hidden states at the step positions
tell a problem's right samples from its wrong ones?

The SPRM head is a small MLP on one hidden state per step. It can only rank
the k samples of one problem (what best-of-N needs) if that hidden state
carries the step's correctness. This diagnostic measures the ceiling directly:

1. sample ``k`` trajectories per problem from the policy on ``n_train`` train
   and ``n_test`` test problems (the same engine and step rule as evaluation);
2. read every hidden layer at the scored step positions;
3. fit a logistic-regression probe per layer on the train rollouts, once with
   the **oracle step labels** (step correct = before the task's first wrong
   step; what no self-supervised head can see) and once with the **outcome
   label** on every step (what the SPR loss sees before its filter);
4. score the held-out test trajectories with the probe (geometric mean of step
   probabilities, the reference aggregator) and report pooled step AUROC,
   pooled trajectory AUROC, **within-problem AUROC** and best-of-k accuracy.

The same probes are also fitted on the policy's confidence in each step's
tokens (:mod:`metastone_lab.confidence`; rows ``confidence`` and
``<feature layer>+confidence``), the input of the ``head_inputs`` deviation.
``frame.attrs`` carries the fraction of mixed problems and the majority-vote
accuracy on the same samples, so one run is a testbed screen
(``--held-out-split val``; docs/testbed.md).

As a contrast that needs no training, the policy's own mean token log-prob
of each trajectory (at temperature 1) ranks the same samples: when it ranks
them well and the probes do not, the model "knows" the right answer in its
output distribution but the step-position hidden state does not expose it.

    frame = run_probe(model, tokenizer, task, ProbeConfig(n_train=300, n_test=100))

``metastone-lab probe`` runs it on a named backbone and logs the table to the
MLflow experiment ``probe``; ``make ablations`` runs it and the report shows it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from . import cli_help
from .config import check, composes, subconfig
from .config_tree import SamplingConfig, StepsConfig, TaskConfig
from .errors import ConfigError

#: MLflow experiment the probe logs to (read by the report)
PROBE_EXPERIMENT = "probe"
#: columns of the probe table
COLUMNS = ["feature", "labels", "step_auroc", "traj_auroc", "within_auroc", "within_lo",
           "within_hi", "bon_at_k", "bon_lo", "bon_hi", "n_test_steps"]
_NAN_METRICS = {c: float("nan") for c in COLUMNS[2:-1]}


@composes
@dataclass
class ProbeConfig:
    """What to sample and how to fit the probes.

    ``layers``: indices into the backbone's ``hidden_states`` (0 = embeddings,
    -1 = last); empty = every layer. ``l2``: ridge penalty of the logistic
    regression (on standardised features). The shared knobs live in the composed
    sub-configs (:mod:`metastone_lab.config_tree`; flat names work): ``workload``
    (backbone, task, task_options, prompt_format), ``sampling`` of the probed
    trajectories (temperature, top_p, max_new_tokens, seed) and ``segmentation``
    (segmenter, segmenter_options, read_at; ``aggregator`` turns the probe's step
    probabilities into a trajectory score). The probe samples at the study's
    ``top_p`` 1.0 (before the config tree it took GenerateConfig's 0.95; ``make ablations``
    keeps 0.95, ``ablations.PROBE_SAMPLING``, so the reported probe figures reproduce).
    """

    n_train: int = 300
    n_test: int = 100
    k: int = 8
    workload: TaskConfig = subconfig(TaskConfig)
    sampling: SamplingConfig = subconfig(SamplingConfig)
    segmentation: StepsConfig = subconfig(StepsConfig)
    layers: tuple = ()
    l2: float = 1e-3
    max_iter: int = 200
    #: hidden layer that the ``<layer>+confidence`` rows concatenate with the
    #: policy-confidence features (the SPRM head's feature layer)
    feature_layer: int = -2
    #: held-out problems the probes are scored on: "val" to screen candidates (the
    #: test split is touched once, at the end), "test" for the reported figure
    held_out_split: Literal["val", "test"] = "test"

    def __post_init__(self) -> None:
        self.workload.check("ProbeConfig")
        self.segmentation.check("ProbeConfig")
        self.sampling.check("ProbeConfig")
        check(self.n_train >= 1, f"ProbeConfig.n_train must be >= 1, got {self.n_train}")
        check(self.n_test >= 1, f"ProbeConfig.n_test must be >= 1, got {self.n_test}")
        check(self.k >= 2, f"ProbeConfig.k must be >= 2 (within-problem ranking needs "
                           f"several samples per problem), got {self.k}")
        check(self.l2 >= 0, f"ProbeConfig.l2 must be >= 0, got {self.l2}")
        self.layers = tuple(int(v) for v in self.layers)


# ------------------------------------------------------------------ the probe
def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, max_iter: int = 200):
    """Fit ``p(y=1|x) = sigmoid(x_std @ w + b)`` by L-BFGS on the mean log-loss
    plus ``l2 * |w|^2``. ``x`` (N, C) float, ``y`` (N,) in {0, 1}. Returns a
    function (M, C) -> probabilities (M,) (standardised with the train statistics)."""
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ConfigError(f"fit_logistic: x must be (N, C) and y (N,), got {tuple(x.shape)} "
                          f"and {tuple(y.shape)}")
    x = x.double()
    y = y.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) \
            + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda xs: torch.sigmoid(((xs.double() - mu) / sd) @ w + b).float()


# ------------------------------------------------------------ the rollouts
@dataclass
class _Rollouts:
    features: list           # per layer: (S, C) float32, S = all scored steps
    step_label: np.ndarray   # (S,) 1 = step before the first wrong step; -1 = unknown
    outcome: np.ndarray      # (S,) the trajectory's correctness on each step
    traj_of_step: np.ndarray  # (S,) trajectory index
    traj_correct: np.ndarray  # (T,)
    traj_group: np.ndarray    # (T,) problem index
    traj_logprob: np.ndarray  # (T,) mean token log-prob under the policy (temperature 1)
    confidence: torch.Tensor | None = None  # (S, N_CONF) per-step policy-confidence stats
    traj_answer: list | None = None          # (T,) extracted answers (for majority vote)


@torch.inference_mode()
def collect(model, tokenizer, task, split: str, n: int, cfg: ProbeConfig,
            seed_offset: int = 0) -> _Rollouts:
    """Sample ``cfg.k`` trajectories for ``n`` problems of ``split`` and read every
    hidden layer at their step positions (one re-forward per problem)."""
    from .generate import GenerateConfig, encode_prompt, generate_best_of_n, pad_right
    from .sprm import ReflectiveModel

    rm = model if hasattr(model, "head_logits_from_hidden") else ReflectiveModel(model)
    backbone = rm.backbone
    gcfg = GenerateConfig(k=cfg.k, sampling=dataclasses.replace(cfg.sampling,
                                                                seed=cfg.seed + seed_offset),
                          segmentation=copy.deepcopy(cfg.segmentation))
    samples = generate_best_of_n(rm, tokenizer, task.problems(split, n), task, gcfg)
    feats: list[list[torch.Tensor]] = []
    step_label, outcome, traj_of_step = [], [], []
    correct, group, logprob = [], [], []
    conf_rows: list[list[float]] = []
    answers: list = []
    dev = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        for pi, ps in enumerate(samples):
            prompt = encode_prompt(tokenizer, ps.problem.prompt)
            seqs = [prompt + list(t.token_ids) for t in ps.trajectories]
            ids, attn, _ = pad_right(seqs, pad_id=0)  # padding is masked and never read
            out = backbone(input_ids=ids.to(dev), attention_mask=attn.to(dev),
                           output_hidden_states=True)
            hs = [h.float().cpu() for h in out.hidden_states]
            logp = out.logits.float().cpu().log_softmax(-1)
            ent = -(logp.exp() * logp).sum(-1)                        # (B, L) entropy
            if not feats:
                feats = [[] for _ in hs]
            for i, t in enumerate(ps.trajectories):
                ti = len(correct)
                n_gen = len(t.token_ids)
                if n_gen:
                    tok = ids[i, len(prompt):len(prompt) + n_gen]
                    lp = logp[i, len(prompt) - 1:len(prompt) - 1 + n_gen].gather(1, tok[:, None])
                    logprob.append(float(lp.mean()))
                else:
                    logprob.append(float("-inf"))
                correct.append(bool(t.correct))
                answers.append(t.answer)
                group.append(pi)
                fws = t.first_wrong_step
                prev = len(prompt)  # first token of the current step
                for j, pos in enumerate(t.step_positions):
                    conf_rows.append(step_confidence(logp[i], ent[i], ids[i], prev, pos))
                    prev = pos + 1
                    for layer, h in enumerate(hs):
                        feats[layer].append(h[i, pos])
                    step_label.append(-1 if fws is None else int(fws == -1 or j < fws))
                    outcome.append(int(t.correct))
                    traj_of_step.append(ti)
    finally:
        backbone.train(was_training)
    if not step_label:
        raise ConfigError(f"probe: no scored step in {len(correct)} {split} trajectories; the "
                          f"{cfg.segmenter!r} segmenter found no step positions (does the "
                          f"tokenizer have the step token?)")
    return _Rollouts([torch.stack(f) for f in feats], np.asarray(step_label),
                     np.asarray(outcome), np.asarray(traj_of_step), np.asarray(correct),
                     np.asarray(group), np.asarray(logprob),
                     torch.tensor(conf_rows, dtype=torch.float32), answers)


#: names of :func:`step_confidence`'s features: the probe's own screen set (raw log-probs
#: and entropy of the step's tokens). The head's inputs (``confidence.step_features``) are
#: a related but different set: g-transformed log-probs, self-certainty, DeepConf.
PROBE_CONFIDENCE_FEATURES = ("min_logprob", "mean_logprob", "last_logprob", "mean_entropy",
                             "max_entropy")


def step_confidence(logp: torch.Tensor, ent: torch.Tensor, ids: torch.Tensor, start: int,
                    end: int) -> list[float]:
    """The policy's confidence in one step's tokens ``ids[start..end]`` (inclusive).

    ``logp`` (L, V) log-softmax of the logits at temperature 1, ``ent`` (L,) their
    entropy, ``ids`` (L,). Token ``q`` is predicted at position ``q - 1``. Returns
    :data:`PROBE_CONFIDENCE_FEATURES` (all from logits the decoder computed anyway).
    """
    start = max(1, start)
    if start > end:          # a read before the response: no token of the step is known
        return [0.0, 0.0, 0.0, 0.0, 0.0]
    q = torch.arange(start, end + 1)
    lp = logp[q - 1].gather(1, ids[q][:, None]).squeeze(1)     # (n,)
    e = ent[q - 1]
    return [float(lp.min()), float(lp.mean()), float(lp[-1]), float(e.mean()), float(e.max())]


def _trajectory_scores(step_p: np.ndarray, r: _Rollouts, aggregator: str = "geometric"
                       ) -> np.ndarray:
    """Per trajectory (T,): the ``aggregator`` aggregate of its step probabilities
    (``ProbeConfig.aggregator``, default the reference ``geometric``;
    :func:`scoring.aggregate_scores`; zero-step rows score 0)."""
    from .scoring import aggregate_scores

    per_traj: list[list[float]] = [[] for _ in r.traj_correct]
    for ti, p in zip(r.traj_of_step, step_p):
        per_traj[ti].append(float(p))
    return np.asarray([aggregate_scores(ps, aggregator) for ps in per_traj])


def _row(feature: str, labels: str, traj_scores: np.ndarray, te: _Rollouts,
         step_p: np.ndarray | None) -> dict:
    """One table row; CIs (95 %) resample test problems (1000 bootstrap draws)."""
    from .metrics import auroc, bootstrap_ci, per_group_auroc, per_group_best

    known = te.step_label >= 0
    step_auc = float("nan")
    if step_p is not None and known.any() and len(set(te.step_label[known])) == 2:
        step_auc = auroc(step_p[known], te.step_label[known])
    traj_auc = auroc(traj_scores, te.traj_correct) if len(set(te.traj_correct)) == 2 \
        else float("nan")
    within = per_group_auroc(traj_scores, te.traj_correct, te.traj_group)
    best = per_group_best(traj_scores, te.traj_correct, te.traj_group)
    w_lo, w_hi = bootstrap_ci(within)
    b_lo, b_hi = bootstrap_ci(best)
    return {"feature": feature, "labels": labels, "step_auroc": step_auc,
            "traj_auroc": traj_auc,
            "within_auroc": float(np.mean(within)) if within else float("nan"),
            "within_lo": w_lo, "within_hi": w_hi,
            "bon_at_k": float(np.mean(best)) if best else float("nan"),
            "bon_lo": b_lo, "bon_hi": b_hi, "n_test_steps": int(len(te.outcome))}


def layer_name(index: int, n_states: int) -> str:
    i = index % n_states
    return "embeddings" if i == 0 else f"layer_{i}"


def _check_layers(model, layers: Sequence[int], n_states: int | None = None) -> None:
    if n_states is None:
        from .sprm import backbone_config

        n_layers = getattr(backbone_config(getattr(model, "backbone", model)),
                           "num_hidden_layers", None)
        if n_layers is None:
            return
        n_states = int(n_layers) + 1
    for v in layers:
        if not -n_states <= v < n_states:
            raise ConfigError(f"ProbeConfig.layers: {v} is out of range for a backbone with "
                              f"{n_states} hidden states (0 = embeddings, -1 = last)")


def run_probe(model, tokenizer, task, cfg: ProbeConfig | None = None):
    """The probe table (pandas DataFrame, :data:`COLUMNS`) plus ``frame.attrs``
    with ``pass@1``, ``pass@k``, ``k``, ``n_train_steps``, ``n_test_steps`` and
    ``seconds``. Rows: one per (layer, label kind) and ``policy_logprob``."""
    import pandas as pd

    cfg = cfg or ProbeConfig()
    t0 = time.perf_counter()
    _check_layers(model, cfg.layers)
    tr = collect(model, tokenizer, task, "train", cfg.n_train, cfg, seed_offset=0)
    te = collect(model, tokenizer, task, cfg.held_out_split, cfg.n_test, cfg, seed_offset=104729)
    n_states = len(tr.features)
    layers = cfg.layers or tuple(range(n_states))
    _check_layers(model, layers, n_states)
    rows = []
    label_kinds = [("outcome", tr.outcome)]
    if (tr.step_label >= 0).all() and len(set(tr.step_label)) == 2:
        label_kinds.insert(0, ("oracle_step", tr.step_label))
    for v in layers:
        for kind, y in label_kinds:
            if len(set(y)) < 2:  # one class only: nothing to fit, the row says so
                rows.append({"feature": layer_name(v, n_states), "labels": kind,
                             **_NAN_METRICS, "n_test_steps": int(len(te.outcome))})
                continue
            predict = fit_logistic(tr.features[v], torch.as_tensor(y), cfg.l2, cfg.max_iter)
            p = predict(te.features[v]).numpy()
            rows.append(_row(layer_name(v, n_states), kind, _trajectory_scores(p, te, cfg.aggregator), te, p))
    # the policy's own confidence at each step, alone and beside the feature layer
    fl = layer_name(cfg.feature_layer, n_states)
    extra = [("confidence", tr.confidence, te.confidence),
             (f"{fl}+confidence", torch.cat([tr.features[cfg.feature_layer], tr.confidence], 1),
              torch.cat([te.features[cfg.feature_layer], te.confidence], 1))]
    for name, xtr, xte in extra:
        for kind, y in label_kinds:
            if len(set(y)) < 2:
                continue
            predict = fit_logistic(xtr, torch.as_tensor(y), cfg.l2, cfg.max_iter)
            p = predict(xte).numpy()
            rows.append(_row(name, kind, _trajectory_scores(p, te, cfg.aggregator), te, p))
    rows.append(_row("policy_logprob", "none", te.traj_logprob, te, None))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    groups = {}
    for c, g in zip(te.traj_correct, te.traj_group):
        groups.setdefault(g, []).append(bool(c))
    frame.attrs.update({
        "mixed_fraction": float(np.mean([0 < sum(v) < len(v) for v in groups.values()])),
        "majority@k": _majority_accuracy(te),
        "pass@1": float(np.mean(te.traj_correct)),
        "pass@k": float(np.mean([any(v) for v in groups.values()])),
        "k": cfg.k, "n_train_steps": int(len(tr.outcome)), "n_test_steps": int(len(te.outcome)),
        "n_test_problems": len(groups), "seconds": time.perf_counter() - t0,
    })
    return frame


def _majority_accuracy(r: _Rollouts) -> float:
    """Accuracy of a majority vote over each test problem's k answers
    (:func:`select.majority`: None never wins, first answer wins ties)."""
    from .select import majority

    by: dict[int, list[dict]] = {}
    for a, c, g in zip(r.traj_answer, r.traj_correct, r.traj_group):
        by.setdefault(int(g), []).append({"answer": a, "correct": bool(c)})
    return float(np.mean([ts[majority(ts)]["correct"] for ts in by.values()]))


def metrics_of(frame) -> dict[str, float]:
    """Flat MLflow metrics: ``<feature>.<labels>.<column>`` plus the attrs."""
    out = {}
    for _, r in frame.iterrows():
        for c in COLUMNS[2:-1]:
            v = r[c]
            if v == v:  # not NaN
                out[f"{r['feature']}.{r['labels']}.{c}"] = float(v)
    out.update({k: float(v) for k, v in frame.attrs.items()})
    return out


def run_and_log(backbone: str | None = None, cfg: ProbeConfig | None = None, *,
                task: str | None = None, tracking_uri: str | None = None,
                backbone_options: dict | None = None, task_options: dict | None = None,
                log=print):
    """Build/load ``backbone``, run the probe, log it to the MLflow experiment
    ``probe`` (params, flat metrics, the table as ``probe.json``). Returns the frame.
    ``backbone`` / ``task`` / ``task_options``, when given, replace ``cfg``'s."""
    from . import tracking
    from .config import from_dict, to_dict
    from .study import StudyConfig, prepare_backbone
    from .tasks import get_task
    from .tasks.prompts import apply_prompt_format

    cfg = copy.deepcopy(cfg or ProbeConfig())
    for name, value in (("backbone", backbone), ("task", task), ("task_options", task_options)):
        if value is not None:
            setattr(cfg, name, value)
    cfg.workload.check("ProbeConfig")
    model, tok = prepare_backbone(from_dict(StudyConfig, {
        "backbone": cfg.backbone, "backbone_options": dict(backbone_options or {})}))
    torch.manual_seed(cfg.seed)
    the_task = get_task(cfg.task, **dict(cfg.task_options))
    frame = run_probe(model, tok, apply_prompt_format(the_task, tok, cfg.prompt_format), cfg)
    log(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    log("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                  for k, v in frame.attrs.items()))
    t = tracking.Tracker(tracking_uri)
    with t.run(PROBE_EXPERIMENT, run_name=f"probe-{cfg.backbone}",
               params={"backbone_options": dict(backbone_options or {}), **to_dict(cfg)}):
        t.log_metrics(metrics_of(frame), step=0)
        t.log_table(frame, "probe.json")
    return frame


def cli_main(argv: list[str] | None = None) -> int:
    ap = cli_help.parser("metastone-lab probe", cli_help.first_paragraph(__doc__))
    ap.add_argument("--backbone", default=TaskConfig.backbone, help="tiny | micro | smollm2 | an HF id/path")
    ap.add_argument("--task", default=TaskConfig.task, help="task name (metastone_lab.tasks)")
    ap.add_argument("--n-train", type=int, default=ProbeConfig.n_train,
                    help="train problems the probes are fitted on")
    ap.add_argument("--n-test", type=int, default=ProbeConfig.n_test,
                    help="held-out problems the probes are scored on")
    ap.add_argument("--k", type=int, default=ProbeConfig.k, help="samples per problem")
    ap.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens,
                    help="tokens per sample at most")
    ap.add_argument("--seed", type=int, default=SamplingConfig.seed, help="sampling seed")
    ap.add_argument("--prompt-style", default="plain",
                    help="plain | chat (the tokenizer's chat template; for instruction models)")
    ap.add_argument("--shots", type=int, default=0, help="worked train examples shown first")
    ap.add_argument("--temperature", type=float, default=SamplingConfig.temperature,
                    help="sampling temperature of the probed trajectories")
    ap.add_argument("--top-p", type=float, default=SamplingConfig.top_p,
                    help="nucleus sampling mass of the probed trajectories (1.0 = plain sampling; "
                         "figures measured before the config tree used 0.95)")
    ap.add_argument("--read-at", default=StepsConfig.read_at,
                    choices=["before_step_token", "step_token"], help="where a step is read")
    ap.add_argument("--held-out-split", default="test", choices=["val", "test"],
                    help="problems the probes are scored on: val to screen, test to report")
    ap.add_argument("--task-options", default="{}", help="task config as JSON, e.g. "
                    "'{\"n_ops_min\": 3}'")
    ap.add_argument("--backbone-options", default="{}", help="TinyBackboneConfig overrides as "
                    "JSON for the tiny family, e.g. '{\"steps\": 700}'")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlruns.db)")
    a = ap.parse_args(argv)
    import json

    try:
        task_options, backbone_options = json.loads(a.task_options), json.loads(a.backbone_options)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--task-options / --backbone-options must be JSON objects: {e}") from None
    fmt = {} if (a.prompt_style, a.shots) == ("plain", 0) else \
        {"style": a.prompt_style, "shots": a.shots}
    cfg = ProbeConfig(n_train=a.n_train, n_test=a.n_test, k=a.k, temperature=a.temperature,
                      top_p=a.top_p,
                      read_at=a.read_at, held_out_split=a.held_out_split,
                      max_new_tokens=a.max_new_tokens, seed=a.seed, prompt_format=fmt)
    run_and_log(a.backbone, cfg, task=a.task, tracking_uri=a.tracking_uri,
                backbone_options=backbone_options, task_options=task_options)
    return 0


__all__ = ["ProbeConfig", "PROBE_EXPERIMENT", "fit_logistic", "collect", "run_probe", "metrics_of", "run_and_log", "cli_main"]
