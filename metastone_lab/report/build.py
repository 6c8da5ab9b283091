"""``metastone-lab report`` (= ``make report``): docs/results.md + docs/figures/*.png,
generated from the MLflow store and the specs' ``report:`` declarations only.

Every number in the text is read from the runs; what the numbers are compared
with, and the paper's claims, are read from ``experiments/ablate_*.yaml``.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..ablation_specs import OPTIONAL_SPECS, SPECS, repo_root, spec_path
from ..errors import ConfigError
from ..report_spec import ReportSpec
from . import scaling, sections
from .probe_table import probe_bullet, probe_section
from .sections import Family
from .stats import load_runs
from .timing import timing_section


def load_families(root: Path | None = None) -> list[Family]:
    """Every ablation spec (run order, optional ones last) with its validated
    declarations; a spec without a ``report:`` section is an error naming the fix."""
    from ..runner import load_spec

    root = Path(root) if root is not None else repo_root()
    out = []
    for name in SPECS + OPTIONAL_SPECS:
        spec, _ = load_spec(spec_path(name, root), root=root)
        rs = ReportSpec.from_spec(spec)
        if rs is None:
            raise ConfigError(f"spec {name!r} has no `report:` section, and the report renders "
                              f"only what a spec declares; add one (title, reference, "
                              f"comparisons: see metastone_lab/report_spec.py)")
        out.append(Family(name, spec.experiment_name, rs))
    return out


def build_report(tracking_uri: str | None = None, out: str | Path = "docs/results.md",
                 fig_dir: str | Path | None = None, root: Path | None = None) -> str:
    """Write the ablation report (markdown + figures) from the MLflow store; return the text."""
    import time

    from .. import tracking
    from ..io_utils import atomic_write_text

    out = Path(out)
    fig_dir = Path(fig_dir) if fig_dir is not None else out.parent / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or tracking.resolve_tracking_uri()
    families = load_families(root)
    for f in families:
        f.runs = load_runs(f.experiment, uri)
        f.measure()

    def save(fig, name: str) -> str:
        import matplotlib.pyplot as plt

        path = fig_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return os.path.relpath(path, out.parent)

    base = next((f for f in families if f.spec.layout == "aggregators"), None)
    curves = next((f for f in families if f.spec.training_curves and len(f.runs)), None)
    L = sections.header(uri, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        tracking.git_commit() or "unknown")
    L += sections.setup(base, [f for f in families if f is not base])
    L += timing_section(uri, {f.experiment: f.runs for f in families})
    fit_bullet = None
    for f in families:
        if f.spec.layout == "aggregators":
            L += sections.aggregators(f, curves, save)
        elif f.spec.layout == "scaling":
            lines, fit = scaling.section(f.spec, f.runs, f.experiment, save)
            L += lines
            if f.spec.fit is not None and len(f.runs):
                fit_bullet = scaling.fit_verdict(f.spec, fit)[1]
        else:
            L += sections.table(f)
    probe_lines, probe = probe_section(uri)
    L += probe_lines
    pb = probe_bullet(probe, base.runs if base is not None else None) if probe else None
    L += sections.discussion(families, fit_bullet, pb, base)
    text = "\n".join(L) + "\n"
    atomic_write_text(out, text)
    return text


def cli_main(argv: list[str] | None = None) -> int:
    """``metastone-lab report``: regenerate docs/results.md and docs/figures/ from MLflow."""
    from .. import cli_help

    ap = cli_help.parser("metastone-lab report",
                         "Regenerate docs/results.md and docs/figures/ from the MLflow store.")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow URI (default: $MLFLOW_TRACKING_URI or the repo's sqlite store)")
    ap.add_argument("--out", default=None, help="markdown file (default: docs/results.md)")
    ap.add_argument("--figures", default=None, help="figure folder (default: <out dir>/figures)")
    a = ap.parse_args(argv)
    out = Path(a.out) if a.out else repo_root() / "docs" / "results.md"
    build_report(a.tracking_uri, out, a.figures)
    print(f"wrote {out} and figures in {Path(a.figures) if a.figures else out.parent / 'figures'}")
    return 0
