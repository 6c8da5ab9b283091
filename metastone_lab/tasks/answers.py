"""Answer extraction and equivalence for free-form math text.

Extraction order (the LAST match of the first pattern that matches wins):
``\\boxed{...}`` (balanced braces), ``The answer is X``, GSM8K ``#### X``.
Equivalence uses ``math-verify`` (the community's verifier) when installed,
else a sympy comparison, else normalised string equality.
"""
from __future__ import annotations

import re

_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is[:\s]*\$?([^\n$]*?)\$?\s*\.?\s*(?:\n|$)")
_GSM8K = re.compile(r"####\s*([^\n]+)")
_INT = re.compile(r"^-?\d+$")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    j = i
    while j < len(text):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip() or None
        j += 1
    return None  # unbalanced: unparsable


def extract_math_answer(text: str) -> str | None:
    """Final answer of ``text`` from boxed / "The answer is" / "####"; None if absent."""
    if not isinstance(text, str) or not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_ANSWER_IS, _GSM8K):
        hits = pattern.findall(text)
        if hits:
            ans = hits[-1].strip().rstrip(".").strip()
            if ans:
                return ans
    return None


def normalize(ans: str) -> str:
    """Strip spaces, thousands separators, surrounding $ and a trailing period."""
    s = ans.strip().strip("$").strip().rstrip(".")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    return re.sub(r"\s+", "", s)


def _sympy_equal(a: str, b: str) -> bool:
    try:
        import sympy
        from sympy.parsing.sympy_parser import parse_expr

        ea, eb = parse_expr(a.replace("^", "**")), parse_expr(b.replace("^", "**"))
        return bool(sympy.simplify(ea - eb) == 0)
    except Exception:  # noqa: BLE001 - anything unparsable is "not equal"
        return False


def math_equal(pred: str, gold: str) -> bool:
    """True if ``pred`` and ``gold`` denote the same value.

    Fast path: identical normalised strings / integers. Then math-verify
    (LaTeX-aware, e.g. ``\\frac12 == 0.5``), then sympy. Never raises.
    """
    p, g = normalize(pred), normalize(gold)
    if p == g:
        return True
    if _INT.match(p) and _INT.match(g):
        return int(p) == int(g)
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a declared dependency
        return _sympy_equal(p, g)
    try:
        gp, pp = parse(f"${gold.strip()}$"), parse(f"${pred.strip()}$")
        if gp and pp:
            return bool(verify(gp, pp))
    except Exception:  # noqa: BLE001 - math-verify timeouts/parse errors
        pass
    return _sympy_equal(p, g)
