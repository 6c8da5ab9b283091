"""The ablation report (``metastone-lab report``): docs/results.md from the MLflow
store, rendering what each spec's ``report:`` section declares.

Modules, one concept each: :mod:`.stats` (runs and their statistics),
:mod:`.claims` (declared comparisons, measured, and their verdicts),
:mod:`.figures`, :mod:`.scaling` (the compute fit), :mod:`.timing`,
:mod:`.probe_table`, :mod:`.sections` (markdown per family) and :mod:`.build`
(the file and the command). The compare-runs helper lives in
:mod:`metastone_lab.compare_runs`.
"""
from __future__ import annotations

from .build import build_report, cli_main, load_families
from .claims import decide, evaluate
from .stats import fmt, load_runs, stat, versus
from .timing import timing_section

__all__ = ["build_report", "cli_main", "decide", "evaluate", "fmt", "load_families",
           "load_runs", "stat", "timing_section", "versus"]
