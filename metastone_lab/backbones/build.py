"""Build the tiny default backbone: tokenizer + a from-scratch Llama trained by
SFT (loss on the response only) on the train split of a task (``arith`` by
default; ``task_name`` picks another registered task with solutions, e.g.
``expr``), then pass@1 / pass@k measured by sampling on the test split.

``metastone-lab backbone build [--force] [--cache-dir DIR] [--set key=value]``
prints progress; its last line of output is one JSON object (the report).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import check, from_dict, parse_override, to_dict
from ..errors import ConfigError
from ..io_utils import _ensure_dir, atomic_dir, atomic_write_json
from . import cache
from .. import cli_help, progress

NON_MODEL_KEYS = ("threads",)  # fields that do not change the built model / report


def _arith_config():
    from ..tasks.arith import ArithConfig
    return ArithConfig


def _expr_config():
    from ..tasks.expr import ExprConfig
    return ExprConfig


# tasks the tiny backbone can train on (they generate solutions) -> their config class
def _solve_config():
    from ..tasks.solve import SolveConfig
    return SolveConfig


_TASK_CONFIGS: dict[str, Callable[[], type]] = {"arith": _arith_config, "expr": _expr_config,
                                                "solve": _solve_config}


@dataclass
class TinyBackboneConfig:
    """Everything that defines the tiny backbone (hashed into its cache dir name).

    ``task_name`` is the registered task trained on (default ``arith``; it is
    left out of :meth:`key` when it is the default, so the cache dir of the
    default backbone does not change) and ``task`` holds its config overrides
    (``ArithConfig`` / ``ExprConfig`` difficulty knobs). Training runs
    ``steps`` optimiser steps, or stops early after ``train_seconds`` (0 = no
    time cap; the report says which happened). ``temperature`` is the default
    sampling temperature, used for the pass@k measurement.

    Defaults (measured, 2-core CPU): a 1.03M-parameter Llama (hidden 128, 4
    layers, vocab 1363) trained 350 steps x 64 problems (~0.77M tokens) on
    2-4-operation arithmetic gives on 200 test problems at T=0.8 pass@1 0.53,
    pass@32 0.885 (500 steps: 0.76 / 0.955; 242 steps: 0.25 / 0.815).
    Training runs at ~10-13K tok/s on idle cores.
    """

    task_name: str = "arith"
    task: dict[str, Any] = field(default_factory=dict)
    max_number: int = 999
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position: int = 128
    steps: int = 350
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    # 0 = no time cap. The default build is a fixed number of steps so that the
    # cached model does not depend on how loaded the machine was (pass@1 moves
    # from 0.25 to 0.76 between 242 and 500 steps); a cap is opt-in.
    train_seconds: float = 0.0
    seed: int = 0
    threads: int | None = None
    eval_split: str = "test"
    eval_n: int = 200
    eval_k: int = 32
    temperature: float = 0.8
    max_new_tokens: int = 48
    eval_batch: int = 512
    log_every: int = 50

    def __post_init__(self) -> None:
        check(self.hidden_size % self.num_heads == 0,
              f"TinyBackboneConfig: hidden_size {self.hidden_size} must be divisible by "
              f"num_heads {self.num_heads}")
        for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "steps",
                  "batch_size", "eval_k", "max_new_tokens", "eval_batch", "log_every"):
            check(getattr(self, k) >= 1, f"TinyBackboneConfig.{k} must be >= 1")
        check(self.eval_n >= 0, "TinyBackboneConfig.eval_n must be >= 0")
        check(self.lr > 0, "TinyBackboneConfig.lr must be > 0")
        check(self.train_seconds >= 0, "TinyBackboneConfig.train_seconds must be >= 0 (0 = no cap)")
        check(0.0 <= self.temperature <= 2.0, "TinyBackboneConfig.temperature must be in [0, 2]")
        check(self.max_number >= 9, "TinyBackboneConfig.max_number must be >= 9")
        check(self.eval_split in ("train", "val", "test", "ood"),
              f"TinyBackboneConfig.eval_split {self.eval_split!r}: choose train, val, test or ood")
        from ..tasks import TASKS

        if self.task_name not in TASKS:
            raise ConfigError(f"TinyBackboneConfig.task_name: unknown task {self.task_name!r}; "
                              f"choose one of: {', '.join(TASKS.names())}")
        config_cls = _TASK_CONFIGS.get(self.task_name)
        check(config_cls is not None,
              f"TinyBackboneConfig.task_name {self.task_name!r}: the tiny backbone trains on "
              f"generated solutions; choose one of: {', '.join(sorted(_TASK_CONFIGS))}")
        from_dict(config_cls(), self.task, where="TinyBackboneConfig.task")  # validate early

    @classmethod
    def micro(cls, **overrides: Any) -> "TinyBackboneConfig":
        """A fast (~10-20 s on 2 cores) small backbone for tests and notebooks.
        Not accurate; it only has the right shapes, tokens and file layout."""
        base = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                    max_number=199, steps=120, batch_size=32, lr=5e-3, warmup_steps=10,
                    eval_n=16, eval_k=4, max_new_tokens=40,
                    task={"n_train": 2000, "n_val": 50, "n_test": 50, "n_ood": 50})
        base.update(overrides)
        return from_dict(cls, base)

    def key(self) -> dict[str, Any]:
        d = to_dict(self)
        for k in NON_MODEL_KEYS:
            d.pop(k, None)
        if d.get("task_name") == "arith":  # the default: keep the pre-task_name cache key
            d.pop("task_name")
        return d


def default_dir(cfg: TinyBackboneConfig, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/backbones/tiny-<config-hash>``."""
    return cache.entry_dir("tiny", cfg.key(), cache_dir)


