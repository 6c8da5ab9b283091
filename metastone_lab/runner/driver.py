"""``metastone-lab run``: the driver (:func:`run_spec`) and its command line
(:func:`cli_main`). See the package docstring for the spec, the output layout and
the notebook contract."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from .. import cli_help, tracking
from .layout import read_json
from .points import (Point, differing_params, expand_points, flat_params, param_text,
                     select_points, validate_points)
from .spec import available_specs, find_root, load_spec, resolve_spec_path
from .sweep import Sweep
from .table import summary_table, terminal_table


def run_spec(spec_path: str | Path, *, overrides: list[str] = (), only: list[str] = (),
             dry_run: bool = False, resume: bool = False, fail_fast: bool = False,
             root: str | Path | None = None, runs_dir: str | Path | None = None,
             tracking_uri: str | None = None, progress: bool = True,
             on_point_done: Callable[[Point, dict], None] | None = None) -> dict:
    """Run a spec (the body of ``metastone-lab run``); return a report dict with
    ``exit_code``, ``points`` (results by name), ``table`` (DataFrame) and
    ``summary`` (what runs/<spec>/summary.json holds)."""
    spec_path = resolve_spec_path(spec_path, root)
    spec, notebook = load_spec(spec_path, list(overrides), root)
    root = Path(root).resolve() if root is not None else find_root(spec_path)
    runs_dir = Path(runs_dir) if runs_dir is not None else root / "runs"
    all_points = expand_points(spec)
    points = select_points(all_points, list(only))
    declared = validate_points(points, notebook)
    if dry_run:
        import pandas as pd

        differ = differing_params(all_points)
        df = pd.DataFrame([{"index": p.index, "point": p.name,
                            **{k: param_text(flat_params(p.params).get(k, "-")) for k in differ}}
                           for p in points])
        print(f"spec {spec.name!r}: {len(points)} of {len(all_points)} points, "
              f"notebook {notebook}")
        if spec.description:
            print(f"  {spec.description}")
        same = {k: v for k, v in flat_params(all_points[0].params).items()
                if k not in differ} if all_points else {}
        print("  the same in every point: "
              + ", ".join(f"{k}={param_text(v)}" for k, v in same.items()))
        print(df.to_string(index=False))
        return {"exit_code": 0, "points": {p.name: p for p in points}, "table": df,
                "summary": None}
    uri = tracking_uri or tracking.resolve_tracking_uri(root)
    sweep = Sweep(spec, notebook, root, runs_dir, uri, declared, resume)
    sweep.differing = differing_params(all_points)
    sweep.n_points = len(all_points)
    sweep.out.mkdir(parents=True, exist_ok=True)
    sweep.start()
    done = sweep.finished_points() if resume else {}
    from tqdm.auto import tqdm

    bar = tqdm(points, desc=spec.name, unit="point", disable=not progress, file=sys.stderr)
    sweep.bar = bar
    for p in bar:
        bar.set_postfix_str(p.name)
        unlogged = sweep.unlogged_path(p)
        result = None
        if resume and unlogged.is_file():
            result = sweep.log_from_disk(p, read_json(unlogged) or {})
        if result is None and resume and p.params_hash in done.get(p.name, ()):
            result = sweep.skipped(p)
        if result is None:
            result = sweep.execute(p)
        sweep.results[p.name] = result
        if on_point_done is not None:
            on_point_done(p, result)
        if result["status"] == "failed":
            print(f"point {p.name} FAILED; notebook kept at {result.get('notebook')}",
                  file=sys.stderr)
            if fail_fast:
                break
    bar.close()
    agg = sweep.finish(all_points)
    df = summary_table(spec, points, sweep.results, agg["summaries"], agg["mean"])
    print(terminal_table(df))
    print(sweep.where(points))
    failed = any(r["status"] == "failed" for r in sweep.results.values())
    unlogged_any = any(not r.get("logged", True) for r in sweep.results.values())
    if unlogged_any:
        print(f"some points could not be logged to {uri}; they are marked "
              f"{sweep.out}/<point>.unlogged.json. Re-run with --resume when the store is back.",
              file=sys.stderr)
    code = 1 if failed else (3 if unlogged_any else 0)
    return {"exit_code": code, "points": sweep.results, "table": df,
            "summary": read_json(sweep.out / "summary.json"), "parent_run_id": sweep.parent_id}


def cli_main(argv: list[str] | None = None) -> int:
    ap = cli_help.parser(
        "metastone-lab run",
        "Run an experiment spec: every grid point of the notebook with papermill, "
        "each in a child MLflow run under one parent run.",
        epilog="specs in this checkout: " + (", ".join(available_specs()) or "none found"))
    ap.add_argument("spec", help="experiments/<name>.yaml, or just <name>")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a base parameter (YAML value); on a grid key, pin that axis")
    ap.add_argument("--dry-run", action="store_true", help="list the points, run nothing")
    ap.add_argument("--only", action="append", default=[], metavar="NAME_OR_INDEX",
                    help="run only this point (repeatable)")
    ap.add_argument("--resume", action="store_true",
                    help="skip points FINISHED in MLflow; log points finished offline")
    ap.add_argument("--fail-fast", action="store_true", help="stop at the first failing point")
    ap.add_argument("--runs-dir", default=None, help="output folder (default: <root>/runs)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///<root>/mlruns.db)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = ap.parse_args(argv)
    report = run_spec(a.spec, overrides=a.overrides, only=a.only, dry_run=a.dry_run,
                      resume=a.resume, fail_fast=a.fail_fast, runs_dir=a.runs_dir,
                      tracking_uri=a.tracking_uri, progress=not a.no_progress)
    return report["exit_code"]
