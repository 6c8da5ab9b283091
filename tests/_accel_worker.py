"""Helpers for the training tests, and the script ``accelerate launch`` runs in
``tests/integration/test_train_accelerate.py``.

As a script: ``accelerate launch --cpu --num_processes 2 tests/_accel_worker.py
MICRO_DIR OUT_JSON [rank|global]`` builds the trainer on the micro backbone, takes the FIXED
global batch :func:`fixed_batch`, gives each rank its contiguous shard, runs ONE
joint update and (on rank 0) writes losses, head gradients and updated head
weights to OUT_JSON. Run with ``--num_processes 1`` semantics by calling
:func:`one_step` directly.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def make_micro(out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A randomly initialised micro Llama + the project tokenizer, saved as a local
    backbone dir (usable as ``TrainConfig.backbone``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from metastone_lab.backbones.tokenizer import build_tokenizer

    out_dir = Path(out_dir)
    tok = build_tokenizer(max_number=199)
    torch.manual_seed(seed)
    mc = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                     num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                     max_position_embeddings=256, tie_word_embeddings=True,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(mc)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def _corrupt(problem, how: int) -> str:
    """A wrong variant of the canonical solution: ``how=0`` wrong final answer only,
    ``how=1`` wrong last step (and answer), ``how=2`` wrong first step."""
    sol = problem.solution
    values = problem.meta["values"]
    ans = values[-1]
    if how == 0:
        return sol.replace(f"The answer is {ans}.", f"The answer is {ans + 1}.")
    if how == 1:
        head, _, _ = sol.rpartition(f"= {ans}.")
        return head + f"= {ans + 1}.\n\n</think> The answer is {ans + 1}."
    first = values[1]
    return sol.replace(f"= {first}.", f"= {first + 1}.", 1)


def fixed_batch(tokenizer, task, n_prompts: int = 4, n: int = 4):
    """A deterministic RolloutBatch: per prompt, 2 canonical and n-2 corrupted responses."""
    from metastone_lab.generate import encode_prompt
    from metastone_lab.training.rollout import pack

    probs = task.problems("train", n_prompts)
    prompts, resps, correct, texts, fw = [], [], [], [], []
    for p in probs:
        pid = encode_prompt(tokenizer, p.prompt)
        for j in range(n):
            text = p.solution if j < 2 else _corrupt(p, (j - 2) % 3)
            prompts.append(pid)
            resps.append(tokenizer.encode(text, add_special_tokens=False)
                         + [tokenizer.eos_token_id])
            texts.append(text)
            correct.append(task.is_correct(text, p))
            fw.append(task.first_wrong_step(text, p))
    return pack(prompts, resps, [float(c) for c in correct], n=n, pad_id=tokenizer.pad_token_id,
                correct=correct, texts=texts, first_wrong=fw)


def make_trainer(micro_dir: str | Path, accelerator=None, **overrides):
    from metastone_lab.train import TrainConfig, Trainer

    cfg = TrainConfig(**{**dict(backbone=str(micro_dir), n=4, prompts_per_step=2, steps=1,
                                max_new_tokens=24, head_dropout=0.0, lora_r=4, lora_alpha=8,
                                eval_every=0, checkpoint_every=0, output_dir="unused",
                                task_options={"n_train": 64, "n_val": 8, "n_test": 8,
                                              "n_ood": 0}),
                          **overrides})
    return Trainer(cfg, accelerator=accelerator)


def one_step(trainer, batch) -> dict:
    """One joint update on ``batch``; returns losses, head grads and new head weights."""
    head_before = {k: v.detach().clone() for k, v in trainer.head.state_dict().items()}
    m = trainer.update(batch)
    grads = {n: p.grad.detach().clone() for n, p in trainer.head.named_parameters()}
    lora = [p.grad for p in trainer.policy.parameters() if p.requires_grad and p.grad is not None]
    lora_grad = sum(float(g.abs().sum()) for g in lora)
    return {"metrics": m, "grads": grads, "head": trainer.head.state_dict(),
            "head_before": head_before, "lora_grad_abs_sum": lora_grad,
            "lora_grad_abs_max": max(float(g.abs().max()) for g in lora),
            "lora_grad_numel": sum(g.numel() for g in lora)}


def main(argv: list[str]) -> int:
    from accelerate import Accelerator

    micro_dir, out_json = argv[0], argv[1]
    norm = argv[2] if len(argv) > 2 else "rank"
    acc = Accelerator(cpu=True)
    t = make_trainer(micro_dir, accelerator=acc, spr_dp_norm=norm)
    batch = fixed_batch(t.tokenizer, t.task)
    per = len(batch) // acc.num_processes
    shard = batch.rows(range(acc.process_index * per, (acc.process_index + 1) * per))
    res = one_step(t, shard)
    res["metrics"]["spr_loss_rank_mean"] = t._allsum(res["metrics"]["spr_loss"]) / t.world
    if acc.is_main_process:
        Path(out_json).write_text(json.dumps({
            "world": acc.num_processes, "metrics": res["metrics"],
            "grads": {k: v.tolist() for k, v in res["grads"].items()},
            "head": {k: v.tolist() for k, v in res["head"].items()},
            "lora_grad_abs_sum": res["lora_grad_abs_sum"]}))
    acc.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