def _log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log to the active MLflow run through ``metastone_lab.tracking`` if it exists."""
    try:
        from metastone_lab import tracking  # written in parallel; optional here
    except ImportError:
        return
    active = getattr(tracking, "active", None)
    tr = active() if callable(active) else None
    fn = getattr(tr, "log_metrics", None)
    if callable(fn):
        fn(metrics, step=step)


def _log_tags(tags: dict[str, str]) -> None:
    """Tag the active MLflow run (through ``metastone_lab.tracking``) if there is one."""
    from metastone_lab import tracking

    tracking.active().set_tags(tags)


def _encode(task, tokenizer, split: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, solution ids + eos) per problem. Prompts are encoded by
    ``generate.encode_prompt``, as the trainer and the evaluation engine encode them
    (for the project tokenizer, which adds no special tokens, the ids are unchanged);
    solutions are continuations (no special tokens)."""
    from ..generate import encode_prompt

    probs = task.problems(split)
    prompts = [encode_prompt(tokenizer, p.prompt) for p in probs]
    sols = tokenizer([p.solution for p in probs], add_special_tokens=False)["input_ids"]
    return [(p, s + [tokenizer.eos_token_id]) for p, s in zip(prompts, sols)]


def _batch(rows, pad_id: int):
    """(input_ids, attention_mask, labels), each (B, L); right-padded; labels -100
    on the prompt and the padding, so the loss covers the response only."""
    import torch

    from ..sampling import pad_right

    ids, mask, _ = pad_right([p + r for p, r in rows], pad_id)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(rows):
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
    return ids, mask, labels


