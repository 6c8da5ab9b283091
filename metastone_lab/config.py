"""Typed configs: dataclasses loaded from dicts/YAML with validation.

Every configurable thing in metastone-lab is a dataclass. ``from_dict`` builds
one from a plain mapping (a YAML file, papermill parameters, ``--set`` flags),
rejecting unknown keys and wrong types with a message that names the key, the
valid choices and the fix. Range checks live in each dataclass's
``__post_init__`` and raise :class:`ConfigError` through :func:`check`.

A config may *compose* shared sub-configs (:mod:`metastone_lab.config_tree`): a field
declared with :func:`subconfig` holds a dataclass whose fields are also the parent's
flat names (``StudyConfig.temperature`` is ``StudyConfig.sampling.temperature``).
``from_dict`` accepts either form (``{"temperature": 1.2}`` or ``{"sampling":
{"temperature": 1.2}}``), ``to_dict`` writes the flat form (what MLflow params,
checkpoints and cache keys have always held) and :func:`flat_names` is the one mapping
from a flat name to its sub-config field, derived from the dataclasses.

>>> from dataclasses import dataclass
>>> @dataclass
... class Demo:
...     k: int = 8
>>> from_dict(Demo, {"k": 4})
Demo(k=4)
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin

from .errors import ConfigError

T = TypeVar("T")


#: dataclass field metadata key marking a composed sub-config (see :func:`subconfig`)
FLAT = "metastone_lab.flat"


def subconfig(cls: type) -> Any:
    """A dataclass field holding sub-config ``cls`` (default ``cls()``), whose fields
    are also the parent's flat names; decorate the parent with :func:`composes`."""
    return dataclasses.field(default_factory=cls, metadata={FLAT: True})


def flat_names(cls: type) -> dict[str, str]:
    """``{flat name: sub-config field}`` of a dataclass that composes sub-configs,
    e.g. ``{"temperature": "sampling", ...}``; ``{}`` for a plain dataclass."""
    out: dict[str, str] = {}
    if not dataclasses.is_dataclass(cls):
        return out
    hints = None
    for f in dataclasses.fields(cls):
        if f.metadata.get(FLAT):
            hints = hints or typing.get_type_hints(cls)
            out.update({g.name: f.name for g in dataclasses.fields(hints[f.name])})
    return out


def field_names(cls: type) -> set[str]:
    """Every name ``from_dict(cls, ...)`` accepts at the top level: the fields and
    the flat names of the composed sub-configs."""
    return {f.name for f in dataclasses.fields(cls) if f.init} | set(flat_names(cls))


def _fold_flat(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Move flat keys (``temperature``) and dotted keys (``sampling.temperature``) of
    ``data`` into their sub-config's mapping (they win over the same key in a nested
    mapping given beside them)."""
    flat = flat_names(cls)
    subs = set(flat.values())
    for k in [k for k in data
              if k in flat or ("." in str(k) and str(k).partition(".")[0] in subs)]:
        sub, _, name = str(k).partition(".")
        if k in flat:
            sub, name = flat[k], k
        cur = data.get(sub)
        if cur is None:
            cur = {}
        elif dataclasses.is_dataclass(cur):
            cur = to_dict(cur)
        elif not isinstance(cur, Mapping):
            raise ConfigError(f"{where}.{sub}: expected a mapping, got {type(cur).__name__}")
        data[sub] = {**cur, name: data.pop(k)}
    return data


def composes(cls: type[T]) -> type[T]:
    """Class decorator for a dataclass with :func:`subconfig` fields: each flat name
    becomes a property reading/writing the sub-config's field, and the constructor
    takes flat keywords too (``GenerateConfig(k=4, temperature=1.0)``)."""
    flat = flat_names(cls)
    subs = sorted(set(flat.values()))
    hints = typing.get_type_hints(cls)
    init = cls.__init__

    def __init__(self, *args: Any, **kw: Any) -> None:
        moved: dict[str, dict[str, Any]] = {}
        for k in [k for k in kw if k in flat]:
            moved.setdefault(flat[k], {})[k] = kw.pop(k)
        for sub in subs:
            base, values = kw.get(sub), moved.get(sub, {})
            if base is None and not values:
                continue
            if base is None:
                base = hints[sub]()
            elif isinstance(base, Mapping):
                base = from_dict(hints[sub], base, where=f"{cls.__name__}.{sub}")
            # a copy: two configs never share one sub-config (a flat setter writes one)
            kw[sub] = dataclasses.replace(base, **values)
        init(self, *args, **kw)

    def alias(name: str, sub: str) -> property:
        def get(self: Any) -> Any:
            return getattr(getattr(self, sub), name)

        def put(self: Any, value: Any) -> None:
            setattr(getattr(self, sub), name, value)

        return property(get, put, doc=f"``{sub}.{name}`` (declared in "
                                      f"{hints[sub].__name__})")

    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]
    for name, sub in flat.items():
        setattr(cls, name, alias(name, sub))
    return cls


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition``; use in ``__post_init__``."""
    if not condition:
        raise ConfigError(message)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widen to floats)."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}. "
            f"Fix the value's type."
        )
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{where}: {value!r} is not allowed; choose one of {list(choices)}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{where}: expected a list, got {type(value).__name__} {value!r}"
            )
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}"
            )
        return from_dict(tp, value, where=where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{where}: expected a number, got {type(value).__name__} {value!r}"
            )
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(
                f"{where}: expected an integer, got {type(value).__name__} {value!r}"
            )
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(
                f"{where}: expected true/false, got {type(value).__name__} {value!r}"
            )
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(
                f"{where}: expected a string, got {type(value).__name__} {value!r}"
            )
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {type(value).__name__}")
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(
            f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``, validating keys and types.

    Nested dataclass fields accept nested mappings (errors name the dotted path,
    ``StudyConfig.sampling.temperature``); the flat names of composed sub-configs
    are accepted at the top level. Unknown keys raise ConfigError listing the valid
    keys (with a close-match suggestion).
    """
    where = where or cls.__name__
    data = _fold_flat(cls, dict(data or {}), where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        valid = sorted(field_names(cls))
        k = unknown[0]
        raise ConfigError(
            f"{where}: unknown key {k!r}.{_suggest(k, valid)} "
            f"Valid keys: {', '.join(valid)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any, nested: bool = False) -> dict[str, Any]:
    """A dataclass as a plain nested dict (Paths become strings). Composed
    sub-configs (:func:`subconfig`) are written flat, under their fields' names,
    unless ``nested``."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            out: dict[str, Any] = {}
            for f in dataclasses.fields(v):
                x = conv(getattr(v, f.name))
                if f.metadata.get(FLAT) and not nested:
                    out.update(x)
                else:
                    out[f.name] = x
            return out
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def flatten(cfg: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Flatten a dataclass/dict into ``{"a.b": value}`` for MLflow params."""
    d = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with clear errors for missing/invalid files."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; check the path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not valid UTF-8 ({e}); save the file as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if data is None:
        raise ConfigError(f"{p}: the file is empty; it must hold a YAML mapping")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a YAML mapping at top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """Parse a ``key=value`` override; the value is read as YAML (``k=8`` is int)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as text; take it as the number meant
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
        except ValueError:
            pass
    return key.strip(), value
