"""Step segmentation: which positions' hidden states the SPRM head scores.

:func:`step_mask` maps token ids (B, L) to a boolean mask (B, L). It runs one
*segmenter* (registry :data:`SEGMENTERS`) that marks the **step tokens** (rule 1),
then the common reference post-processing of method.md §2:

1. mark the step tokens (the segmenter);
2. keep only the first of a run of consecutive marks (``first_of_run``);
3. drop a mark right after ``<think>`` (``skip_after_think``);
4. span: ``span="train"`` keeps step tokens at ``first <think> <= p <= last </think>``
   *before* the shift (no ``<think>`` -> from the first token; no ``</think>`` -> to the
   last); ``span="inference"`` keeps read positions strictly between ``<think>`` and
   ``</think>`` *after* the shift, using a tag only if it occurs exactly once (else the
   window starts after the first token / runs to the end);
5. ``read_at="before_step_token"`` (reference) shifts the mask one position left, so the
   score is read from the hidden state of the token *before* the step token (the last
   position is then False); ``read_at="step_token"`` reads the step token itself;
6. ``response_start`` (int or (B,) tensor, padded coordinates): a mark counts only if
   its step token lies at or after ``response_start`` (reference training rule: the
   *next* token of the read position is in the response).

Padding: pass ``attention_mask`` (B, L); padded positions are never marked and every
"first/last token" rule above is measured on the real tokens, so a left-padded row
gives the same marks (shifted by the pad length) as the unpadded row.

Strategies: ``reference`` (ids of ``tokenizer.encode('.\\n\\n')``), ``paragraph`` (the
token completing a blank line ``"\\n\\n"``, also across two ``"\\n"`` tokens), ``sentence``
(. ! ? followed by whitespace), ``regex`` (option ``pattern``), ``fixed`` (option ``n``),
``zh`` (the reference Chinese rule).
A strategy that can never fire for a tokenizer raises :class:`TokenizerError`.
"""
from __future__ import annotations

import bisect
import inspect
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError, ShapeError, TokenizerError
from .registry import Registry

REFERENCE_MARKER = ".\n\n"
THINK, UNTHINK = "<think>", "</think>"
SPANS = ("train", "inference")
READ_AT = ("before_step_token", "step_token")
_FIX = "Use strategy='paragraph' or strategy='regex' (e.g. pattern=r'\\.\\n\\n')"


# --------------------------------------------------------------------------- tokenizer info

