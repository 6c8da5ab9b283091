"""The script ``tests/integration/test_eval_accelerate.py`` runs, under ``accelerate
launch`` (2 CPU processes) and plainly (1 process, the reference):

    python tests/_eval_worker.py MICRO_DIR OUT_DIR

It builds a ReflectiveModel on the random micro Llama of ``_accel_worker.make_micro``
(head and PRM seeded, so every process builds the same weights), runs
:func:`metastone_lab.held_out.evaluate_held_out` twice on real ``arith`` problems
(:data:`WORKLOAD`: in-flight scores with validation problems; re-scored by a
separate PRM without), and writes ``OUT_DIR/rank<r>.pkl`` per process: both
evaluations, the global problem indices this process sampled, the tables it logged to
the tracker, and each evaluation's wall time (``seconds``).
"""
from __future__ import annotations

import pickle
import sys
import zlib
from pathlib import Path

import torch

#: the evaluation both runs do: 7 test + 5 val problems, k=4 samples of <= 24 tokens,
#: 2 problems per engine batch (max_batch_rows = 2k, fixed batches: with continuous
#: batching a problem's batch-mates, hence its float rounding, depend on the others'
#: lengths), so the 2 processes get uneven blocks of whole batches (test: problems
#: 0-3 | 4-6; val: 0-1 | 2-4)
WORKLOAD = dict(n_test=7, n_val=5, k=4, max_new_tokens=24, max_batch_rows=8,
                continuous_batching=False)


class ParityJudge:
    """The arith task's problems judged by a stable hash of the text (crc32, the same
    in every process, unlike ``hash``): a random model is never right on arith, and the
    table should have right and wrong samples. Step labels: -1 right, 0 wrong."""

    def extract_answer(self, text: str) -> str | None:
        return str(zlib.crc32(text.encode()) % 3)

    def is_correct(self, text: str, problem) -> bool:
        return zlib.crc32(text.encode()) % 3 == 0

    def first_wrong_step(self, text: str, problem) -> int | None:
        return -1 if self.is_correct(text, problem) else 0


def build(micro_dir: str | Path):
    """(tokenizer, model, prm): the micro Llama with a seeded head, and a separate PRM
    (the same backbone weights, another seeded head)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from metastone_lab.sprm import ReflectiveModel

    tok = AutoTokenizer.from_pretrained(micro_dir)
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        rm = ReflectiveModel(LlamaForCausalLM.from_pretrained(micro_dir), head_dropout=0.0)
        with torch.no_grad():   # spread-out step logits, so a wrong read would show
            rm.head[0].weight.mul_(20.0)
        heads.append(rm.eval())
    return tok, heads[0], heads[1]


def evaluate(micro_dir: str | Path) -> dict:
    """Both evaluations of :data:`WORKLOAD` in this process (sharded under a launch)."""
    from metastone_lab.generate import GenerateConfig
    from metastone_lab.held_out import evaluate_held_out
    from metastone_lab.tasks import get_task

    w = WORKLOAD
    tok, model, prm = build(micro_dir)
    arith = get_task("arith", n_train=0, n_val=w["n_val"], n_test=w["n_test"], n_ood=0)
    test, val = arith.problems("test", w["n_test"]), arith.problems("val", w["n_val"])
    cfg = GenerateConfig(k=w["k"], max_new_tokens=w["max_new_tokens"], temperature=1.0,
                         top_p=0.95, seed=5, max_batch_rows=w["max_batch_rows"],
                         continuous_batching=w["continuous_batching"],
                         segmenter="fixed", segmenter_options={"n": 4})
    inflight = evaluate_held_out(model, tok, ParityJudge(), test, test_config=cfg,
                                 val_problems=val, seed=3, n_boot=50)
    rescored = evaluate_held_out(model, tok, ParityJudge(), test, test_config=cfg, scorer=prm,
                                 seed=3, n_boot=50, log=False)
    return {"inflight": inflight, "rescored": rescored}


def main(argv: list[str]) -> int:
    from metastone_lab import evaluation, generate, shard

    torch.set_num_threads(1)   # the same kernels in every run (one thread each)
    micro_dir, out_dir = argv[0], Path(argv[1])
    sampled, logged = [], []
    plain = generate.generate_best_of_n

    def recording(model, tok, problems, task, cfg=None, *, indices=None):
        sampled.append(list(range(len(problems)) if indices is None else indices))
        return plain(model, tok, problems, task, cfg, indices=indices)

    generate.generate_best_of_n = recording
    evaluation._log_table = lambda table, name: logged.append(name)
    res = evaluate(micro_dir)
    rank, world = shard.process()
    seconds = {name: ev.seconds for name, ev in res.items()}
    for ev in res.values():
        ev.seconds = None                          # wall times differ between runs
        for ps in ev.test + ev.val:
            ps.gen_seconds = None
    res.update(rank=rank, world=world, sampled=sampled, logged=logged, seconds=seconds)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.pkl").write_bytes(pickle.dumps(res))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main(sys.argv[1:]))
