"""Float tolerances derived from the arithmetic, not tuned to one machine.

The bound used everywhere (Higham, *Accuracy and Stability of Numerical
Algorithms*, §3.1): a float computation in which each result accumulates at
most ``n`` rounded operations (e.g. a dot product of ``n`` terms) has error

    |fl(x) - x| <= gamma_n * S,   gamma_n = n*u / (1 - n*u) <= n * eps   (n*u <= 1/2)

with ``u = eps/2`` the unit roundoff and ``S`` the magnitude of the terms
(``sum |terms|``). Two float computations of the same exact value that differ
only in rounding (another reduction order, another kernel, a KV cache instead
of a full forward, a gradient multiplied by a constant before rather than after
a backward pass) are then within ``2 * n * eps * S`` of each other.

Elementwise *relative* tests (``rtol`` alone) are not covered by this bound:
an element that is small by cancellation has a rounding error relative to the
terms' magnitude, not to its own. So the helpers compare against ``S``, for
which the tests use the largest magnitude of the compared tensor unless they
say otherwise (every element of a gradient, logit or loss vector is a sum of
terms of the same layers, hence of comparable magnitude).

Whatever the CPU (vector width, FMA, thread count, BLAS kernel) the bound holds;
only how far below it a given machine lands changes.
"""
from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps   # 2**-23
EPS64 = torch.finfo(torch.float64).eps   # 2**-52


def rounding_bound(n_terms: int, scale: float, eps: float = EPS32, computations: int = 2) -> float:
    """``computations * n_terms * eps * scale``: the most that ``computations``
    independently rounded evaluations of the same value (each accumulating at most
    ``n_terms`` rounded operations on terms of magnitude ``scale``) can disagree."""
    return float(computations * n_terms * eps * scale)


def max_abs(t: torch.Tensor) -> float:
    return float(t.detach().abs().max())


def assert_within_rounding(got: torch.Tensor, want: torch.Tensor, n_terms: int, *,
                           eps: float = EPS32, scale: float | None = None, what: str = "") -> None:
    """``|got - want| <= rounding_bound(n_terms, scale)`` elementwise; ``scale``
    defaults to ``max |want|`` (see the module docstring)."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max_abs(want) if scale is None else scale
    bound = rounding_bound(n_terms, scale, eps)
    dev = float((got - want).abs().max())
    assert dev <= bound, (f"{what}: max |difference| {dev:.3g} exceeds the rounding bound "
                          f"{bound:.3g} (2 x {n_terms} terms x eps {eps:.3g} x scale {scale:.3g})")


def exceeds_rounding(got: torch.Tensor, want: torch.Tensor, n_terms: int, *,
                     eps: float = EPS32) -> bool:
    """True when the two differ by more than rounding could explain."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max()) > rounding_bound(n_terms, max_abs(want), eps)


# ------------------------------------------------------------------ term counts
def llama_layer_terms(config, seq_len: int) -> int:
    """Rounded operations accumulated into one output element of one Llama decoder
    layer, forward or backward; an upper bound, every reduction on the path counted
    at its full length: two RMSNorms (C each), the q/k/v projections (C), rotary
    (2), q.k over head_dim, softmax and attn@V over the sequence (seq_len each),
    o_proj (C), the gate/up projections (C), act*up (1), the down projection
    (intermediate size), two residual adds, and in the backward pass the sums of
    the gradients of branches sharing an input (q/k/v: 2, gate/up: 1)."""
    C, I = config.hidden_size, config.intermediate_size
    d = C // config.num_attention_heads
    return 2 * C + C + 2 + d + 2 * seq_len + C + C + 1 + I + 2 + 3


def llama_terms(config, seq_len: int, layers: int | None = None) -> int:
    """``layers`` decoder layers (default all) plus the final RMSNorm and the LM head
    (C each): what one logit accumulates."""
    layers = config.num_hidden_layers if layers is None else layers
    return layers * llama_layer_terms(config, seq_len) + 2 * config.hidden_size


def head_terms(hidden_size: int, width: int) -> int:
    """One SPRM head logit (or its input gradient): Linear(C -> width), ReLU,
    Linear(width -> 1): C + width accumulated terms, +2 for the biases."""
    return hidden_size + width + 2
