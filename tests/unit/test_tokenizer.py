"""The tiny backbone's tokenizer: HF format, single-token markers, whole numbers, no silent unk."""
from __future__ import annotations

import random

import pytest

from metastone_lab.backbones.tokenizer import build_tokenizer
from metastone_lab.tasks import get_task


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(max_number=999).save_pretrained(str(d))
    return AutoTokenizer.from_pretrained(str(d))  # what users get back from the cache


def _enc(tok, s):
    return tok.encode(s, add_special_tokens=False)


def test_special_tokens_exist_and_are_distinct(tok):
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert None not in ids and len(ids) == 4
    assert tok.padding_side == "left"


@pytest.mark.parametrize("marker", [".\n\n", "<think>", "</think>"])
def test_markers_are_single_tokens_in_any_context(tok, marker):
    (mid,) = _enc(tok, marker)
    for ctx in (f"12{marker}13", f"x{marker}", f"{marker}7 + 5", f"36 - 4 = 32{marker}</think>"):
        ids = _enc(tok, ctx)
        assert mid in ids, ctx
        assert tok.decode(ids) == ctx


def test_step_marker_not_split_after_number(tok):
    (step,) = _enc(tok, ".\n\n")
    ids = _enc(tok, "7 + 5 = 12.\n\n12 * 3 = 36.\n\n")
    assert ids.count(step) == 2
    assert _enc(tok, "3.14").count(step) == 0   # a decimal point is not a step


def test_small_numbers_are_whole_tokens(tok):
    for n in range(1000):
        assert len(_enc(tok, str(n))) == 1, n
    assert len(_enc(tok, "1000")) == 2
    assert len(_enc(tok, "-5")) == 2


def test_no_task_character_falls_into_unk(tok):
    task = get_task("arith", n_train=300, operators=["add", "sub", "mul", "div"])
    texts = [p.prompt + p.solution for p in task.problems("train", 300)]
    texts += [p.prompt + p.solution for p in task.problems("ood", 50)]
    for t in texts:
        ids = _enc(tok, t)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == t
    # a canonical arith example is short: ~6 tokens per step
    p = task.problems("test", 1)[0]
    assert len(_enc(tok, p.solution)) <= 6 * p.meta["n_ops"] + 4


def test_arbitrary_unicode_round_trips_without_unk(tok):
    rng = random.Random(0)
    samples = ["café 日本語 🙂", "x\u00a0y\u2212z", "\t tabs\r\nand CRLF", "Ω≈ç√∫", "\x00\x7f"]
    samples += ["".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(40)) for _ in range(20)]
    for s in samples:
        ids = _enc(tok, s)
        assert tok.unk_token_id not in ids, s
        assert tok.decode(ids) == s


def test_think_tags_survive_skip_special_tokens(tok):
    s = "<think>1 + 1 = 2.\n\n</think> The answer is 2."
    ids = _enc(tok, s) + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == s
