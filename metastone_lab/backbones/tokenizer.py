"""The tiny backbone's tokenizer: a hand-specified Unigram model built with the
``tokenizers`` library and saved in Hugging Face format.

Vocabulary (measured sizes in ``tests/unit/test_tokenizer.py``):

* special tokens ``<pad> <s> </s> <unk>``; ``<think>`` / ``</think>`` as added
  (non-special, so ``decode(skip_special_tokens=True)`` keeps them) tokens;
* the step marker ``'.\\n\\n'`` as ONE token, so the reference step rule works unchanged;
* whole-number tokens ``0 .. max_number`` (default 999): arithmetic on whole
  tokens is learnable by a ~2M-parameter model, digit-by-digit is much harder;
* the fixed phrases of the ``arith`` task (``". Multiply by "``, ``" = "``...),
  which keep sequences short (~6 tokens per step);
* every printable ASCII character, and 256 byte-fallback tokens ``<0xNN>``:
  any other character (accents, CJK, emoji) round-trips through bytes, so no
  character falls into ``<unk>``.

Segmentation is Viterbi over piece scores: multi-character pieces score -1,
single characters -8, bytes -20, so the fewest / longest pieces win.
"""
from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
THINK_TOKENS = ("<think>", "</think>")
STEP_TOKEN = ".\n\n"
PHRASES = (
    STEP_TOKEN, "Start with ", ". Add ", ". Subtract ", ". Multiply by ", ". Divide by ",
    ". What is the result?\n", " The answer is ", " + ", " - ", " * ", " / ", " = ", "\n\n",
)


def _pieces(max_number: int, extra_phrases: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    pieces: list[tuple[str, float]] = [(t, 0.0) for t in SPECIAL_TOKENS.values()]
    pieces += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    pieces += [(c, -8.0) for c in chars]
    seen = {p for p, _ in pieces}
    # a task's own phrases come last, so the ids of every other piece do not depend on them
    multi = list(PHRASES) + [str(i) for i in range(10, max_number + 1)] + list(extra_phrases)
    for p in multi:
        if p not in seen:
            pieces.append((p, -1.0))
            seen.add(p)
    return pieces


def build_tokenizer(max_number: int = 999, extra_phrases: tuple[str, ...] = ()):
    """A ``transformers`` fast tokenizer (HF format) for the tiny backbone.

    ``extra_phrases``: a task's fixed phrases (``Task.phrases``), one token each,
    appended after every other piece (``arith`` has none, so its ids never change)."""
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    pieces = _pieces(max_number, tuple(extra_phrases))
    unk_id = [p for p, _ in pieces].index(SPECIAL_TOKENS["unk_token"])
    tk = Tokenizer(Unigram(pieces, unk_id=unk_id, byte_fallback=True))
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in SPECIAL_TOKENS.values()])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    # left padding: batched generation; bos is not added automatically (as in Qwen)
    return PreTrainedTokenizerFast(tokenizer_object=tk, padding_side="left", **SPECIAL_TOKENS)


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """Save in HF format: ``AutoTokenizer.from_pretrained(out_dir)`` loads it."""
    tokenizer.save_pretrained(str(out_dir))