@dataclass(eq=False)
class StepTokens:
    """What the segmenters need from a tokenizer, resolved once and cached per tokenizer.

    ``step_ids``: ``encode('.\\n\\n', add_special_tokens=False)``; ``think_id`` /
    ``unthink_id``: the id of ``<think>`` / ``</think>`` when each is a single token,
    else None (treated as absent, with a warning). Token texts (``decode([id])`` for
    every id) are computed lazily, only for the text-based strategies.
    """

    name: str
    vocab_size: int
    step_ids: tuple[int, ...]
    think_id: int | None
    unthink_id: int | None
    unk_id: int | None
    _tok_ref: Callable[[], Any] = field(repr=False, default=lambda: None)
    _texts: list[str] | None = field(repr=False, default=None)
    _lead_space: list[bool] | None = field(repr=False, default=None)
    _tables: dict = field(repr=False, default_factory=dict)
    _encodings: dict = field(repr=False, default_factory=dict)
    _warned: bool = field(repr=False, default=False)

    @property
    def tokenizer(self) -> Any:
        tok = self._tok_ref()
        if tok is None:  # pragma: no cover - only if the tokenizer was garbage-collected
            raise TokenizerError(f"the tokenizer {self.name} behind this StepTokens is gone")
        return tok

    def encode(self, text: str) -> tuple[int, ...]:
        if text not in self._encodings:
            self._encodings[text] = tuple(self.tokenizer.encode(text, add_special_tokens=False))
        return self._encodings[text]

    def _load_texts(self) -> None:
        if self._texts is not None:
            return
        tok = self.tokenizer
        ids = list(range(self.vocab_size))
        texts = tok.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False)
        raw = tok.convert_ids_to_tokens(ids)
        # SentencePiece decodes a lone '▁word' as 'word'; remember the leading space.
        lead = [isinstance(r, str) and r.startswith("\u2581") and not t.startswith(" ")
                for r, t in zip(raw, texts)]
        self._texts, self._lead_space = list(texts), lead

    @property
    def token_texts(self) -> list[str]:
        """``tokenizer.decode([i])`` for every id (reference-faithful text of one token)."""
        self._load_texts()
        return self._texts  # type: ignore[return-value]

    @property
    def spaced_texts(self) -> list[str]:
        """Token texts with the SentencePiece leading space restored (for text matching)."""
        if "spaced" not in self._tables:
            self._load_texts()
            pairs = zip(self._texts, self._lead_space)  # type: ignore[arg-type]
            self._tables["spaced"] = [(" " + t) if s else t for t, s in pairs]
        return self._tables["spaced"]

    def table(self, key: str, predicate: Callable[[str], bool]) -> torch.Tensor:
        """Bool (V,) table of ids whose token text satisfies ``predicate`` (cached by key)."""
        if key not in self._tables:
            self._tables[key] = torch.tensor([bool(predicate(t)) for t in self.token_texts],
                                             dtype=torch.bool)
        return self._tables[key]

    def warn_missing_tags(self) -> None:
        if self._warned:
            return
        self._warned = True
        missing = [t for t, i in ((THINK, self.think_id), (UNTHINK, self.unthink_id)) if i is None]
        if missing:
            warnings.warn(
                f"{' and '.join(map(repr, missing))} is not a single token in tokenizer "
                f"{self.name}; the step span treats it as absent (steps count from the first "
                f"token / to the end). Add it with tokenizer.add_tokens([...], "
                f"special_tokens=True) to get the reference span.",
                stacklevel=3,
            )


_CACHE: "weakref.WeakKeyDictionary[Any, StepTokens]" = weakref.WeakKeyDictionary()
_CACHE_BY_ID: dict[int, tuple[Any, StepTokens]] = {}


def tokenizer_name(tokenizer: Any) -> str:
    path = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}({path!r})" if path else type(tokenizer).__name__


def step_tokens(tokenizer: Any) -> StepTokens:
    """The cached :class:`StepTokens` of ``tokenizer`` (resolved on first use)."""
    try:
        hit = _CACHE.get(tokenizer)
    except TypeError:
        hit = _CACHE_BY_ID.get(id(tokenizer), (None, None))[1]
    if hit is not None and hit.vocab_size == len(tokenizer):
        return hit  # (a changed vocabulary, e.g. after add_tokens, is resolved again)

    def single(text: str) -> int | None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None

    try:
        ref: Callable[[], Any] = weakref.ref(tokenizer)
    except TypeError:
        ref = lambda: tokenizer  # noqa: E731
    info = StepTokens(
        name=tokenizer_name(tokenizer),
        vocab_size=len(tokenizer),
        step_ids=tuple(int(i) for i in tokenizer.encode(REFERENCE_MARKER, add_special_tokens=False)),
        think_id=single(THINK),
        unthink_id=single(UNTHINK),
        unk_id=getattr(tokenizer, "unk_token_id", None),
        _tok_ref=ref,
    )
    info._encodings[REFERENCE_MARKER] = info.step_ids
    try:
        _CACHE[tokenizer] = info
    except TypeError:
        _CACHE_BY_ID[id(tokenizer)] = (tokenizer, info)
    return info


# --------------------------------------------------------------------------- segmenters

