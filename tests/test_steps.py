"""Step masks on hand-built token sequences, with tokenizers built in the test."""
import warnings

import pytest
import torch

from metastone_lab.errors import ConfigError, ShapeError, TokenizerError, UnknownNameError
from metastone_lab.steps import SEGMENTERS, check_strategy, step_mask, step_tokens


def build_tokenizer(marker: bool = True, para: bool = True, think: bool = True):
    """A word-level fast tokenizer. ``marker``: '.\\n\\n' is one token (Qwen-like);
    otherwise it splits into '.' + '\\n\\n' (GPT-2-BPE-like). ``para``: '\\n\\n' is a token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "\n", ".", "!", "?", " ", "。", "a", "b", "c", "1", "2", "3",
             "+", "=", "Step", ":", "The", "end", "好"]
    pieces = []
    if think:
        words += ["<think>", "</think>"]
        pieces += ["<think>", "</think>"]
    if marker:
        words.append(".\n\n")
        pieces.append(r"\.\n\n")
    if para:
        words.append("\n\n")
        pieces.append(r"\n\n")
    pieces += [r"\n", r"\.", "!", r"\?", " ", "。", r"[A-Za-z0-9]+", r"[^\sA-Za-z0-9]"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(pieces)), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                   name_or_path=f"tiny-word-level-marker{int(marker)}")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def split_tok():
    return build_tokenizer(marker=False)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def ids_of(tok, *texts):
    """A batch of equal-length rows."""
    rows = [enc(tok, t) for t in texts]
    assert len({len(r) for r in rows}) == 1, [len(r) for r in rows]
    return torch.tensor(rows)


def positions(mask):
    return [torch.nonzero(row).flatten().tolist() for row in mask]


def test_tokenizer_fixture(tok, split_tok):
    assert len(enc(tok, ".\n\n")) == 1 and len(enc(split_tok, ".\n\n")) == 2
    info = step_tokens(tok)
    assert info.think_id is not None and info.unthink_id is not None
    assert step_tokens(tok) is info  # cached per tokenizer


def test_reference_basic_shift(tok):
    # 0:<think> 1:a 2:.\n\n 3:b 4:.\n\n 5:</think> 6:c
    ids = ids_of(tok, "<think>a.\n\nb.\n\n</think>c")
    assert positions(step_mask(ids, tok)) == [[1, 3]]
    assert positions(step_mask(ids, tok, read_at="step_token")) == [[2, 4]]
    assert positions(step_mask(ids, tok, span="inference")) == [[1, 3]]
