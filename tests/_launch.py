"""The ``accelerate`` CLI for the tests that launch real processes (2 CPU ranks)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


def accelerate_cli() -> list[str]:
    """``[path to accelerate]`` beside this interpreter, else on PATH; skips the test
    with the reason when the CLI is not installed."""
    exe = Path(sys.executable).with_name("accelerate")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("accelerate")
    if not found:
        pytest.skip("the accelerate CLI is not installed")
    return [found]
