"""The ablation study's specs: their names, run order and where they live.

A leaf module: :mod:`metastone_lab.ablations` (which runs the specs) and
:mod:`metastone_lab.report` (which reads their results and their ``report:``
declarations) both import it, so neither imports the other's internals.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

#: the ablation families, in run order (base configuration first)
SPECS = ["ablate_aggregation", "ablate_scaling_law", "ablate_loss", "ablate_segmentation",
         "ablate_ood", "ablate_shared_vs_separate", "ablate_representation"]
#: slow on CPU; only with --with-smollm2
OPTIONAL_SPECS = ["ablate_segmentation_smollm2"]
#: steps that are not specs: the representation probe (metastone_lab.probe), run last
PROBE_STEP = "probe"
#: the MLflow experiment of the study's timing runs
TIMING_EXPERIMENT = "ablations"


def repo_root() -> Path:
    """This checkout's root (the folder holding ``experiments/``)."""
    return Path(__file__).resolve().parents[1]


def spec_path(name: str, root: Path | None = None) -> Path:
    """``<root>/experiments/<name>.yaml``; a clear error naming the families if absent."""
    p = (root or repo_root()) / "experiments" / f"{name}.yaml"
    if not p.is_file():
        raise ConfigError(f"ablation spec {str(p)!r} not found; the families are "
                          f"{', '.join(SPECS + OPTIONAL_SPECS)}")
    return p


__all__ = ["OPTIONAL_SPECS", "PROBE_STEP", "SPECS", "TIMING_EXPERIMENT", "repo_root",
           "spec_path"]
