"""Step masks on hand-built token sequences, with tokenizers built in the test."""
import pytest
import torch

from metastone_lab.errors import ConfigError, ShapeError, TokenizerError, UnknownNameError
from metastone_lab.steps import SEGMENTERS, check_strategy, step_mask, step_tokens


def build_tokenizer(marker: bool = True, para: bool = True, think: bool = True,
                    newline: bool = True):
    """A word-level fast tokenizer. ``marker``: '.\\n\\n' is one token (Qwen-like);
    otherwise it splits into '.' + '\\n\\n' (GPT-2-BPE-like). ``para``: '\\n\\n' is a token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>"] + (["\n"] if newline else [])
    words += [".", "!", "?", " ", "。", "a", "b", "c", "1", "2", "3", "+", "=", "Step", ":", "The",
              "end", "好"]
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
    fresh = build_tokenizer()
    info2 = step_tokens(fresh)
    fresh.add_tokens(["Step 1"])
    assert step_tokens(fresh) is not info2 and step_tokens(fresh).vocab_size == len(fresh)


def test_reference_basic_shift(tok):
    # 0:<think> 1:a 2:.\n\n 3:b 4:.\n\n 5:</think> 6:c
    ids = ids_of(tok, "<think>a.\n\nb.\n\n</think>c")
    assert positions(step_mask(ids, tok)) == [[1, 3]]
    assert positions(step_mask(ids, tok, read_at="step_token")) == [[2, 4]]
    assert positions(step_mask(ids, tok, span="inference")) == [[1, 3]]


# ------------------------------------------------------------------ reference rules by hand
# Token positions are written under each sequence; S = '.\n\n', T = <think>, E = </think>.


def test_consecutive_step_tokens_first_of_run(tok):
    # 0:T 1:a 2:S 3:S 4:S 5:b 6:S 7:E
    ids = ids_of(tok, "<think>a.\n\n.\n\n.\n\nb.\n\n</think>")
    assert positions(step_mask(ids, tok, read_at="step_token")) == [[2, 6]]
    assert positions(step_mask(ids, tok)) == [[1, 5]]
    assert positions(step_mask(ids, tok, read_at="step_token", first_of_run=False)) == [[2, 3, 4, 6]]


def test_step_token_right_after_think_is_dropped(tok):
    # 0:T 1:S 2:a 3:S 4:E
    ids = ids_of(tok, "<think>.\n\na.\n\n</think>")
    for span in ("train", "inference"):
        assert positions(step_mask(ids, tok, span=span)) == [[2]]
    assert positions(step_mask(ids, tok, read_at="step_token", skip_after_think=False)) == [[1, 3]]


def test_missing_think(tok):
    # 0:S 1:a 2:S 3:b 4:S 5:E 6:c 7:S
    ids = ids_of(tok, ".\n\na.\n\nb.\n\n</think>c.\n\n")
    # train: start 0, end = </think> (5): step tokens 0, 2, 4 -> read 1, 3 (0 has no predecessor)
    assert positions(step_mask(ids, tok, span="train")) == [[1, 3]]
    # inference: window (0, 5): read positions 1, 3
    assert positions(step_mask(ids, tok, span="inference")) == [[1, 3]]
    # step_token reading: train keeps 0,2,4; inference strictly after position 0
    assert positions(step_mask(ids, tok, read_at="step_token")) == [[0, 2, 4]]
    assert positions(step_mask(ids, tok, span="inference", read_at="step_token")) == [[2, 4]]


def test_missing_unthink(tok):
    # 0:a 1:T 2:b 3:S 4:c 5:S
    ids = ids_of(tok, "a<think>b.\n\nc.\n\n")
    assert positions(step_mask(ids, tok, span="train")) == [[2, 4]]
    assert positions(step_mask(ids, tok, span="inference")) == [[2, 4]]
    # the last position is never marked after the shift
    assert not step_mask(ids, tok)[0, -1]


def test_several_unthink(tok):
    # 0:T 1:a 2:S 3:E 4:b 5:S 6:E 7:c 8:S
    ids = ids_of(tok, "<think>a.\n\n</think>b.\n\n</think>c.\n\n")
    # train: last </think> (6) ends the span -> step tokens 2, 5 -> read 1, 4
    assert positions(step_mask(ids, tok, span="train")) == [[1, 4]]
    # inference: </think> occurs twice -> end = L: read 1, 4, 7
    assert positions(step_mask(ids, tok, span="inference")) == [[1, 4, 7]]


def test_several_think(tok):
    # 0:a 1:S 2:T 3:b 4:S 5:T 6:c 7:S 8:E
    ids = ids_of(tok, "a.\n\n<think>b.\n\n<think>c.\n\n</think>")
    # train: first <think> (2) starts the span -> step tokens 4, 7 -> read 3, 6
    assert positions(step_mask(ids, tok, span="train")) == [[3, 6]]
    # inference: <think> twice -> start 0: read 0 is excluded (strictly after 0), 3, 6 kept
    assert positions(step_mask(ids, tok, span="inference")) == [[3, 6]]


def test_row_without_steps_and_batch_independence(tok):
    rows = ["<think>a.\n\nb</think>", "<think>a b</think>"]  # second: no step token
    ids = ids_of(tok, *rows)
    m = step_mask(ids, tok)
    assert positions(m) == [[1], []]
    assert m.dtype == torch.bool and m.shape == ids.shape


def pad(rows, side, pad_id):
    L = max(len(r) for r in rows)
    ids, att = [], []
    for r in rows:
        p = [pad_id] * (L - len(r))
        ids.append(p + r if side == "left" else r + p)
        att.append([0] * len(p) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(p))
    return torch.tensor(ids), torch.tensor(att)


TEXTS = [
    "<think>a.\n\nb.\n\n</think>c",
    ".\n\na.\n\nb",                       # no tags, starts with a step token
    "<think>.\n\n.\n\na.\n\n</think>c.\n\n",
    "a",
]


@pytest.mark.parametrize("span", ["train", "inference"])
@pytest.mark.parametrize("read_at", ["before_step_token", "step_token"])
@pytest.mark.parametrize("pad_id_choice", ["pad", "step"])
def test_left_and_right_padding_match_unpadded(tok, span, read_at, pad_id_choice):
    # padding with the step token itself must not create marks either
    pad_id = tok.pad_token_id if pad_id_choice == "pad" else enc(tok, ".\n\n")[0]
    rows = [enc(tok, t) for t in TEXTS]
    expected = [positions(step_mask(torch.tensor([r]), tok, span=span, read_at=read_at))[0] for r in rows]
    L = max(len(r) for r in rows)
    for side in ("left", "right"):
        ids, att = pad(rows, side, pad_id)
        got = positions(step_mask(ids, tok, span=span, read_at=read_at, attention_mask=att))
        for r, e, g in zip(rows, expected, got):
            off = L - len(r) if side == "left" else 0
            assert g == [p + off for p in e], (side, r)


def test_response_start(tok):
    # 0:a 1:S 2:T 3:b 4:S 5:c 6:S 7:E
    ids = ids_of(tok, "a.\n\n<think>b.\n\nc.\n\n</think>", "a.\n\n<think>b.\n\nc.\n\n</think>")
    base = positions(step_mask(ids, tok))
    assert base == [[3, 5], [3, 5]]
    # the step token (next token of the read position) must lie in the response
    assert positions(step_mask(ids, tok, response_start=5)) == [[5], [5]]
    assert positions(step_mask(ids, tok, response_start=torch.tensor([4, 7]))) == [[3, 5], []]
    with pytest.raises(ShapeError, match="response_start"):
        step_mask(ids, tok, response_start=torch.tensor([1, 2, 3]))


# ------------------------------------------------------------------ agreement with a naive oracle


def oracle(row, step_ids, think, unthink, span):
    """The rules of method.md §2 written as plain loops over one unpadded row."""
    L = len(row)
    raw = [row[p] in step_ids and not (p > 0 and row[p - 1] in step_ids)
           and not (p > 0 and row[p - 1] == think) for p in range(L)]
    if span == "train":
        ts = [p for p in range(L) if row[p] == think]
        es = [p for p in range(L) if row[p] == unthink]
        start = ts[0] if ts else 0
        end = es[-1] if es else L - 1
        raw = [m and start <= p <= end for p, m in enumerate(raw)]
        return [p - 1 for p in range(1, L) if raw[p]]
    read = [p - 1 for p in range(1, L) if raw[p]]
    ts = [p for p in range(L) if row[p] == think]
    es = [p for p in range(L) if row[p] == unthink]
    start = ts[0] if len(ts) == 1 else 0
    end = es[0] if len(es) == 1 else L
    return [q for q in read if start < q < end]


@pytest.mark.parametrize("span", ["train", "inference"])
def test_matches_naive_oracle_on_random_sequences(tok, span):
    info = step_tokens(tok)
    S, T, E = info.step_ids[0], info.think_id, info.unthink_id
    alphabet = [S, S, S, T, E, enc(tok, "a")[0], enc(tok, "b")[0], enc(tok, "1")[0]]
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor(alphabet)[torch.randint(0, len(alphabet), (300, 12), generator=g)]
    got = positions(step_mask(ids, tok, span=span))
    for row, gm in zip(ids.tolist(), got):
        assert gm == oracle(row, {S}, T, E, span), row


# ------------------------------------------------------------------ misfire / bad input


def test_multi_token_marker_raises_with_fix(split_tok):
    ids = torch.tensor([enc(split_tok, "<think>1.2 a.\n\nb.\n\n</think>")])
    with pytest.raises(TokenizerError) as e:
        step_mask(ids, split_tok)
    msg = str(e.value)
    assert "'reference'" in msg and "tiny-word-level-marker0" in msg
    assert "paragraph" in msg and "regex" in msg and "allow_multi_token_marker" in msg
    with pytest.raises(TokenizerError):
        check_strategy(split_tok, "reference")


def test_multi_token_marker_reproduces_reference_on_request(split_tok):
    # 0:T 1:1 2:. 3:2 4:' ' 5:a 6:. 7:\n\n 8:b 9:. 10:\n\n 11:E
    ids = torch.tensor([enc(split_tok, "<think>1.2 a.\n\nb.\n\n</think>")])
    m = step_mask(ids, split_tok, read_at="step_token", allow_multi_token_marker=True)
    # every '.' fires, the decimal point included; '\n\n' right after '.' is a run
    assert positions(m) == [[2, 6, 9]]
    # paragraph is the fix: one mark per blank line, none at the decimal point
    assert positions(step_mask(ids, split_tok, "paragraph", read_at="step_token")) == [[7, 10]]


def test_paragraph_never_fires_raises():
    t = build_tokenizer(marker=False, para=False, newline=False)
    with pytest.raises(TokenizerError, match=r"'paragraph'.*tiny-word-level-marker0.*regex"):
        check_strategy(t, "paragraph")


def test_paragraph_across_two_newline_tokens():
    # GPT-2-style BPE splits '.\n\nSo' into '.', '\n', '\n', 'So': the second '\n' completes it
    t = build_tokenizer(marker=False, para=False)
    # 0:T 1:a 2:. 3:\n 4:\n 5:b 6:\n 7:c 8:. 9:\n 10:\n 11:\n 12:E
    ids = torch.tensor([enc(t, "<think>a.\n\nb\nc.\n\n\n</think>")])
    assert len(ids[0]) == 13
    assert positions(step_mask(ids, t, "paragraph", read_at="step_token")) == [[4, 10]]
    assert positions(step_mask(ids, t, "paragraph")) == [[3, 9]]


def test_missing_think_tags_warn_and_count_everything():
    t = build_tokenizer(think=False)
    ids = torch.tensor([enc(t, "a.\n\nb.\n\nc")])
    with pytest.warns(UserWarning, match="<think>"):
        m = step_mask(ids, t)
    assert positions(m) == [[0, 2]]


def test_bad_arguments(tok):
    ids = ids_of(tok, "<think>a.\n\n</think>")
    with pytest.raises(UnknownNameError, match="paragraph"):
        step_mask(ids, tok, "paragraphs")
    with pytest.raises(ConfigError, match="span"):
        step_mask(ids, tok, span="eval")
    with pytest.raises(ConfigError, match="read_at"):
        step_mask(ids, tok, read_at="after")
    with pytest.raises(ConfigError, match="'n'"):
        step_mask(ids, tok, "paragraph", n=3)
    with pytest.raises(ShapeError, match=r"\(1, 3\).*\(1, 4\)"):
        step_mask(ids, tok, attention_mask=torch.ones(1, 3))
    with pytest.raises(ShapeError, match="unsqueeze"):
        step_mask(ids[0], tok)
    with pytest.raises(ShapeError, match="integer"):
        step_mask(ids.float(), tok)
    with pytest.raises(ConfigError, match="pattern"):
        step_mask(ids, tok, "regex")
    with pytest.raises(ConfigError, match="invalid pattern"):
        step_mask(ids, tok, "regex", pattern="(")
    with pytest.raises(ConfigError, match="n=<int"):
        step_mask(ids, tok, "fixed", n=0)


# ------------------------------------------------------------------ other strategies


def test_registry():
    assert SEGMENTERS.names() == sorted(["reference", "paragraph", "sentence", "regex", "fixed", "zh"])


def test_paragraph(tok):
    # 0:T 1:a 2:\n\n 3:b 4:S 5:E
    ids = ids_of(tok, "<think>a\n\nb.\n\n</think>")
    assert positions(step_mask(ids, tok, "paragraph", read_at="step_token")) == [[2, 4]]
    assert positions(step_mask(ids, tok, "paragraph")) == [[1, 3]]


def test_sentence(split_tok):
    # 0:T 1:a 2:. 3:' ' 4:The 5:! 6:\n\n 7:1 8:. 9:2 10:? 11:E
    ids = torch.tensor([enc(split_tok, "<think>a. The!\n\n1.2?</think>")])
    m = step_mask(ids, split_tok, "sentence", read_at="step_token")
    # '.' before a space and '!' before a blank line end sentences; the decimal point and
    # a '?' followed by '</think>' (no whitespace) do not
    assert positions(m) == [[2, 5]]


def test_sentence_token_with_inner_whitespace(tok):
    # 0:T 1:a 2:S 3:b 4:E   ('.\n\n' is one token: whitespace inside it)
    ids = ids_of(tok, "<think>a.\n\nb</think>")
    assert positions(step_mask(ids, tok, "sentence", read_at="step_token")) == [[2]]


def test_regex_marks_token_where_match_ends(tok):
    # 0:T 1:Step 2:' ' 3:1 4:: 5:a 6:S 7:Step 8:' ' 9:2 10:: 11:b 12:E
    ids = ids_of(tok, "<think>Step 1:a.\n\nStep 2:b</think>")
    m = step_mask(ids, tok, "regex", read_at="step_token", pattern=r"Step \d+:")
    assert positions(m) == [[4, 10]]
    # a match ending inside a multi-character token marks that token
    m = step_mask(ids, tok, "regex", read_at="step_token", pattern=r"a\.")
    assert positions(m) == [[6]]


def test_fixed(tok):
    # 0:a 1:T 2:a 3:' ' 4:b 5:' ' 6:c 7:E 8:a   (counting starts after the first <think>)
    ids = ids_of(tok, "a<think>a b c</think>a")
    m = step_mask(ids, tok, "fixed", read_at="step_token", n=2)
    assert positions(m) == [[3, 5, 7]]
    m1 = step_mask(ids, tok, "fixed", read_at="step_token", n=1)
    assert positions(m1) == [[2, 3, 4, 5, 6, 7]]  # train span ends at </think> (inclusive)
    assert positions(step_mask(ids, tok, "fixed", n=3)) == [[3, 6]]  # shifted left


def test_zh_rule(tok):
    from metastone_lab.steps import _zh_rule

    assert _zh_rule("。") and _zh_rule("\n") and _zh_rule(".\n\n") and _zh_rule("a\n")
    assert not _zh_rule("ab\n") and not _zh_rule("\n\n\n\n") and not _zh_rule("abc")
    # 0:T 1:好 2:。 3:a 4:\n 5:b 6:E
    ids = ids_of(tok, "<think>好。a\nb</think>")
    assert positions(step_mask(ids, tok, "zh", read_at="step_token")) == [[2, 4]]


def test_sentencepiece_leading_space_is_restored():
    """SentencePiece decodes a lone '▁The' as 'The'; the text strategies must still see the space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "\u2581The", "\u2581end", ".", "\u2581a", "1", "!"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.Metaspace()
    t = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    # 0:▁The 1:▁end 2:. 3:▁The 4:▁end 5:. 6:1
    ids = torch.tensor([t.encode("The end. The end.1", add_special_tokens=False)])
    assert ids.shape[1] == 7
    with pytest.warns(UserWarning):
        m = step_mask(ids, t, "sentence", read_at="step_token")
        assert positions(m) == [[2]]  # the second '.' is followed by '1', not whitespace
        r = step_mask(ids, t, "regex", read_at="step_token", pattern=r"end\. The")
        assert positions(r) == [[3]]


