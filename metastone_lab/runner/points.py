"""A spec's points: base parameters x grid x explicit points x seeds, each a
:class:`Point` with a file-safe name, checked against the notebook's parameters cell."""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .spec import RESERVED, Spec


@dataclass(frozen=True)
class Point:
    index: int
    name: str
    params: dict          # everything passed to the notebook (base + point + seed)
    varying: dict         # the values that define this point

    @property
    def params_hash(self) -> str:
        blob = json.dumps(self.params, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

def param_text(v: Any) -> str:
    """A parameter value as a point name and the dry run show it (``0.5``, ``[1,2]``)."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def flat_params(params: dict, prefix: str = "") -> dict:
    """``{"train": {"loss": "spr"}}`` -> ``{"train.loss": "spr"}`` (a dry run's columns)."""
    out: dict = {}
    for k, v in params.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing_params(points: list) -> list[str]:
    """The (flattened) parameters whose value differs between ``points``, in order."""
    flats = [flat_params(p.params) for p in points]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return [k for k in keys
            if len({json.dumps(f.get(k, "<unset>"), sort_keys=True, default=str)
                    for f in flats}) > 1]


def point_name(varying: dict) -> str:
    if not varying:
        return "default"
    raw = "_".join(f"{k}-{param_text(v)}" for k, v in varying.items())
    name = re.sub(r"[^A-Za-z0-9_.+=-]+", "", raw.replace(" ", "")) or "point"
    if len(name) > 80:
        name = name[:70] + "-" + hashlib.sha1(raw.encode()).hexdigest()[:8]
    return name


def expand_points(spec: Spec) -> list[Point]:
    """Grid product + explicit points, times seeds. Names are unique."""
    combos: list[dict] = []
    if spec.grid:
        keys = list(spec.grid)
        combos += [dict(zip(keys, vals)) for vals in itertools.product(*spec.grid.values())]
    combos += [dict(p) for p in spec.points]
    if not combos:
        combos = [{}]
    if spec.seeds:
        combos = [{**c, "seed": s} for c in combos for s in spec.seeds]
    points, seen = [], {}
    for i, varying in enumerate(combos):
        name = point_name(varying)
        if name in seen:
            raise ConfigError(
                f"spec {spec.name!r}: points {seen[name]} and {i} are identical "
                f"({name!r}); remove the duplicate")
        seen[name] = i
        points.append(Point(i, name, {**spec.parameters, **varying}, varying))
    return points


def select_points(points: list[Point], only: list[str]) -> list[Point]:
    if not only:
        return points
    by_name = {p.name: p for p in points}
    chosen: list[Point] = []
    for item in only:
        p = by_name.get(item)
        if p is None and re.fullmatch(r"-?\d+", item):
            idx = int(item)
            p = points[idx] if -len(points) <= idx < len(points) else None
        if p is None:
            raise ConfigError(
                f"--only {item!r}: no such point; use a name or an index 0..{len(points) - 1}. "
                f"Points: {', '.join(p.name for p in points)}")
        if p not in chosen:
            chosen.append(p)
    return sorted(chosen, key=lambda p: p.index)


def validate_points(points: list[Point], notebook: Path) -> dict:
    """Check every point's parameters against the notebook's parameters cell."""
    import papermill as pm

    from ..notebook_params import check_parameters, from_inspection

    try:
        declared = from_inspection(pm.inspect_notebook(str(notebook)))
    except Exception as e:
        raise ConfigError(f"cannot read the parameters of notebook {str(notebook)!r}: {e}; "
                          f"check that it is a valid .ipynb with a cell tagged 'parameters'")
    for p in points:
        check_parameters(p.params, declared, where=f"point {p.index} ({p.name}) of {notebook.name}",
                         reserved=RESERVED)
    return declared
