"""Experiment specs: ``experiments/<name>.yaml`` read into a validated :class:`Spec`.

A bare name (``quickstart``) is looked up in ``experiments/`` (:func:`resolve_spec_path`);
``--set key=value`` overrides apply on load (:func:`load_spec`); names the runner
injects into the notebook (:data:`RESERVED`) may not be set by a spec.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import tracking
from ..config import check, from_dict, load_yaml, parse_override
from ..config_tree import flat_params
from ..errors import ConfigError

RESERVED = ("mlflow_run_id", "mlflow_parent_run_id", "tracking_uri", "spec_name",
            "point_name", "output_dir")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Spec:
    name: str
    notebook: str
    parameters: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    points: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    experiment: str | None = None
    summary_keys: list[str] = field(default_factory=list)
    description: str = ""
    report: dict = field(default_factory=dict)   # what it means: metastone_lab.report_spec

    def __post_init__(self) -> None:
        check(bool(_NAME_RE.match(self.name)),
              f"spec name {self.name!r} must be letters, digits, '_', '-', '.' "
              f"(it names the folder runs/<name>); rename it")
        # nested sub-config keys (sampling: {temperature: 1.2}, sampling.temperature) are
        # run under their flat names, the names notebooks declare (config_tree.flat_params)
        where = f"spec {self.name!r}"
        self.parameters = flat_params(self.parameters, f"{where}: parameters")
        self.grid = flat_params(self.grid, f"{where}: grid")
        self.points = [flat_params(p, f"{where}: points[{i}]") if isinstance(p, dict) else p
                       for i, p in enumerate(self.points)]
        for key, values in self.grid.items():
            check(isinstance(values, list),
                  f"spec {self.name!r}: grid.{key} must be a list of values, got "
                  f"{type(values).__name__} {values!r}; write e.g. {key}: [{values!r}]")
            check(len(values) > 0,
                  f"spec {self.name!r}: grid.{key} is an empty list, so the grid has no "
                  f"points; give it at least one value or remove the key")
        for i, p in enumerate(self.points):
            check(isinstance(p, dict),
                  f"spec {self.name!r}: points[{i}] must be a mapping of parameters, "
                  f"got {type(p).__name__}")
        check(self.seeds is not None and all(isinstance(s, int) and not isinstance(s, bool)
                                             for s in self.seeds),
              f"spec {self.name!r}: seeds must be a list of integers, got {self.seeds!r}")
        used = set(self.parameters) | set(self.grid) | {k for p in self.points for k in p}
        bad = sorted(used & set(RESERVED))
        check(not bad, f"spec {self.name!r}: {bad} are reserved names the runner injects "
                       f"({', '.join(RESERVED)}); remove them from the spec")
        check(not (self.seeds and "seed" in self.grid),
              f"spec {self.name!r}: give seeds either as 'seeds:' or as grid.seed, not both")
        from ..report_spec import ReportSpec

        ReportSpec.from_spec(self)  # the report: section, validated on load (ConfigError)

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

def find_root(spec_path: str | Path) -> Path:
    """``$METASTONE_LAB_HOME``, else the nearest folder above the spec with
    ``pyproject.toml`` or ``.git``, else the cwd."""
    env = os.environ.get(tracking.HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return tracking.project_root(Path(spec_path).resolve().parent) or Path.cwd().resolve()


def _spec_folders(root: str | Path | None = None) -> list[Path]:
    """Where bare spec names are looked up: ``<root>/experiments`` (root = the
    argument, ``$METASTONE_LAB_HOME`` or the project around the cwd), then this
    checkout's ``experiments/``."""
    roots = [Path(root)] if root is not None else [find_root(Path.cwd() / "_")]
    roots.append(Path(__file__).resolve().parents[2])
    return list(dict.fromkeys(r.resolve() / "experiments" for r in roots))


def available_specs(root: str | Path | None = None) -> list[str]:
    """Names of the specs (``experiments/*.yaml``) a bare name can refer to."""
    names: list[str] = []
    for d in _spec_folders(root):
        if d.is_dir():
            names += [f.stem for f in sorted(d.glob("*.yaml"))]
    return list(dict.fromkeys(names))


def resolve_spec_path(path: str | Path, root: str | Path | None = None) -> Path:
    """``path`` if it is a file, else ``experiments/<path>.yaml`` (so ``run quickstart``
    works); a clear error listing the available specs otherwise."""
    p = Path(path)
    if p.is_file():
        return p
    if p.parent == Path(".") or str(p.parent) == "experiments":
        stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
        for d in _spec_folders(root):
            if (d / f"{stem}.yaml").is_file():
                return d / f"{stem}.yaml"
    names = available_specs(root)
    raise ConfigError(f"spec {str(path)!r} not found; the specs here are "
                      f"{', '.join(names) if names else 'none (no experiments/ folder)'}: "
                      f"pass a name (e.g. quickstart) or a path to a spec YAML")


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
              root: str | Path | None = None) -> tuple[Spec, Path]:
    """Read and validate a spec; apply ``--set`` overrides; return (spec, notebook path).
    ``path`` may be a bare spec name (``quickstart``; :func:`resolve_spec_path`)."""
    path = resolve_spec_path(path, root)
    data = load_yaml(path)
    spec = from_dict(Spec, data, where=f"spec {str(path)!r}")
    for item in overrides:
        for key, value in flat_params(dict([parse_override(item)]), f"--set {item!r}").items():
            if key in RESERVED:
                raise ConfigError(f"--set {item!r}: {key!r} is reserved (injected by the runner)")
            if key in spec.grid:
                spec.grid[key] = [value]
            else:
                spec.parameters[key] = value
    root = Path(root) if root is not None else find_root(path)
    nb = Path(spec.notebook)
    nb = nb if nb.is_absolute() else root / nb
    if not nb.is_file():
        raise ConfigError(
            f"spec {str(path)!r}: notebook {spec.notebook!r} does not exist (looked for "
            f"{str(nb)!r}; paths are relative to the repo root {str(root)!r}); fix 'notebook:'"
        )
    return spec, nb
