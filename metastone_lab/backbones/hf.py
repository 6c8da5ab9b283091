"""Any Hugging Face causal LM: a local directory or (with network) a hub id.

A ``score_module.pt`` next to the checkpoint (official MetaStone-S1 layout) is
reported in :func:`score_module_path`; loading it is :func:`metastone_lab.sprm.load_score_module`'s job.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()


def load_hf(spec: str, *, dtype=None, **kwargs):
    """``(model, tokenizer)`` via ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    A path-like ``spec`` that does not exist raises CheckpointError (it is not
    sent to the hub). Extra ``kwargs`` go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _looks_local(spec):
        p = Path(spec).expanduser()
        if not p.is_dir():
            raise CheckpointError(f"backbone path {spec!r} is not a directory; give a directory "
                                  f"with config.json and model weights, 'tiny', 'smollm2' or a hub id")
        if not (p / "config.json").is_file():
            raise CheckpointError(f"backbone directory {spec!r} has no config.json; save the model "
                                  f"with save_pretrained() there")
        spec = str(p)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except OSError as e:
        raise CheckpointError(f"cannot load backbone {spec!r}: {e}. For a hub id you need network "
                              f"access (or a local copy: pass its directory)") from None
    return model, tokenizer


def score_module_path(spec: str) -> Path | None:
    """``<spec>/score_module.pt`` if ``spec`` is a local dir holding one."""
    p = Path(spec).expanduser() / "score_module.pt"
    return p if p.is_file() else None
