"""One prompt encoding: rollouts (and the trainer's periodic evaluation, which
samples through ``rollout``), the SFT batch, the backbone build and the
evaluation engine all feed a prompt as ``generate.encode_prompt`` encodes it, so
a Llama-family tokenizer's BOS is never present in one path and missing in
another. Checked with a tokenizer that DOES add a BOS (a post-processor
prepending ``<s>``); the project tokenizer adds none, so its ids, and the tiny
backbone's cache key, are unchanged."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _accel_worker import make_micro  # noqa: E402

from metastone_lab.generate import encode_prompt  # noqa: E402

TASK_OPTS = {"n_train": 3, "n_val": 2, "n_test": 2, "n_ood": 0}


def bos_tokenizer():
    """The project tokenizer with a TemplateProcessing post-processor adding ``<s>``
    (as Llama tokenizers do): same vocabulary, so the micro backbone runs on it."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from metastone_lab.backbones.tokenizer import SPECIAL_TOKENS, build_tokenizer

    base = build_tokenizer(max_number=199)
    tk = base.backend_tokenizer
    bos = base.convert_tokens_to_ids("<s>")
    tk.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                           special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, padding_side="left", **SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return make_micro(tmp_path_factory.mktemp("micro"))


def test_the_test_tokenizer_adds_a_bos():
    tok = bos_tokenizer()
    ids = encode_prompt(tok, "Start with 3. Add 4. What is the result?\n")
    assert ids[0] == tok.bos_token_id
    assert ids[1:] == tok.encode("Start with 3. Add 4. What is the result?\n",
                                 add_special_tokens=False)


def test_rollout_sft_build_and_evaluation_encode_a_prompt_identically(micro, monkeypatch):
    from transformers import AutoModelForCausalLM

    from metastone_lab.backbones import build as build_mod
    from metastone_lab.tasks import get_task
    from metastone_lab.train import TrainConfig, Trainer
    from metastone_lab.training import rollout as rollout_mod

    tok = bos_tokenizer()
    task = get_task("arith", **TASK_OPTS)
    problems = task.problems("train")
    want = {p.prompt: encode_prompt(tok, p.prompt) for p in problems}  # the evaluation path
    assert all(ids[0] == tok.bos_token_id for ids in want.values())

    # rollout path: the prompts handed to the sampler, and the prompt part of the batch
    seen = []

    def fake_sample(model, prompts, **kw):
        seen.extend(list(p) for p in prompts)
        return [[min(kw["eos"])] for _ in prompts]

    from metastone_lab import sampling
    monkeypatch.setattr(sampling, "sample", fake_sample)
    b = rollout_mod.rollout(None, tok, task, problems, n=2, temperature=1.0, max_new_tokens=4)
    assert seen == [want[p.prompt] for p in problems for _ in range(2)]
    for i, p in enumerate(problems[j // 2] for j in range(len(b))):
        assert b.input_ids[i, :int(b.response_start[i])].tolist() == want[p.prompt]

    # SFT path: the trainer's supervised batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = Trainer(TrainConfig(backbone=str(micro), mode="sft", sft_batch_size=4, lora_r=2,
                                lora_alpha=4, eval_every=0, output_dir="unused",
                                task_options=TASK_OPTS),
                    model=AutoModelForCausalLM.from_pretrained(micro), tokenizer=tok)
    sb = t.sft_batch(1)
    prompts = {tuple(ids) for ids in want.values()}
    for i in range(len(sb)):
        assert tuple(sb.input_ids[i, :int(sb.response_start[i])].tolist()) in prompts

    # backbone build: the SFT rows of the tiny backbone's own training
    rows = build_mod._encode(task, tok, "train")
    assert [p for p, _ in rows] == [want[p.prompt] for p in problems]


def test_project_tokenizer_ids_and_tiny_cache_key_unchanged():
    """The project tokenizer adds no BOS: encode_prompt equals the former
    add_special_tokens=False encoding, and the tiny backbone's cache entry (keyed by
    its config only) is the one built before this change."""
    from metastone_lab.backbones import TinyBackboneConfig
    from metastone_lab.backbones.build import default_dir
    from metastone_lab.backbones.tokenizer import build_tokenizer
    from metastone_lab.tasks import get_task

    tok = build_tokenizer()
    for p in get_task("arith").problems("test", 20):
        assert encode_prompt(tok, p.prompt) == tok.encode(p.prompt, add_special_tokens=False)
    assert default_dir(TinyBackboneConfig(), "/c").name == "tiny-666ef6c4ded0"
