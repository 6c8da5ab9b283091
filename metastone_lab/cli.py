"""The ``metastone-lab`` command. Heavy modules are imported lazily so that
``metastone-lab --help`` answers instantly.

Each subcommand lives with the code it drives, as a ``cli_main(argv) -> int``
function; this module only dispatches.
"""
from __future__ import annotations

import importlib
import sys

# command words -> (module, function, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("backbone", "build"): ("metastone_lab.backbones.build", "cli_main",
                            "train the tiny default backbone into the cache"),
    ("run",): ("metastone_lab.runner", "cli_main",
               "run an experiment spec (experiments/*.yaml) with papermill"),
    ("train",): ("metastone_lab.train", "cli_main",
                 "train the reflective model from a YAML config"),
    ("bench", "train"): ("metastone_lab.bench", "cli_train",
                         "benchmark a joint step vs a policy-only step"),
    ("bench", "inference"): ("metastone_lab.bench", "cli_inference",
                             "benchmark best-of-N generation with in-flight scoring"),
    ("bench", "engine"): ("metastone_lab.bench_engine", "cli_engine",
                          "benchmark the batched best-of-N engine (problems per batch)"),
    ("probe",): ("metastone_lab.probe", "cli_main",
                 "probe which hidden layers encode step correctness (oracle labels)"),
    ("report",): ("metastone_lab.report", "cli_main",
                  "regenerate docs/results.md from the MLflow store"),
}


def _usage() -> str:
    lines = ["usage: metastone-lab <command> [options]", "", "commands:"]
    for words, (_, _, help_) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<20} {help_}")
    lines.append("")
    lines.append("Run 'metastone-lab <command> --help' for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            module, func, _ = COMMANDS[key]
            fn = getattr(importlib.import_module(module), func)
            from .errors import MetastoneError

            try:
                return int(fn(argv[n:]) or 0)
            except MetastoneError as e:
                print(f"metastone-lab: error: {e}", file=sys.stderr)
                return 2
    print(f"metastone-lab: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
