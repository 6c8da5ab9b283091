"""Training checkpoints: atomic, complete-or-absent, safe to load.

Layout of ``<output_dir>/ckpt-<step>/``::

    adapter/                      LoRA adapter (peft ``save_pretrained``, safetensors)
    score_module.pt               SPRM head, reference layout (0.weight 0.bias 3.weight 3.bias)
    score_module.safetensors      the same tensors as safetensors
    prm_score_module.pt/.safetensors   separate_prm mode only: the external PRM's head
    optim-<name>.pt               one file per optimiser (policy, head, ...)
    rng-<rank>.pt                 python / numpy / torch (+cuda) RNG states of each rank
    state.json                    step, config fingerprint, trainer state; written LAST

A checkpoint is written into a hidden temp dir ``.ckpt-<step>.tmp-*`` which is
renamed to ``ckpt-<step>`` only when every file is on disk; then the
``latest`` pointer file is replaced atomically. A process killed at any point
leaves either the previous checkpoint (and pointer) or the new one, never a
half-written ``ckpt-*`` dir. Stale temp dirs are deleted by the next save.
Every ``torch.load`` uses ``weights_only=True``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import CheckpointError
from ..io_utils import atomic_write_text, is_no_space, storage_error

PREFIX = "ckpt-"
LATEST = "latest"
STATE = "state.json"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")

# Test hook: called with each file name right after it is written (inject crashes).
_AFTER_WRITE: Callable[[str], None] | None = None


def _written(name: str) -> None:
    if _AFTER_WRITE is not None:
        _AFTER_WRITE(name)


# --------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors/primitives (weights_only-safe)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {
        "python_version": int(py[0]), "python_state": torch.tensor(py[1], dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Mapping[str, Any]) -> None:
    random.setstate((st["python_version"], tuple(int(x) for x in st["python_state"].tolist()),
                     None))
    np.random.set_state(("MT19937", st["numpy_keys"].numpy().astype(np.uint32),
                         int(st["numpy_pos"]), int(st["numpy_has_gauss"]),
                         float(st["numpy_gauss"])))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# --------------------------------------------------------------------------- save

@dataclass
class CheckpointParts:
    """What the trainer hands to :func:`save_checkpoint`."""

    policy: Any                               # peft model (save_pretrained)
    head: torch.nn.Module | None
    optimizers: Mapping[str, torch.optim.Optimizer]
    state: dict[str, Any]                     # step, fingerprint, trainer state (JSON)
    rng_states: list[dict[str, Any]]          # one per rank
    prm_head: torch.nn.Module | None = None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale(out_dir: Path) -> None:
    """Delete temp dirs left by a crash during a checkpoint write."""
    for p in Path(out_dir).glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(out_dir: str | os.PathLike, step: int, parts: CheckpointParts,
                    keep: int = 3) -> Path:
    """Write ``ckpt-<step>`` atomically, update ``latest``, prune old checkpoints."""
    from ..sprm import save_score_module

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step}.tmp-", dir=out_dir))
    try:
        parts.policy.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        _written("adapter")
        if parts.head is not None:
            save_score_module(parts.head, tmp / "score_module.pt")
            _written("score_module.pt")
        if parts.prm_head is not None:
            save_score_module(parts.prm_head, tmp / "prm_score_module.pt")
            _written("prm_score_module.pt")
        for name, opt in parts.optimizers.items():
            torch.save(opt.state_dict(), tmp / f"optim-{name}.pt")
            _written(f"optim-{name}.pt")
        for rank, st in enumerate(parts.rng_states):
            torch.save(st, tmp / f"rng-{rank}.pt")
            _written(f"rng-{rank}.pt")
        state = dict(parts.state, step=int(step), optimizers=sorted(parts.optimizers),
                     world_size=len(parts.rng_states))
        (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        _written(STATE)
    except BaseException as e:
        if not is_no_space(e):
            raise  # a kill mid-write: the temp dir is cleaned by the next save
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            prev = find_resume_checkpoint(out_dir)
        except Exception:  # noqa: BLE001 - the disk error is the one to report
            prev = None
        raise storage_error(tmp.parent / f"{PREFIX}{step}", e, (
            f"Checkpoint {step} was not written; the latest complete one "
            f"({prev.name if prev else 'none'}) is unchanged and resumable.")) from e
    final = out_dir / f"{PREFIX}{step}"
    if final.exists():  # re-saving the same step (e.g. final == periodic): replace it
        old = out_dir / f".{PREFIX}{step}.tmp-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(out_dir)
    _written("rename")
    atomic_write_text(out_dir / LATEST, final.name + "\n")
    _written(LATEST)
    if keep > 0:
        for old_ckpt in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old_ckpt, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- find / load

def is_complete(ckpt: Path) -> bool:
    """A checkpoint dir is complete iff its ``state.json`` parses and every file it lists exists."""
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError):
        return False
    need = ["adapter"] + [f"optim-{n}.pt" for n in state.get("optimizers", [])]
    return all((ckpt / n).exists() for n in need)


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    out = []
    for p in Path(out_dir).glob(f"{PREFIX}*"):
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            out.append((int(m[1]), p))
    return [p for _, p in sorted(out)]


def find_resume_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``latest`` if complete, else the newest complete one."""
    out_dir = Path(out_dir)
    try:
        name = (out_dir / LATEST).read_text().strip()
        if name and is_complete(out_dir / name):
            cands = list_checkpoints(out_dir)
            # a newer complete checkpoint can exist if we died between rename and pointer
            if cands and _step_of(cands[-1]) > _step_of(out_dir / name):
                return cands[-1]
            return out_dir / name
    except OSError:
        pass
    cands = list_checkpoints(out_dir)
    return cands[-1] if cands else None


