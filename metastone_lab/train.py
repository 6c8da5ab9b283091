"""``metastone-lab train``: reflective training from a YAML config.

Public names (architecture contract): :class:`TrainConfig`, :func:`train`
(-> :class:`TrainResult`), :func:`cli_main`. The implementation lives in
:mod:`metastone_lab.training`.

Usage::

    metastone-lab train --config experiments/train.yaml [--set steps=50 ...] [--resume | --fresh]

``--resume`` continues the last complete checkpoint in ``output_dir`` only if it was
written by the same config (every field but the bookkeeping ones; ``steps`` may
grow); otherwise it stops with a ConfigError naming the differing keys. ``--fresh``
starts over, moving the existing checkpoints to ``output_dir/superseded-<time>/``.
    python -m metastone_lab.train --config cfg.yaml
    accelerate launch --multi_gpu --num_processes 2 -m metastone_lab.train --config cfg.yaml

(on a CUDA-less machine ``--multi_gpu`` gives 2 gloo CPU ranks; accelerate's
``--cpu --num_processes 2`` starts one process unless mpirun is set up, see
experiments/accelerate/README.md)
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import cli_help
from .config import from_dict, load_yaml, parse_override
from .training.config import TrainConfig
from .training.trainer import TrainResult, Trainer, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train", "cli_main", "load_config"]


def load_config(path: str | None, overrides: list[str] = (), resume: bool = False,
                fresh: bool = False) -> TrainConfig:
    data: dict[str, Any] = load_yaml(path) if path else {}
    for item in overrides:
        k, v = parse_override(item)
        data[k] = v
    if resume:
        data["resume"] = True
    if fresh:
        data["fresh"] = True
    return from_dict(TrainConfig, data)


def cli_main(argv: list[str] | None = None) -> int:
    ap = cli_help.parser("metastone-lab train", cli_help.first_paragraph(__doc__))
    ap.add_argument("--config", help="YAML file with TrainConfig keys (default: TrainConfig's defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the last complete checkpoint in output_dir (refused "
                         "unless it was written by the same config)")
    ap.add_argument("--fresh", action="store_true",
                    help="start over; existing checkpoints move to output_dir/superseded-*/")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set, args.resume, args.fresh)
    res = train(cfg)
    summary = {"output_dir": str(res.output_dir), "steps_done": res.steps_done,
               "start_step": res.start_step, "aha_onset_step": res.aha_onset_step,
               "checkpoint": str(res.checkpoint) if res.checkpoint else None,
               "param_counts": res.param_counts,
               "last": {k: v for k, v in res.last_metrics.items() if isinstance(v, (int, float))}}
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .errors import MetastoneError

    try:
        sys.exit(cli_main())
    except MetastoneError as e:
        print(f"metastone-lab train: error: {e}", file=sys.stderr)
        sys.exit(2)
