"""The SPRM head and the reflective model (one backbone = policy + step scorer).

Shapes: B batch, L sequence length, C backbone hidden size, V vocabulary.

- :class:`SPRMHead` ``Linear(C, m*C) -> ReLU -> Dropout(p) -> Linear(m*C, 1)`` as an
  ``nn.Sequential`` whose state dict has the reference ``score_module.pt`` keys
  ``0.weight 0.bias 3.weight 3.bias``; ``forward(features (..., C)) -> logits (...)``.
- :func:`save_score_module` / :func:`load_score_module`: the reference ``.pt`` layout
  plus a ``.safetensors`` twin; loading is always ``weights_only=True``.
- :class:`ReflectiveModel` wraps any ``transformers`` causal LM (optionally a peft
  model), runs it ONCE with ``output_hidden_states=True`` and applies the head to
  ``hidden_states[feature_layer]`` with the backbone gradient scaled by ``grad_scale``
  (method.md §4: ``f*s + f.detach()*(1-s)``).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, ShapeError

HEAD_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")


class SPRMHead(nn.Sequential):
    """``Linear(C, round(width_mult*C)) -> ReLU -> Dropout(dropout) -> Linear(., 1)``.

    ``forward(features (..., C)) -> logits (...)`` (the trailing 1 is squeezed); the
    step score is ``sigmoid(logit)``. Parameter count at width_mult=2: ``2C^2+4C+1``.
    """

    def __init__(self, hidden_size: int, width_mult: float = 2.0, dropout: float = 0.5):
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size < 1:
            raise ConfigError(f"SPRMHead: hidden_size must be a positive int, got {hidden_size!r}")
        if not width_mult > 0:
            raise ConfigError(f"SPRMHead: width_mult must be > 0, got {width_mult!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"SPRMHead: dropout must be in [0, 1), got {dropout!r}")
        inner = max(1, int(round(hidden_size * width_mult)))
        super().__init__(
            nn.Linear(hidden_size, inner),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(inner, 1),
        )
        self.hidden_size = hidden_size
        self.inner_size = inner

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (..., C) -> (...)
        if features.shape[-1] != self.hidden_size:
            raise ShapeError(
                f"SPRMHead expects features of width {self.hidden_size}, got "
                f"{features.shape[-1]} (shape {tuple(features.shape)}); build the head with "
                f"hidden_size={features.shape[-1]} or feed the matching backbone layer"
            )
        return super().forward(features).squeeze(-1)


# --------------------------------------------------------------------------- files

def _n_confidence() -> int:
    from .confidence import N_CONFIDENCE

    return N_CONFIDENCE


def _twin(path: Path) -> tuple[Path, Path]:
    """(pt_path, safetensors_path) for ``path`` (either suffix accepted)."""
    if path.suffix == ".safetensors":
        return path.with_suffix(".pt"), path
    return path, path.with_suffix(".safetensors")


def save_score_module(head: nn.Module, path: str | Path) -> Path:
    """Write ``head``'s state dict to ``path`` (reference ``score_module.pt`` layout,
    ``torch.save`` of an ``nn.Sequential`` state dict) and ``path.with_suffix('.safetensors')``.

    Both writes are atomic. Returns the ``.pt`` path.
    """
    from safetensors.torch import save_file

    from .io_utils import atomic_path

    pt_path, st_path = _twin(Path(path))
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in head.state_dict().items()}
    with atomic_path(pt_path) as tmp:
        torch.save(state, tmp)
    with atomic_path(st_path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "layout": "metastone-sprm-head"})
    return pt_path


def _read_state(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"SPRM head file {str(path)!r} does not exist; pass the score_module.pt "
            f"(or .safetensors) written next to the checkpoint"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file holds arbitrary pickled objects, not just "
            f"tensors (torch.load weights_only=True rejected it: {str(e).splitlines()[0]}). "
            f"Re-save only the state dict: torch.save(head.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch file ({e})") from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: expected a state dict (mapping of tensor names to tensors) with keys "
            f"{list(HEAD_KEYS)}, got {type(obj).__name__}"
        )
    return obj


def load_score_module(path: str | Path, hidden_size: int, **head_kwargs: Any) -> SPRMHead:
    """Load an SPRM head from ``score_module.pt`` (reference layout) or ``.safetensors``.

    ``torch.load(weights_only=True)``: a pickle payload is refused with CheckpointError.
    Wrong keys -> CheckpointError listing expected and found keys; a width that does not
    match ``hidden_size`` (or ``width_mult``) -> ShapeError naming both sizes.
    ``head_kwargs`` go to :class:`SPRMHead` (``width_mult``, ``dropout``). The head is
    returned in eval mode.
    """
    path = Path(path)
    state = dict(_read_state(path))
    found = sorted(state)
    if found != sorted(HEAD_KEYS):
        raise CheckpointError(
            f"{path}: unexpected SPRM head keys. Expected {list(HEAD_KEYS)} "
            f"(nn.Sequential Linear/ReLU/Dropout/Linear), found {found}. "
            f"Save only the head's state dict (save_score_module)."
        )
    w0, w3 = state["0.weight"], state["3.weight"]
    if w0.dim() != 2 or w3.dim() != 2 or w3.shape[0] != 1:
        raise ShapeError(
            f"{path}: malformed head weights: 0.weight {tuple(w0.shape)}, 3.weight {tuple(w3.shape)}"
        )
    if w0.shape[1] != hidden_size:
        raise ShapeError(
            f"{path}: the head was trained on inputs of width {w0.shape[1]} but this model's "
            f"head reads width {hidden_size}; load the head that belongs to this backbone (a "
            f"head_inputs='hidden+confidence' head is the hidden size + "
            f"{_n_confidence()} wide)"
        )
    if "width_mult" not in head_kwargs:
        head_kwargs["width_mult"] = w0.shape[0] / hidden_size
    head = SPRMHead(hidden_size, **head_kwargs)
    if head.inner_size != w0.shape[0]:
        raise ShapeError(
            f"{path}: the head's inner width is {w0.shape[0]} but width_mult="
            f"{head_kwargs['width_mult']} gives {head.inner_size}; drop width_mult or set it to "
            f"{w0.shape[0] / hidden_size}"
        )
    head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return head.eval()


# --------------------------------------------------------------------------- model

@dataclass
class ReflectiveOutput:
    """``logits`` (B, L, V) LM logits; ``step_logits`` (B, L) the head at every position
    (read it where the step mask is True); ``features`` (B, L, C) the gradient-scaled
    features the head saw; ``past_key_values`` the backbone cache (or None)."""

    logits: torch.Tensor
    step_logits: torch.Tensor
    features: torch.Tensor
    past_key_values: Any = None

    @property
    def cache(self) -> Any:
        """Alias of ``past_key_values`` (the transformers 5 name)."""
        return self.past_key_values


def backbone_config(backbone: nn.Module) -> Any:
    """The (text) config of a transformers model, a peft wrapper or a DDP wrapper."""
    model = backbone
    for _ in range(4):
        cfg = getattr(model, "config", None)
        if cfg is not None and not isinstance(cfg, Mapping):
            break
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        else:
            break
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ConfigError(
            f"cannot find a transformers config on {type(backbone).__name__}; pass a "
            f"transformers causal LM (optionally peft-wrapped)"
        )
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def scale_grad(features: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """``f*s + f.detach()*(1-s)``: same values, gradient into ``f`` multiplied by ``s``.
    ``s=0`` is a plain detach, ``s=1`` the identity (both exact, no rounding)."""
    if grad_scale == 0.0:
        return features.detach()
    if grad_scale == 1.0:
        return features
    return features * grad_scale + features.detach() * (1.0 - grad_scale)


def _cache_of(out: Any) -> Any:
    """The KV cache of a transformers output (``cache`` in transformers>=5.2x, where
    ``past_key_values`` is a deprecated alias; ``past_key_values`` before)."""
    from .sampling import output_cache

    return output_cache(out)


class ReflectiveModel(nn.Module):
    """A causal LM plus an SPRM head reading one hidden layer, in one forward pass.

    Args:
        backbone: any ``transformers`` causal LM (or a peft model around one).
        head: an :class:`SPRMHead`; built from the backbone width when None.
        feature_layer: index into ``hidden_states`` (default -2, the penultimate layer;
            -1 is the final normed layer).
        grad_scale: backbone gradient scale through the features (1e-4 reference;
            0 = detach; 1 = full).
        head_inputs: ``"hidden"`` (the reference: the head reads the hidden state),
            ``"hidden+confidence"`` (a named deviation: the hidden state plus the
            policy's confidence in the step's tokens, :mod:`metastone_lab.confidence`;
            the head then needs the step mask, which training and the engine know) or
            ``"confidence"`` (the ablation without the hidden state).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | None = None,
        feature_layer: int = -2,
        grad_scale: float = 1e-4,
        head_width_mult: float = 2.0,
        head_dropout: float = 0.5,
        head_inputs: str = "hidden",
    ):
        super().__init__()
        from .confidence import HEAD_INPUTS, N_CONFIDENCE

        if head_inputs not in HEAD_INPUTS:
            raise ConfigError(f"ReflectiveModel: head_inputs={head_inputs!r}; choose one of "
                              f"{', '.join(HEAD_INPUTS)}")
        self.head_inputs = head_inputs
        if not 0.0 <= float(grad_scale) <= 1.0:
            raise ConfigError(f"ReflectiveModel: grad_scale must be in [0, 1], got {grad_scale!r}")
        self.backbone = backbone
        cfg = backbone_config(backbone)
        self._hidden_size = int(cfg.hidden_size)
        self._vocab_size = int(getattr(cfg, "vocab_size", 0) or 0)
        self._head_in = {"hidden": self._hidden_size, "confidence": N_CONFIDENCE,
                         "hidden+confidence": self._hidden_size + N_CONFIDENCE}[head_inputs]
        n_layers = getattr(cfg, "num_hidden_layers", None)
        if n_layers is not None and not -(n_layers + 1) <= feature_layer <= n_layers:
            raise ConfigError(
                f"ReflectiveModel: feature_layer={feature_layer} is out of range for a backbone "
                f"with {n_layers} layers (hidden_states has {n_layers + 1} entries); use -2 "
                f"(penultimate) or an index in [-{n_layers + 1}, {n_layers}]"
            )
        if head is None:
            head = SPRMHead(self._head_in, width_mult=head_width_mult, dropout=head_dropout)
            ref = next(iter(backbone.parameters()), None)
            if ref is not None:
                head = head.to(device=ref.device)
        head_in = getattr(head, "hidden_size", None)
        if head_in is None and isinstance(head, nn.Sequential) and isinstance(head[0], nn.Linear):
            head_in = head[0].in_features
        if head_in is not None and head_in != self._head_in:
            raise ShapeError(
                f"SPRM head width {head_in} does not match the head input size "
                f"{self._head_in} (backbone hidden size {self._hidden_size}, head_inputs="
                f"{head_inputs!r}); build/load the head with hidden_size={self._head_in}"
            )
        self.head = head
        self.feature_layer = feature_layer
        self.grad_scale = float(grad_scale)

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def uses_confidence(self) -> bool:
        """True when the head reads the policy-confidence features (with or without
        the hidden state)."""
        return self.head_inputs != "hidden"

    @property
    def head_input_size(self) -> int:
        """Width of the head's input: C, C + ``confidence.N_CONFIDENCE``, or N_CONFIDENCE."""
        return self._head_in

    def masked_head_logits(self, features: torch.Tensor, mask: torch.Tensor, *,
                           logits: torch.Tensor | None = None,
                           input_ids: torch.Tensor | None = None,
                           stats: torch.Tensor | None = None,
                           response_start: torch.Tensor | int = 0,
                           lookahead: int = 0) -> torch.Tensor:
        """Head logits (N,) at the N positions where ``mask`` (B, L) is True.

        ``features`` (B, L, C) (already gradient-scaled); the rest as in
        :meth:`step_head_logits`, which this calls on ``features[mask]``."""
        return self.step_head_logits(features[mask], mask, logits=logits, input_ids=input_ids,
                                     stats=stats, response_start=response_start,
                                     lookahead=lookahead)

    def step_head_logits(self, picked: torch.Tensor, mask: torch.Tensor, *,
                         logits: torch.Tensor | None = None,
                         input_ids: torch.Tensor | None = None,
                         stats: torch.Tensor | None = None,
                         response_start: torch.Tensor | int = 0,
                         lookahead: int = 0) -> torch.Tensor:
        """Head logits (N,) of the N step rows ``picked`` (N, C) = features at ``mask``
        (B, L). With the confidence head the step's token stats come from ``stats``
        (3, B, L) (recorded by the decoder) or are computed from the LM ``logits``
        (B, L, V) of ``input_ids`` (B, L); they are read from ``response_start`` (B,) or
        int on, each step through ``lookahead`` tokens after its read position
        (``confidence.lookahead(read_at)``; see :mod:`metastone_lab.confidence`). The
        reference head ignores them."""
        if self.uses_confidence:
            from .confidence import stats_from_logits, step_features

            if stats is None:
                if logits is None or input_ids is None:
                    raise ConfigError("the hidden+confidence head needs the LM logits and "
                                      "input_ids (or the decoder's token stats)")
                stats = stats_from_logits(logits, input_ids)
            conf = step_features(stats, mask, response_start, self._vocab_size, lookahead)
            conf = conf.to(device=picked.device, dtype=picked.dtype)
            picked = conf if self.head_inputs == "confidence" else torch.cat([picked, conf], -1)
        return self.head_logits(picked)

    @property
    def config(self) -> Any:
        return backbone_config(self.backbone)

    def features_from_hidden(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Pick ``hidden_states[feature_layer]`` (B, L, C) and apply the gradient scale."""
        try:
            f = hidden_states[self.feature_layer]
        except IndexError:
            raise ShapeError(
                f"feature_layer={self.feature_layer} but the backbone returned "
                f"{len(hidden_states)} hidden states"
            ) from None
        if f.shape[-1] != self._hidden_size:
            raise ShapeError(
                f"hidden state width {f.shape[-1]} != backbone hidden size {self._hidden_size}"
            )
        return scale_grad(f, self.grad_scale)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Head on features (..., C) -> logits (...), cast to the head's dtype then float32."""
        p = next(iter(self.head.parameters()), None)
        if p is not None and features.dtype != p.dtype:
            features = features.to(p.dtype)
        return self.head(features).float()

    def head_logits_from_hidden(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Step logits (B, L) from a backbone ``hidden_states`` tuple (generation engine)."""
        return self.head_logits(self.features_from_hidden(hidden_states))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                step_mask: torch.Tensor | None = None,
                response_start: torch.Tensor | int = 0, lookahead: int = 0,
                **kw: Any) -> ReflectiveOutput:
        """Run the backbone once; ``input_ids`` (B, L) -> :class:`ReflectiveOutput`.

        ``step_mask`` (B, L) bool: when given, ``step_logits`` holds the head only at its
        True positions (0 elsewhere). The confidence head requires it (its features
        are per step); ``response_start`` then says where each response begins and
        ``lookahead`` how far past its read position a step runs
        (``confidence.lookahead(read_at)``)."""
        if input_ids.dim() != 2:
            raise ShapeError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ShapeError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        kw.pop("output_hidden_states", None)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=True, **kw)
        features = self.features_from_hidden(out.hidden_states)
        if step_mask is None and self.uses_confidence:
            raise ConfigError("ReflectiveModel(head_inputs='hidden+confidence') scores steps, "
                              "not every position: pass step_mask= (and response_start=)")
        if step_mask is None:
            step_logits = self.head_logits(features)
        else:
            mask = step_mask.bool()
            picked = self.masked_head_logits(features, mask, logits=out.logits,
                                             input_ids=input_ids, response_start=response_start,
                                             lookahead=lookahead)
            step_logits = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
            step_logits = step_logits.masked_scatter(mask, picked)
        return ReflectiveOutput(
            logits=out.logits,
            step_logits=step_logits,
            features=features,
            past_key_values=_cache_of(out),
        )


__all__ = [
    "HEAD_KEYS", "SPRMHead", "save_score_module", "load_score_module", "ReflectiveOutput",
    "ReflectiveModel", "backbone_config", "scale_grad",
]