def _step_of(p: Path) -> int:
    m = _CKPT_RE.match(p.name)
    return int(m[1]) if m else -1


def read_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    ckpt = Path(ckpt)
    try:
        return json.loads((ckpt / STATE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {STATE}; the checkpoint is incomplete (written "
                              f"by a crashed run?). Resume from an earlier ckpt-* dir") from None
    except ValueError as e:
        raise CheckpointError(f"{ckpt / STATE}: corrupt JSON ({e}); use another checkpoint") from None


#: fingerprint fields written only when off their default (older checkpoints lack them)
OFF_DEFAULT_FINGERPRINT = ("head_inputs",)


def check_compatible(state: Mapping[str, Any], expected: Mapping[str, Any], ckpt: Path) -> None:
    """Raise CheckpointError naming both values of every field that differs."""
    have = state.get("fingerprint_fields", {})
    diffs = [f"{k}: checkpoint has {have.get(k)!r}, this run has {v!r}"
             for k, v in expected.items() if have.get(k) != v]
    # fields recorded only when they are not the default: absent from ``expected`` means
    # the default (only for a full fingerprint, i.e. when ``expected`` has the backbone)
    if "feature_layer" in expected:
        diffs += [f"{k}: checkpoint has {have[k]!r}, this run has the default"
                  for k in OFF_DEFAULT_FINGERPRINT if k in have and k not in expected]
    if diffs:
        raise CheckpointError(
            f"checkpoint {ckpt} is incompatible with this run ({'; '.join(diffs)}). Resume with "
            f"the config that wrote it, or start a new run in another output_dir")


def torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint; use an earlier one") from None
    except Exception as e:  # pickle payloads, truncated files
        raise CheckpointError(f"{path}: cannot be loaded safely (weights_only=True): {e}. "
                              f"The file is corrupt or not a plain tensor file") from None


def load_adapter_weights(policy: Any, adapter_dir: Path) -> None:
    """Load a saved LoRA adapter (safetensors) into the peft model ``policy``, strictly."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = adapter_dir / "adapter_model.safetensors"
    if not f.exists():
        raise CheckpointError(f"{f}: missing; the adapter was not saved as safetensors")
    sd = load_file(str(f))
    n_ours = sum(1 for k in policy.state_dict() if "lora_" in k)
    try:
        res = set_peft_model_state_dict(policy, sd)
    except RuntimeError as e:  # size mismatch
        raise CheckpointError(
            f"{f}: adapter shapes do not match this model ({str(e).splitlines()[-1].strip()}). "
            f"It was written for another base model or LoRA rank; use the matching backbone/lora_r"
        ) from None
    missing = [k for k in getattr(res, "missing_keys", []) if "lora_" in k]
    if missing or len(sd) != n_ours:
        raise CheckpointError(
            f"{f}: adapter does not match this model ({len(sd)} tensors saved, {n_ours} "
            f"LoRA tensors here; missing e.g. {missing[:2]}). It was written for another base "
            f"model or LoRA layout; use the matching backbone/lora_targets")
