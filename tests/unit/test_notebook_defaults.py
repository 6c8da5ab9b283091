"""Every notebook parameter that is a StudyConfig field defaults to the dataclass's
default, unless the notebook declares (with a reason) that it differs: in its
metadata ``metastone_lab.differs_from_StudyConfig``. So a knob has one default,
and a notebook that departs from it says so."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from metastone_lab.config import to_dict
from metastone_lab.runner import RESERVED
from metastone_lab.study import StudyConfig

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def _defaults() -> dict:
    """StudyConfig's defaults under the flat names a notebook uses (the fields of the
    composed sub-configs included: ``temperature`` is ``sampling.temperature``)."""
    return to_dict(StudyConfig())


def _parameters(nb: dict) -> dict:
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "a notebook has exactly one cell tagged 'parameters'"
    out = {}
    for node in ast.parse("".join(cells[0]["source"])).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            out[target.id] = ast.literal_eval(node.value)
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_parameters_default_to_the_study_config_or_say_why(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    defaults = _defaults()
    params = _parameters(nb)
    differ = {k for k, v in params.items()
              if k in defaults and k not in RESERVED and v != defaults[k]}
    declared = nb["metadata"].get("metastone_lab", {}).get("differs_from_StudyConfig", {})
    assert differ == set(declared), (
        f"{path.name}: parameters that differ from StudyConfig {sorted(differ)}, declared "
        f"{sorted(declared)}; make them equal or declare the reason in the notebook metadata")
    assert all(isinstance(v, str) and len(v) > 10 for v in declared.values())


def test_the_check_sees_a_changed_default(tmp_path):
    import re

    for path in NOTEBOOKS:
        nb = json.loads(path.read_text(encoding="utf-8"))
        if "temperature" in _parameters(nb):
            break
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    cell["source"] = [re.sub(r"^temperature = [0-9.]+", "temperature = 0.123", line)
                      for line in cell["source"]]
    bad = tmp_path / path.name
    bad.write_text(json.dumps(nb), encoding="utf-8")
    with pytest.raises(AssertionError, match="temperature"):
        test_notebook_parameters_default_to_the_study_config_or_say_why(bad)