def make_model(cfg: TinyBackboneConfig, tokenizer):
    """A randomly initialised standard ``LlamaForCausalLM`` (tied embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    mc = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0,
    )
    return LlamaForCausalLM(mc)


def train(model, cfg: TinyBackboneConfig, data, pad_id: int,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """SFT with AdamW, linear warmup + cosine decay. Returns the loss curve etc."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(cfg.seed)
    model.train()
    curve: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    tokens = 0
    running = 0.0
    step = 0
    stopped_by = "steps"
    for step in range(1, cfg.steps + 1):
        rows = [data[rng.randrange(len(data))] for _ in range(cfg.batch_size)]
        ids, mask, labels = _batch(rows, pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += int(mask.sum())
        running += loss.item()
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            avg = running / n
            running = 0.0
            curve.append((step, avg))
            el = time.perf_counter() - t0
            log(f"step {step}/{cfg.steps}  loss {avg:.4f}  {tokens / el:.0f} tok/s  {el:.0f}s")
            progress.report("backbone build", step, cfg.steps, "SFT steps", loss=round(avg, 4))
            _log_metrics({"backbone/train_loss": avg}, step=step)
        if cfg.train_seconds and step < cfg.steps and time.perf_counter() - t0 > cfg.train_seconds:
            stopped_by = "train_seconds"
            log(f"step {step}/{cfg.steps}: train_seconds={cfg.train_seconds:g} reached, stopping early")
            break
    el = time.perf_counter() - t0
    model.eval()
    return {"train_steps": step, "train_seconds": round(el, 1), "train_tokens": tokens,
            "train_tok_per_s": round(tokens / max(el, 1e-9)), "stopped_by": stopped_by,
            "final_loss": curve[-1][1] if curve else float("nan"), "loss_curve": curve}


def evaluate(model, tokenizer, task, cfg: TinyBackboneConfig) -> dict[str, Any]:
    """pass@1 and pass@k by sampling ``eval_k`` completions of ``eval_n`` problems."""
    import torch

    from .. import sampling
    from ..metrics import pass_at_k

    problems = task.problems(cfg.eval_split, cfg.eval_n)
    if not problems:
        return {}
    t0 = time.perf_counter()
    prompts = [sampling.encode_prompt(tokenizer, p.prompt) for p in problems]
    eos = sampling.eos_ids(model, tokenizer)
    rows = sampling.sample(model, prompts, n=cfg.eval_k, max_new_tokens=cfg.max_new_tokens,
                           eos=eos, pad_id=sampling.pad_id_for(tokenizer, eos),
                           temperature=cfg.temperature, batch_size=cfg.eval_batch,
                           generator=torch.Generator().manual_seed(cfg.seed))
    outs = [rows[i * cfg.eval_k:(i + 1) * cfg.eval_k] for i in range(len(problems))]
    k = cfg.eval_k
    correct = []
    wrong_steps_located = 0
    for p, seqs in zip(problems, outs):
        texts = tokenizer.batch_decode(seqs, skip_special_tokens=True)
        flags = [task.is_correct(t, p) for t in texts]
        correct.append(sum(flags))
        wrong_steps_located += sum(task.first_wrong_step(t, p) not in (-1, None)
                                   for t, f in zip(texts, flags) if not f)
    n_samples = len(problems) * k
    res = {
        "eval_split": cfg.eval_split, "eval_n": len(problems), "eval_k": k,
        "temperature": cfg.temperature,
        "pass@1": sum(pass_at_k(k, c, 1) for c in correct) / len(problems),
        f"pass@{k}": sum(pass_at_k(k, c, k) for c in correct) / len(problems),
        "mixed_fraction": sum(0 < c < k for c in correct) / len(problems),
        "wrong_with_located_step": wrong_steps_located / max(1, n_samples - sum(correct)),
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }
    for kk in (4, 8, 16):
        if kk < k:
            res[f"pass@{kk}"] = sum(pass_at_k(k, c, kk) for c in correct) / len(problems)
    return res


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_tiny_backbone(cfg: TinyBackboneConfig | None = None, out_dir: str | Path | None = None,
                        force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (or reuse) the tiny backbone in ``out_dir`` (default: its cache dir).

    Reuses an intact complete directory unless ``force``; otherwise trains into
    a temp dir, measures pass@k, writes the ``COMPLETE`` manifest last and
    renames it into place. Returns the report (also in ``report.json``).
    """
    import torch

    from ..tasks import get_task
    from .tokenizer import build_tokenizer

    cfg = cfg or TinyBackboneConfig()
    out = Path(out_dir) if out_dir is not None else default_dir(cfg)
    if not force:
        manifest = cache.read_manifest(out)
        if manifest is not None and manifest.get("config") == cfg.key():
            log(f"tiny backbone already built in {out}")
            return {**manifest.get("report", {}), "cached": True, "path": str(out)}
        if out.exists():
            log(f"{out} is incomplete, corrupt or from another config: rebuilding")
    _ensure_dir(out.parent)  # an unwritable or blocked cache dir fails now, not after training
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = get_task(cfg.task_name, **cfg.task)
    tokenizer = build_tokenizer(cfg.max_number, task.phrases)
    data = _encode(task, tokenizer, "train")
    model = make_model(cfg, tokenizer)
    n_params = _params(model)
    log(f"tiny backbone: {n_params / 1e6:.2f}M params, vocab {len(tokenizer)}, "
        f"{len(data)} train problems")
    tr = train(model, cfg, data, tokenizer.pad_token_id, log)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        ev = evaluate(model, tokenizer, task, cfg)
        report = {"params": n_params, "build_seconds": round(time.perf_counter() - t0, 1),
                  **{k: v for k, v in tr.items() if k != "loss_curve"}, **ev,
                  "vocab_size": len(tokenizer), "config_hash": cache.config_hash(cfg.key())}
        atomic_write_json(tmp / "report.json", {**report, "loss_curve": tr["loss_curve"]})
        atomic_write_json(tmp / "build_config.json", cfg.key())
        cache.write_manifest(tmp, {"config": cfg.key(), "report": report})
    # the build's statistics describe the backbone, not the run: tags, out of the way of
    # the run's metrics (no single-point "charts" on the run page)
    _log_tags({f"metastone.backbone.{k.replace('@', '_at_')}": f"{float(v):g}"
               for k, v in report.items()
               if k.startswith("pass@") or k in ("params", "build_seconds", "mixed_fraction")})
    return {**report, "cached": False, "path": str(out)}


def config_from_overrides(items: list[str], base: TinyBackboneConfig | None = None) -> TinyBackboneConfig:
    """Apply ``key=value`` overrides (``task.n_ops_max=3`` sets a task knob)."""
    d = to_dict(base or TinyBackboneConfig())
    for item in items:
        key, value = parse_override(item)
        if key.startswith("task."):
            d["task"] = {**d["task"], key[5:]: value}
        else:
            d[key] = value
    return from_dict(TinyBackboneConfig, d)


def cli_main(argv: list[str] | None = None) -> int:
    ap = cli_help.parser("metastone-lab backbone build",
                         "Train the tiny default backbone into the cache. "
                         "The last output line is a JSON report.")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--cache-dir", default=None,
                    help="cache root (default: $METASTONE_LAB_CACHE or the user cache dir)")
    ap.add_argument("--out", default=None, help="build into this directory instead of the cache (default: the cache)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a TinyBackboneConfig field (task.<knob>=... for the task)")
    ap.add_argument("--micro", action="store_true", help="start from TinyBackboneConfig.micro()")
    args = ap.parse_args(argv)
    base = TinyBackboneConfig.micro() if args.micro else TinyBackboneConfig()
    cfg = config_from_overrides(args.overrides, base)
    out = Path(args.out) if args.out else default_dir(cfg, args.cache_dir)
    t0 = time.perf_counter()
    report = build_tiny_backbone(cfg, out, force=args.force,
                                 log=lambda m: print(m, flush=True))
    report["command_seconds"] = round(time.perf_counter() - t0, 1)
    sys.stdout.flush()
    print(json.dumps(report, sort_keys=True), flush=True)
    return 0