@dataclass(frozen=True)
class Segmenter:
    """A step-token marker ``mark(input_ids (B,L), info, valid (B,L), **options) -> (B,L)``
    plus its defaults for the common rules 2 (``first_of_run``) and 3 (``skip_after_think``)."""

    name: str
    mark: Callable[..., torch.Tensor]
    first_of_run: bool = True
    skip_after_think: bool = True

    def option_names(self) -> list[str]:
        params = inspect.signature(self.mark).parameters
        return [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


SEGMENTERS: Registry[Segmenter] = Registry("step segmenter")


def _segmenter(name: str, **defaults: bool):
    def deco(fn):
        SEGMENTERS.register(name)(Segmenter(name, fn, **defaults))
        return fn
    return deco


def _lookup(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` with out-of-vocabulary ids (negative or >= V) mapped to False."""
    V = table.numel()
    inside = (ids >= 0) & (ids < V)
    return table.to(ids.device)[ids.clamp(0, max(V - 1, 0))] & inside


def _never_fires(strategy: str, info: StepTokens, why: str) -> TokenizerError:
    return TokenizerError(
        f"step strategy {strategy!r} can never fire with tokenizer {info.name}: {why}. {_FIX}."
    )


@_segmenter("reference")
def _mark_reference(input_ids, info, valid, *, marker: str = REFERENCE_MARKER,
                    allow_multi_token_marker: bool = False):
    """Rule 1 of the reference: tokens whose id is in ``encode(marker)``.

    When ``marker`` encodes to several tokens (GPT-2-style BPE: '.' + '\\n\\n') the
    reference marks *every* one of them (every '.', decimal points included); that is
    reproduced only with ``allow_multi_token_marker=True``, otherwise TokenizerError.
    """
    ids = info.encode(marker)
    if not ids:
        raise _never_fires("reference", info, f"{marker!r} encodes to no token")
    if len(ids) == 1 and info.unk_id is not None and ids[0] == info.unk_id:
        raise _never_fires("reference", info, f"{marker!r} encodes to the unknown token")
    if len(ids) > 1 and not allow_multi_token_marker:
        pieces = [info.tokenizer.decode([i]) for i in ids]
        raise TokenizerError(
            f"step strategy 'reference' misfires with tokenizer {info.name}: {marker!r} is not "
            f"one token but {len(ids)} ({pieces!r}, ids {list(ids)}), so the reference rule would "
            f"mark every one of those tokens (e.g. every '.', decimal points included). {_FIX}; "
            f"pass allow_multi_token_marker=True to reproduce the reference behaviour anyway."
        )
    target = torch.tensor(ids, device=input_ids.device)
    return torch.isin(input_ids, target) & valid


@_segmenter("paragraph")
def _mark_paragraph(input_ids, info, valid):
    """The token that completes a blank line ``"\\n\\n"``.

    Marked: a token whose text contains ``"\\n\\n"`` (Qwen ``'.\\n\\n'``, GPT-2 ``'\\n\\n'``), or
    a token starting with ``"\\n"`` right after a real token ending with ``"\\n"``:
    GPT-2-style BPE pre-tokenises ``'.\\n\\nSo'`` as ``'.'``, ``'\\n'``, ``'\\n'``, ``'So'``
    (``\\s+(?!\\S)``), so the second ``'\\n'`` is marked.
    """
    inside = info.table("paragraph", lambda t: "\n\n" in t)
    ends_nl = info.table("paragraph.ends_nl", lambda t: t.endswith("\n"))
    starts_nl = info.table("paragraph.starts_nl", lambda t: t.startswith("\n"))
    if not bool(inside.any() or (ends_nl.any() and starts_nl.any())):
        raise TokenizerError(
            f"step strategy 'paragraph' can never fire with tokenizer {info.name}: no token "
            f"contains a newline, so a blank line '\\n\\n' cannot be seen. Use strategy='regex' "
            f"(e.g. pattern=r'\\.\\s') or strategy='sentence'."
        )
    after_nl = _shift_right(_lookup(input_ids, ends_nl) & valid)
    return (_lookup(input_ids, inside) | (_lookup(input_ids, starts_nl) & after_nl)) & valid


_SENT_END = re.compile(r"[.!?](\s*)$")


@_segmenter("sentence")
def _mark_sentence(input_ids, info, valid):
    """The token holding a sentence-final ``.``/``!``/``?`` that is followed by whitespace.

    Mapping to tokens: a token whose text, with trailing whitespace removed, ends in
    . ! or ? is marked if (a) that whitespace is inside the token itself (``'.\\n\\n'``,
    ``'. '``), or (b) the next real token starts with whitespace (``'.'`` + ``'\\n\\n'``,
    ``'.'`` + ``' The'``). A punctuation token at the end of the row (nothing follows)
    is not marked; ``3.5`` is not a sentence end.
    """
    texts = info.spaced_texts
    with_ws = info.table("sentence.with_ws", lambda t: bool((m := _SENT_END.search(t)) and m.group(1)))
    bare = info.table("sentence.bare", lambda t: bool((m := _SENT_END.search(t)) and not m.group(1)))
    if not bool(with_ws.any() | bare.any()):
        raise _never_fires("sentence", info, "no token ends in '.', '!' or '?'")
    if "sentence.ws_start" not in info._tables:
        info._tables["sentence.ws_start"] = torch.tensor([t[:1].isspace() for t in texts],
                                                         dtype=torch.bool)
    ws_start = info._tables["sentence.ws_start"]
    nxt_ws = F.pad(_lookup(input_ids, ws_start)[:, 1:] & valid[:, 1:], (0, 1), value=False)
    return (_lookup(input_ids, with_ws) | (_lookup(input_ids, bare) & nxt_ws)) & valid


@_segmenter("regex")
def _mark_regex(input_ids, info, valid, *, pattern: str | None = None, flags: int = 0):
    """Matches of ``pattern`` over the row's text; marks the token where each match ends.

    The text is the concatenation of the per-token texts of the real tokens (so character
    offsets map exactly to tokens); an empty match marks nothing.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError("step strategy 'regex' needs option pattern='...' (a Python regex), "
                          "e.g. step_mask(ids, tok, 'regex', pattern=r'Step \\d+:')")
    try:
        rx = re.compile(pattern, flags)
    except re.error as e:
        raise ConfigError(f"step strategy 'regex': invalid pattern {pattern!r}: {e}") from None
    texts = info.spaced_texts
    V = len(texts)
    out = torch.zeros(input_ids.shape, dtype=torch.bool)
    ids_cpu, valid_cpu = input_ids.cpu().tolist(), valid.cpu().tolist()
    for b, (row, ok) in enumerate(zip(ids_cpu, valid_cpu)):
        pos = [p for p, v in enumerate(ok) if v]
        pieces = [texts[row[p]] if 0 <= row[p] < V else "" for p in pos]
        ends, n = [], 0
        for s in pieces:
            n += len(s)
            ends.append(n)  # ends[k] = char offset one past token k
        text = "".join(pieces)
        for m in rx.finditer(text):
            if m.end() == m.start():
                continue
            k = bisect.bisect_right(ends, m.end() - 1)
            if k < len(pos):
                out[b, pos[k]] = True
    return out.to(input_ids.device) & valid


@_segmenter("fixed", first_of_run=False, skip_after_think=False)
def _mark_fixed(input_ids, info, valid, *, n: int | None = None):
    """Every ``n``-th real token, counted from the token after the first ``<think>`` (or
    from the first real token when there is none). Runs/after-think rules are off by
    default; the span rule still applies."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"step strategy 'fixed' needs option n=<int >= 1>, got n={n!r}")
    is_think = (input_ids == info.think_id) & valid if info.think_id is not None \
        else torch.zeros_like(valid)
    after_first_think = _shift_right(torch.cumsum(is_think.long(), dim=1) > 0)
    has_think = is_think.any(dim=1, keepdim=True)
    # counted: real tokens strictly after the first <think> (all real tokens when none)
    counted = valid & (after_first_think | ~has_think)
    k = torch.cumsum(counted.long(), dim=1)
    return counted & (k % n == 0)


def _zh_rule(text: str, chars: tuple[str, ...] = ("\n", "\u3002")) -> bool:
    # reference: decoded contains c, at most one other character, and at most 3 characters
    return any(c in text and len(text.replace(c, "")) <= 1 and len(text) <= 3 for c in chars)


@_segmenter("zh")
def _mark_zh(input_ids, info, valid):
    """The reference Chinese rule: any token whose decoded text has at most 3 characters,
    contains ``\\n`` or ``。`` and, with that character removed, at most 1 character left."""
    table = info.table("zh", _zh_rule)
    if not bool(table.any()):
        raise _never_fires("zh", info, "no token of at most 3 characters contains '\\n' or '。'")
    return _lookup(input_ids, table) & valid


# --------------------------------------------------------------------------- pipeline

def _shift_right(x: torch.Tensor) -> torch.Tensor:
    """out[:, p] = x[:, p-1]; out[:, 0] = False."""
    return F.pad(x[:, :-1], (1, 0), value=False)


def _shift_left(x: torch.Tensor) -> torch.Tensor:
    """out[:, p] = x[:, p+1]; out[:, L-1] = False."""
    return F.pad(x[:, 1:], (0, 1), value=False)


def _first_last(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first index, last index, count) of True per row; index -1 where none."""
    B, L = flags.shape
    pos = torch.arange(L, device=flags.device).expand(B, L)
    count = flags.sum(dim=1)
    first = torch.where(flags, pos, torch.full_like(pos, L)).min(dim=1).values
    last = torch.where(flags, pos, torch.full_like(pos, -1)).max(dim=1).values
    first = torch.where(count > 0, first, torch.full_like(first, -1))
    return first, last, count


def _tag(input_ids, tag_id, valid):
    if tag_id is None:
        return torch.zeros_like(valid)
    return (input_ids == tag_id) & valid


def _train_span(input_ids, info, valid) -> torch.Tensor:
    """Step-token positions p with first <think> <= p <= last </think> (before the shift)."""
    B, L = input_ids.shape
    pos = torch.arange(L, device=input_ids.device).expand(B, L)
    s_first, _, s_n = _first_last(_tag(input_ids, info.think_id, valid))
    _, e_last, e_n = _first_last(_tag(input_ids, info.unthink_id, valid))
    start = torch.where(s_n > 0, s_first, torch.zeros_like(s_first))
    end = torch.where(e_n > 0, e_last, torch.full_like(e_last, L - 1))
    return (pos >= start[:, None]) & (pos <= end[:, None])


def _inference_span(input_ids, info, valid) -> torch.Tensor:
    """Read positions strictly between a <think> and a </think> that occur exactly once;
    otherwise the window starts after the first real token / runs to the last one."""
    B, L = input_ids.shape
    pos = torch.arange(L, device=input_ids.device).expand(B, L)
    v_first, v_last, _ = _first_last(valid)
    s_first, _, s_n = _first_last(_tag(input_ids, info.think_id, valid))
    e_first, _, e_n = _first_last(_tag(input_ids, info.unthink_id, valid))
    start = torch.where(s_n == 1, s_first, v_first)
    end = torch.where(e_n == 1, e_first, v_last + 1)
    return (pos > start[:, None]) & (pos < end[:, None])


def _as_row_tensor(x, B: int, device, what: str) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ShapeError(f"{what} must be an int or a (B,)=({B},) tensor, got shape {tuple(t.shape)}")
    return t.long()


def step_mask(
    input_ids: torch.Tensor,
    tokenizer: Any,
    strategy: str = "reference",
    span: str = "train",
    *,
    read_at: str = "before_step_token",
    attention_mask: torch.Tensor | None = None,
    response_start: int | torch.Tensor | None = None,
    first_of_run: bool | None = None,
    skip_after_think: bool | None = None,
    conclusion: bool = False,
    **options: Any,
) -> torch.Tensor:
    """Boolean mask (B, L) of the positions whose hidden state the SPRM head scores.

    Args:
        input_ids: (B, L) integer token ids (prompt + response, padded either side).
        tokenizer: the tokenizer that produced ``input_ids`` (step/think ids are
            resolved from it once and cached).
        strategy: a name in :data:`SEGMENTERS`.
        span: ``"train"`` or ``"inference"`` (method.md §2 rule 4).
        read_at: ``"before_step_token"`` (reference: shift left by one) or ``"step_token"``.
        attention_mask: (B, L), 1 for real tokens; padding is never marked.
        response_start: int or (B,) position of the first response token; marks whose
            step token lies before it are dropped (rule 6, reference training).
        first_of_run / skip_after_think: rules 2 and 3 (default: the strategy's default,
            True except for ``fixed``).
        conclusion: also score the end of the response as one more step (rule 7, a
            named deviation from the reference, which scores the reasoning steps only):
            every row with a response (a real token at or after ``response_start``)
            gets a mark whose "step token" is the row's last real token (the EOS, or
            the last token of a truncated response), read per ``read_at``. Its span is
            everything after the last step: the conclusion (``</think> The answer is
            ...``), or the unfinished step of a response that stopped early, where a
            premature or inconsistent end is unlikely under the policy.
        **options: strategy options (``marker``, ``allow_multi_token_marker`` for
            reference; ``pattern``/``flags`` for regex; ``n`` for fixed).

    Returns:
        BoolTensor (B, L) on ``input_ids.device``.
    """
    seg = SEGMENTERS.get(strategy)
    if span not in SPANS:
        raise ConfigError(f"span={span!r} is not allowed; choose one of {list(SPANS)}")
    if read_at not in READ_AT:
        raise ConfigError(f"read_at={read_at!r} is not allowed; choose one of {list(READ_AT)}")
    valid_opts = seg.option_names()
    unknown = [k for k in options if k not in valid_opts]
    if unknown:
        raise ConfigError(
            f"step strategy {strategy!r} has no option {unknown[0]!r}; its options are "
            f"{valid_opts or 'none'} (common ones: read_at, attention_mask, response_start, "
            f"first_of_run, skip_after_think)"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ShapeError(f"input_ids must be a (B, L) tensor, got {shape}; use ids.unsqueeze(0) for one row")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ShapeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.device.type != "cpu":   # the token tables live on the CPU: mark there
        on_cpu = (lambda x: x.cpu() if isinstance(x, torch.Tensor) else x)
        return step_mask(input_ids.cpu(), tokenizer, strategy, span, read_at=read_at,
                         attention_mask=on_cpu(attention_mask),
                         response_start=on_cpu(response_start), first_of_run=first_of_run,
                         skip_after_think=skip_after_think, conclusion=conclusion,
                         **options).to(input_ids.device)
    B, L = input_ids.shape
    if attention_mask is None:
        valid = torch.ones((B, L), dtype=torch.bool, device=input_ids.device)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ShapeError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                f"shape {tuple(input_ids.shape)}"
            )
        valid = attention_mask.to(device=input_ids.device).bool()
    info = step_tokens(tokenizer)
    if L == 0:
        return torch.zeros((B, 0), dtype=torch.bool, device=input_ids.device)

    marks = seg.mark(input_ids, info, valid, **options).bool() & valid          # rule 1
    if seg.first_of_run if first_of_run is None else first_of_run:             # rule 2
        marks = marks & ~_shift_right(marks)
    if seg.skip_after_think if skip_after_think is None else skip_after_think:  # rule 3
        marks = marks & ~_shift_right(_tag(input_ids, info.think_id, valid))
    if info.think_id is None or info.unthink_id is None:
        info.warn_missing_tags()
    if span == "train":                                                         # rule 4 (train)
        marks = marks & _train_span(input_ids, info, valid)
    if response_start is not None:                                              # rule 6
        rs = _as_row_tensor(response_start, B, input_ids.device, "response_start")
        marks = marks & (torch.arange(L, device=input_ids.device)[None, :] >= rs[:, None])
    if read_at == "before_step_token":                                          # rule 5
        marks = _shift_left(marks)
    if span == "inference":                                                     # rule 4 (inference)
        marks = marks & _inference_span(input_ids, info, valid)
    if conclusion:                                                              # rule 7
        marks = marks | _conclusion_marks(input_ids, info, valid, response_start, read_at)
    return marks & valid


def _conclusion_marks(input_ids: torch.Tensor, info: StepTokens, valid: torch.Tensor,
                      response_start: int | torch.Tensor | None, read_at: str) -> torch.Tensor:
    """(B, L) bool: per row with a real token at or after ``response_start``, the read
    position of its end (the last real token, or the one before it for
    ``before_step_token``; never before ``response_start``)."""
    B, L = input_ids.shape
    out = torch.zeros((B, L), dtype=torch.bool, device=input_ids.device)
    if L == 0:
        return out
    pos = torch.arange(L, device=input_ids.device)
    start = (torch.zeros(B, dtype=torch.long, device=input_ids.device) if response_start is None
             else _as_row_tensor(response_start, B, input_ids.device, "response_start"))
    last = torch.where(valid, pos[None, :], torch.full_like(pos[None, :], -1)).max(1).values
    read = last - (1 if read_at == "before_step_token" else 0)
    rows = (read >= start) & (read >= 0)
    out[rows.nonzero().flatten(), read[rows]] = True
    return out


#: step_mask keywords every segmenter accepts (the common rules), beside its own options
COMMON_OPTIONS = ("first_of_run", "skip_after_think", "conclusion")


def check_options(strategy: str = "reference", options: dict | None = None, *,
                  read_at: str = "before_step_token", span: str = "inference",
                  where: str = "segmenter_options") -> None:
    """Validate a step configuration when it loads, before any tokenizer or model
    exists: ``strategy`` is registered, ``read_at`` / ``span`` are allowed, and every
    key of ``options`` is an option of that segmenter or a common rule. Raises
    ConfigError / UnknownNameError naming the valid choices."""
    seg = SEGMENTERS.get(strategy)
    if span not in SPANS:
        raise ConfigError(f"span={span!r} is not allowed; choose one of {list(SPANS)}")
    if read_at not in READ_AT:
        raise ConfigError(f"read_at={read_at!r} is not allowed; choose one of {list(READ_AT)}")
    if not isinstance(options or {}, dict):
        raise ConfigError(f"{where} must be a mapping of option: value, got "
                          f"{type(options).__name__}")
    valid = seg.option_names() + list(COMMON_OPTIONS)
    unknown = [k for k in (options or {}) if k not in valid]
    if unknown:
        raise ConfigError(
            f"{where}: step segmenter {strategy!r} has no option {unknown[0]!r}; its options "
            f"are {seg.option_names() or 'none'}, and every segmenter takes "
            f"{list(COMMON_OPTIONS)}")
    for k in ("first_of_run", "skip_after_think", "conclusion"):
        v = (options or {}).get(k)
        if v is not None and not isinstance(v, bool):
            raise ConfigError(f"{where}.{k} must be true or false, got {v!r}")


def check_strategy(tokenizer: Any, strategy: str = "reference", **options: Any) -> None:
    """Raise early (TokenizerError/ConfigError) if ``strategy`` cannot work with ``tokenizer``."""
    ids = torch.zeros((1, 1), dtype=torch.long)
    step_mask(ids, tokenizer, strategy, **options)


__all__ = ["step_mask", "check_strategy", "check_options", "COMMON_OPTIONS", "step_tokens", "StepTokens", "Segmenter", "SEGMENTERS",
           "REFERENCE_MARKER", "SPANS", "READ_AT"]
