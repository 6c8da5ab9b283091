"""What a notebook's ``parameters`` cell declares, and whether given values fit.

Only the runner calls papermill; this module receives papermill's
``inspect_notebook`` output (``{name: {name, inferred_type_name, default, help}}``)
so it stays import-light and testable without a kernel.

The type of a parameter is taken from its annotation when present
(``k: int = 8``), otherwise from its default's literal (``k = 8`` -> int).
A default of ``None`` or a non-literal expression accepts any value.
An int is accepted where a float is declared.
"""
from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

_ANNOTATIONS = {
    "int": int, "float": float, "str": str, "bool": bool,
    "list": list, "List": list, "tuple": list, "dict": dict, "Dict": dict,
}


@dataclass(frozen=True)
class DeclaredParam:
    name: str
    type: type | None          # None: any value accepted
    default: Any               # the parsed default (or its source text if not a literal)
    help: str = ""

    @property
    def type_name(self) -> str:
        return self.type.__name__ if self.type is not None else "any"


def _annotation_type(name: str) -> type | None:
    base = name.strip().split("[", 1)[0].split(".")[-1]
    if "|" in name or base in ("Optional", "Union", "Any", "None", "NoneType", ""):
        return None
    return _ANNOTATIONS.get(base)


def from_inspection(inspected: Mapping[str, Mapping[str, Any]]) -> dict[str, DeclaredParam]:
    """Turn ``papermill.inspect_notebook`` output into :class:`DeclaredParam` s."""
    out: dict[str, DeclaredParam] = {}
    for name, info in inspected.items():
        src = str(info.get("default", ""))
        try:
            default = ast.literal_eval(src)
            literal = True
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            default, literal = src, False
        tp = _annotation_type(str(info.get("inferred_type_name") or "None"))
        if tp is None and literal and default is not None:
            tp = list if isinstance(default, tuple) else type(default)
            if tp not in (int, float, str, bool, list, dict):
                tp = None
        out[name] = DeclaredParam(name, tp, default, str(info.get("help") or ""))
    return out


def type_ok(value: Any, tp: type | None) -> bool:
    """Whether ``value`` fits declared type ``tp`` (None fits everything declared)."""
    if tp is None or value is None:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, tp)


def check_parameters(params: Mapping[str, Any], declared: Mapping[str, DeclaredParam],
                     where: str, reserved: tuple[str, ...] = ()) -> None:
    """Raise ConfigError for a parameter not declared in the notebook or of the wrong type.
    ``reserved`` names (injected by the runner) are left out of the listed valid names."""
    valid = sorted(k for k in declared if k not in reserved)
    for key, value in params.items():
        if key not in declared:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: parameter {key!r} is not declared in the notebook's parameters "
                f"cell.{hint} Valid names: {', '.join(valid) or '(none)'}. Fix the spec/--set, "
                f"or declare it in the notebook's cell tagged 'parameters'."
            )
        d = declared[key]
        if not type_ok(value, d.type):
            raise ConfigError(
                f"{where}: parameter {key!r} = {value!r} is a {type(value).__name__}, but the "
                f"notebook declares {d.type_name} (default {d.default!r}). Fix the value's type."
            )
