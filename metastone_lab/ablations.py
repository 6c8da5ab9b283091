"""``make ablations``: run every ablation spec through the runner, then the report.

    python -m metastone_lab.ablations                 # the full study (78 min measured, 2 shared cores)
    python -m metastone_lab.ablations --micro         # every spec, tiny parameters (minutes)
    python -m metastone_lab.ablations --only ablate_loss --dry-run
    python -m metastone_lab.ablations --with-smollm2  # also the (slow) SmolLM2 segmentation spec
    python -m metastone_lab.ablations --only probe    # only the representation probe

Specs run in :data:`SPECS` order (``experiments/<name>.yaml``), then the
representation probe (:mod:`metastone_lab.probe`, step ``probe``). Each spec runs through
:func:`runner.run_spec` (one MLflow child run per point x seed). Points that
share a backbone, training and evaluation config reuse the scored trajectories
from the rollout cache (``cache_dir`` in the specs), so order matters: the
base configuration is computed once and read back by later specs.

Measured time: wall seconds per spec and in total, and the CPU seconds this
process and its notebook kernels used. ``cpu_share`` = CPU seconds / (wall x
cores) says how much of the machine the study got (1.0 = both cores, all the
time; lower = contention from other work). Written to
``<runs>/ablations_timing.json`` and logged as a run of MLflow experiment
``ablations`` (the report reads it from there).

``--micro`` rewrites each spec into a temporary one with tiny parameters
(:func:`micro_spec`): the ``micro`` backbone, 2 training steps, 4 test
problems, k <= 4, 2 seeds, micro-sized scaling-law backbones; SmolLM2 is
skipped. It is what the tests execute.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .ablation_specs import (OPTIONAL_SPECS, PROBE_STEP, SPECS, TIMING_EXPERIMENT,  # noqa: F401
                             repo_root, spec_path)
from .config import load_yaml
from .errors import ConfigError
from .io_utils import atomic_write_json
from . import cli_help

#: the probe at micro scale (what the tests execute)
MICRO_PROBE = {"n_train": 6, "n_test": 4, "k": 4, "max_new_tokens": 40}
#: the probe of the reported figures samples at top_p 0.95 (GenerateConfig's default when
#: they were measured; SamplingConfig's default is the study's 1.0): kept so they reproduce
PROBE_SAMPLING = {"top_p": 0.95}

MICRO_TRAIN = {"prompts_per_step": 2, "n": 4, "eval_every": 1, "eval_val_problems": 4,
               "eval_test_problems": 4, "eval_samples": 2}
#: (temperature: the micro backbone solves 1 in ~16 samples at T 0.8 and none at the
#: default testbed's 1.2, where every AUROC of a micro run would be undefined)
MICRO_PARAMS = {"backbone": "micro", "train_steps": 2, "n_test": 4, "n_val": 4, "val_k": 2,
                "max_new_tokens": 40, "temperature": 0.8}


def _micro_backbone_options(opts: dict) -> dict:
    """A micro-sized stand-in for a scaling-law size (keeps the size ordering)."""
    hidden = max(8, (int(opts.get("hidden_size", 128)) // 4) // 2 * 2)
    return {"hidden_size": hidden, "num_layers": 1, "num_heads": 2,
            "intermediate_size": 2 * hidden, "steps": 10, "eval_n": 4, "eval_k": 2}


def _micro_params(params: dict, cache_dir: str | None, base: bool) -> dict:
    """Tiny values for the base parameters (``base``) or for the keys a point sets."""
    out = dict(params)
    for k, v in MICRO_PARAMS.items():
        if base or k in out:
            out[k] = v
    if "k_max" in out:
        out["k_max"] = min(int(out["k_max"]), 4)
    if isinstance(out.get("train"), dict):
        out["train"] = {**out["train"], **MICRO_TRAIN}
    if out.get("backbone_options"):
        out["backbone_options"] = _micro_backbone_options(out["backbone_options"])
    if "cache_dir" in out and cache_dir is not None:
        out["cache_dir"] = cache_dir
    return out


def micro_spec(data: dict, cache_dir: str | None = None, max_seeds: int = 2) -> dict:
    """The micro version of a spec (a dict as loaded from YAML): tiny parameters
    on the ``micro`` backbone, at most 2 seeds, the same points and structure."""
    d = copy.deepcopy(data)
    d["parameters"] = _micro_params(d.get("parameters", {}), cache_dir, base=True)
    d["points"] = [_micro_params(p, cache_dir, base=False) if isinstance(p, dict) else p
                   for p in d.get("points", [])]
    d["seeds"] = list(d.get("seeds") or [0])[:max_seeds]
    nb = Path(d["notebook"])
    d["notebook"] = str(nb if nb.is_absolute() else (repo_root() / nb).resolve())
    return d


def _cpu_seconds() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def run_all(names: list[str], *, micro: bool = False, dry_run: bool = False,
            resume: bool = False, root: Path | None = None, runs_dir: Path | None = None,
            tracking_uri: str | None = None, progress: bool = True,
            overrides: list[str] = (), max_seeds: int = 2, log=print) -> dict[str, Any]:
    """Run the named specs in order; return ``{"specs": {name: {...}}, "total_wall_s",
    "cpu_share", "exit_code"}``. ``exit_code`` is the worst spec's runner code."""
    from . import runner, tracking

    root = Path(root) if root is not None else repo_root()
    runs_dir = Path(runs_dir) if runs_dir is not None else root / "runs"
    tmp = Path(tempfile.mkdtemp(prefix="ablations-micro-")) if micro else None
    cores = os.cpu_count() or 1
    load0 = os.getloadavg()[0]
    t_all, cpu_all = time.monotonic(), _cpu_seconds()
    out: dict[str, Any] = {"specs": {}, "micro": micro, "cores": cores}
    worst = 0
    for name in names:
        if name == PROBE_STEP:
            if dry_run:
                log(f"[ablations] {name}: would run the representation probe")
                continue
            t0, c0 = time.monotonic(), _cpu_seconds()
            rep = _run_probe(micro, tracking_uri or tracking.resolve_tracking_uri(root), log)
            wall, cpu = time.monotonic() - t0, _cpu_seconds() - c0
            out["specs"][name] = {"points": 1, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                                  "exit_code": rep, "failed": [name] if rep else []}
            worst = max(worst, rep)
            log(f"[ablations] {name}: {wall:.1f} s wall, {cpu:.1f} s CPU"
                + (", FAILED" if rep else ""))
            continue
        path = spec_path(name, root)
        if micro:
            data = micro_spec(load_yaml(path), cache_dir=str(runs_dir / "_rollout_cache_micro"),
                              max_seeds=max_seeds)
            path = tmp / f"{name}.yaml"
            import yaml

            path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        t0, c0 = time.monotonic(), _cpu_seconds()
        rep = runner.run_spec(path, overrides=list(overrides), dry_run=dry_run, resume=resume,
                              root=root, runs_dir=runs_dir, tracking_uri=tracking_uri,
                              progress=progress)
        wall, cpu = time.monotonic() - t0, _cpu_seconds() - c0
        pts = rep.get("points", {})
        rec = {"points": len(pts), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
               "exit_code": rep["exit_code"],
               "failed": sorted(k for k, r in pts.items()
                                if isinstance(r, dict) and r.get("status") == "failed")}
        out["specs"][name] = rec
        worst = max(worst, rep["exit_code"])
        log(f"[ablations] {name}: {rec['points']} points, {wall:.1f} s wall, {cpu:.1f} s CPU"
            + (f", FAILED: {rec['failed']}" if rec["failed"] else ""))
    wall, cpu = time.monotonic() - t_all, _cpu_seconds() - cpu_all
    out.update(total_wall_s=round(wall, 1), total_cpu_s=round(cpu, 1),
               cpu_share=round(cpu / (wall * cores), 3) if wall > 0 else None,
               loadavg_start=round(load0, 2), loadavg_end=round(os.getloadavg()[0], 2),
               exit_code=worst, finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    log(f"[ablations] total: {wall:.1f} s wall ({wall / 60:.1f} min), {cpu:.1f} s CPU, "
        f"CPU share {out['cpu_share']} of {cores} cores (1.0 = no contention), "
        f"load average {out['loadavg_start']} -> {out['loadavg_end']}")
    if not dry_run:
        atomic_write_json(runs_dir / ("ablations_timing_micro.json" if micro
                                      else "ablations_timing.json"), out)
        uri = tracking_uri or tracking.resolve_tracking_uri(root)
        try:
            t = tracking.Tracker(uri)
            # "full" only when every default step ran: a partial run (--only) must not
            # stand in for the whole study's time in the report
            kind = "micro" if micro else ("full" if set(SPECS + [PROBE_STEP]) <= set(names)
                                          else "partial")
            with t.run(TIMING_EXPERIMENT, run_name=kind,
                       params={"specs": ",".join(names), "micro": micro, "cores": cores}):
                m = {"total_wall_s": wall, "total_cpu_s": cpu,
                     "cpu_share": out["cpu_share"] or 0.0, "loadavg_start": load0,
                     "loadavg_end": out["loadavg_end"]}
                m.update({f"wall_s.{n}": r["wall_s"] for n, r in out["specs"].items()})
                m.update({f"points.{n}": r["points"] for n, r in out["specs"].items()})
                t.log_metrics(m, step=0)
        except Exception as e:  # timing is informative; never fail the study on it
            log(f"[ablations] could not log the timing run to {uri}: {e}")
    return out


def _run_probe(micro: bool, tracking_uri: str, log) -> int:
    """The representation probe on the default backbone (micro: the micro one);
    returns 0, or 1 after logging the error (the other results stand)."""
    from . import probe

    try:
        if micro:
            probe.run_and_log("micro", probe.ProbeConfig(**MICRO_PROBE, **PROBE_SAMPLING),
                              tracking_uri=tracking_uri, log=lambda s: None)
        else:
            probe.run_and_log("tiny", probe.ProbeConfig(**PROBE_SAMPLING), tracking_uri=tracking_uri,
                              log=log)
        return 0
    except Exception as e:  # noqa: BLE001 - one failed step must not lose the others
        log(f"[ablations] probe FAILED: {type(e).__name__}: {e}")
        return 1


def cli_main(argv: list[str] | None = None) -> int:
    ap = cli_help.parser("python -m metastone_lab.ablations", cli_help.first_paragraph(__doc__))
    ap.add_argument("--micro", action="store_true", help="tiny parameters (tests, smoke runs)")
    ap.add_argument("--only", action="append", default=[], metavar="SPEC",
                    help="run only this spec (repeatable), e.g. ablate_loss")
    ap.add_argument("--with-smollm2", action="store_true",
                    help="also run the SmolLM2 segmentation spec (slow on CPU)")
    ap.add_argument("--dry-run", action="store_true", help="list every point, run nothing")
    ap.add_argument("--resume", action="store_true", help="skip points FINISHED in MLflow")
    ap.add_argument("--no-report", action="store_true", help="do not regenerate the report")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a base parameter in every spec")
    ap.add_argument("--runs-dir", default=None, help="output folder (default: <repo>/runs)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlruns.db)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    a = ap.parse_args(argv)
    names = a.only or SPECS + (OPTIONAL_SPECS if a.with_smollm2 else []) + [PROBE_STEP]
    if a.micro:
        names = [n for n in names if n not in OPTIONAL_SPECS]
    known = SPECS + OPTIONAL_SPECS + [PROBE_STEP]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--only {unknown}: unknown ablation spec; choose from "
                          f"{', '.join(known)}")
    res = run_all(names, micro=a.micro, dry_run=a.dry_run, resume=a.resume,
                  runs_dir=Path(a.runs_dir) if a.runs_dir else None,
                  tracking_uri=a.tracking_uri, progress=not a.no_progress,
                  overrides=a.overrides)
    if not a.dry_run and not a.no_report:
        from . import report

        args = ["--tracking-uri", a.tracking_uri] if a.tracking_uri else []
        if a.micro:
            args += ["--out", str(Path(a.runs_dir or repo_root() / "runs") / "micro_report" /
                                  "results.md")]
        report.cli_main(args)
    print(json.dumps({k: v for k, v in res.items()}, default=str))
    return res["exit_code"]


if __name__ == "__main__":  # pragma: no cover
    from .errors import MetastoneError

    try:
        sys.exit(cli_main())
    except MetastoneError as e:
        print(f"metastone_lab.ablations: error: {e}", file=sys.stderr)
        sys.exit(2)
