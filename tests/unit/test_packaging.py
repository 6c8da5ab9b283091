"""Packaging invariants: one dependency list in two files, torch pinned,
CI calls the README's test command."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_deps() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["project"]["dependencies"]


def _conda_pip_deps() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return [p for p in pip if not p.startswith("-e")]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def test_environment_yml_matches_pyproject():
    assert sorted(map(_norm, _pyproject_deps())) == sorted(map(_norm, _conda_pip_deps()))


def test_torch_is_pinned_everywhere():
    for deps in (_pyproject_deps(), _conda_pip_deps()):
        torch = [d for d in deps if re.match(r"torch\b", d)]
        assert torch == ["torch==2.13.0"], torch


def test_every_dependency_has_a_bound():
    for d in _pyproject_deps():
        assert re.search(r"(==|>=)", d), f"unbounded dependency {d!r}"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci
    head = readme[:1500]
    assert "make test" in head and "make study" in head


def test_environment_python_311():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    assert env["channels"] == ["conda-forge"]