# ------------------------------------------------------------------ rule 7: the conclusion as a step
def test_conclusion_mark_reads_the_end_of_a_closed_response(tok):
    # 0:T 1:a 2:S 3:b 4:S 5:E 6:c 7:.
    ids = ids_of(tok, "<think>a.\n\nb.\n\n</think>c.")
    for span in ("train", "inference"):
        assert positions(step_mask(ids, tok, span=span, conclusion=True)) == [[1, 3, 6]]
        assert positions(step_mask(ids, tok, span=span, read_at="step_token",
                                   conclusion=True)) == [[2, 4, 7]]
        assert positions(step_mask(ids, tok, span=span)) == [[1, 3]]   # off by default
    # a response that never closes its reasoning (it stopped early, or was truncated) ends
    # with an unfinished step: that is its conclusion. 0:T 1:a 2:S 3:b 4:S 5:c 6:.
    open_ids = ids_of(tok, "<think>a.\n\nb.\n\nc.")
    assert positions(step_mask(open_ids, tok)) == [[1, 3]]
    assert positions(step_mask(open_ids, tok, conclusion=True)) == [[1, 3, 5]]
    assert positions(step_mask(open_ids, tok, read_at="step_token", conclusion=True)) == [[2, 4, 6]]
    # the end is read inside the response only: a one-token response has no mark before it
    assert positions(step_mask(ids, tok, conclusion=True, response_start=6)) == [[6]]
    assert positions(step_mask(ids, tok, conclusion=True, response_start=7)) == [[]]
    assert positions(step_mask(ids, tok, read_at="step_token", conclusion=True,
                               response_start=7)) == [[7]]
    # a response that ends on a step token: the end mark is that step's mark (no duplicate)
    ends = ids_of(tok, "<think>a.\n\nb.\n\n")
    assert positions(step_mask(ends, tok, conclusion=True)) == positions(step_mask(ends, tok))


@pytest.mark.parametrize("read_at", ["before_step_token", "step_token"])
def test_conclusion_mark_is_padding_invariant(tok, read_at):
    rows = [enc(tok, t) for t in ("<think>a.\n\n</think>c.", "<think>a.\n\nb.\n\nc.\n\n</think>The")]
    expected = [positions(step_mask(torch.tensor([r]), tok, read_at=read_at, conclusion=True))[0]
                for r in rows]
    L = max(len(r) for r in rows)
    for side in ("left", "right"):
        ids, att = pad(rows, side, tok.pad_token_id)
        got = positions(step_mask(ids, tok, read_at=read_at, attention_mask=att, conclusion=True))
        for r, e, g in zip(rows, expected, got):
            off = L - len(r) if side == "left" else 0
            assert g == [p + off for p in e], (side, r)
    assert [len(e) for e in expected] == [2, 4]
