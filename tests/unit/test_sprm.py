"""SPRM head files, the reflective model (one forward), feature gradient scaling."""
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tolerance import (  # noqa: E402
    assert_within_rounding, exceeds_rounding, head_terms, llama_layer_terms as _layer_terms,
)

from metastone_lab.errors import CheckpointError, ConfigError, ShapeError
from metastone_lab.sprm import (
    HEAD_KEYS, ReflectiveModel, ReflectiveOutput, SPRMHead, load_score_module,
    save_score_module, scale_grad,
)

C = 32


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=C, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _head_terms(width: int) -> int:
    return head_terms(C, width)


# ------------------------------------------------------------------- head


def test_head_layout_and_param_count():
    head = SPRMHead(C)
    assert tuple(head.state_dict()) == HEAD_KEYS
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert sum(p.numel() for p in head.parameters()) == 2 * C * C + 4 * C + 1
    assert head[2].p == 0.5
    assert head(torch.randn(3, 5, C)).shape == (3, 5)
    h3 = SPRMHead(C, width_mult=3.0, dropout=0.1)
    assert h3[0].out_features == 3 * C and h3[2].p == 0.1
    with pytest.raises(ShapeError, match="16"):
        head(torch.randn(2, 16))
    with pytest.raises(ConfigError):
        SPRMHead(C, dropout=1.0)


def test_round_trip_pt_and_safetensors(tmp_path):
    torch.manual_seed(1)
    head = SPRMHead(C).eval()
    x = torch.randn(4, C)
    path = save_score_module(head, tmp_path / "score_module.pt")
    assert path.is_file() and (tmp_path / "score_module.safetensors").is_file()
    for p in (path, tmp_path / "score_module.safetensors"):
        loaded = load_score_module(p, C)
        assert not loaded.training
        assert torch.equal(loaded(x), head(x))
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp file


def test_loads_exact_reference_format(tmp_path):
    torch.manual_seed(2)
    ref = nn.Sequential(nn.Linear(C, 2 * C), nn.ReLU(), nn.Dropout(p=0.5), nn.Linear(2 * C, 1))
    torch.save(ref.state_dict(), tmp_path / "score_module.pt")
    head = load_score_module(tmp_path / "score_module.pt", C)
    x = torch.randn(3, C)
    # same weights, same ops: equal up to the head's own rounding (tests/_tolerance.py)
    assert_within_rounding(head(x), ref.eval()(x).squeeze(-1), _head_terms(2 * C))
    # and ours loads into the reference module
    save_score_module(head, tmp_path / "ours.pt")
    ref2 = nn.Sequential(nn.Linear(C, 2 * C), nn.ReLU(), nn.Dropout(p=0.5), nn.Linear(2 * C, 1))
    ref2.load_state_dict(torch.load(tmp_path / "ours.pt", weights_only=True))
    assert_within_rounding(ref2.eval()(x).squeeze(-1), head(x), _head_terms(2 * C))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_payload_refused(tmp_path):
    bad = tmp_path / "score_module.pt"
    torch.save({"0.weight": torch.zeros(2 * C, C), "x": Evil()}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_score_module(bad, C)
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        load_score_module(bad, C)


def test_wrong_keys_and_widths(tmp_path):
    p = tmp_path / "h.pt"
    torch.save({"weight": torch.zeros(1, C)}, p)
    with pytest.raises(CheckpointError) as e:
        load_score_module(p, C)
    assert "0.weight" in str(e.value) and "'weight'" in str(e.value)
    save_score_module(SPRMHead(48), p)
    with pytest.raises(ShapeError, match=r"48.*32"):
        load_score_module(p, C)
    save_score_module(SPRMHead(C, width_mult=3.0), p)
    assert load_score_module(p, C)[0].out_features == 3 * C  # width inferred from the file
    with pytest.raises(ShapeError, match="96"):
        load_score_module(p, C, width_mult=2.0)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_score_module(tmp_path / "missing.pt", C)


# ------------------------------------------------------------------- model


def test_forward_runs_backbone_once(llama):
    calls = []
    hook = llama.register_forward_hook(lambda *a: calls.append(1))
    try:
        rm = ReflectiveModel(llama)
        ids = torch.randint(0, 64, (2, 7))
        out = rm(ids, attention_mask=torch.ones_like(ids))
    finally:
        hook.remove()
    assert len(calls) == 1
    assert isinstance(out, ReflectiveOutput)
    assert out.logits.shape == (2, 7, 64) and out.step_logits.shape == (2, 7)
    assert out.features.shape == (2, 7, C)
    # features are hidden_states[-2]; step logits are the head on them
    with torch.no_grad():
        ref = llama(ids, output_hidden_states=True)
        # two forwards of the same layers (with / without an explicit attention mask):
        # equal up to the rounding of one decoder layer, then of the head on top
        # (bound: tests/_tolerance.py)
        n_layer = _layer_terms(llama.config, 7)
        assert_within_rounding(out.features, ref.hidden_states[-2], n_layer, what="features")
        rm.eval()
        out2 = rm(ids)
        n_logit = n_layer + _head_terms(2 * C)
        assert_within_rounding(out2.step_logits, rm.head(ref.hidden_states[-2]), n_logit,
                               what="step logits")
        assert_within_rounding(rm.head_logits_from_hidden(ref.hidden_states), out2.step_logits,
                               n_logit, what="head_logits_from_hidden")
    assert rm.hidden_size == C


def test_feature_layer_and_width_checks(llama):
    ids = torch.randint(0, 64, (1, 5))
    rm = ReflectiveModel(llama, feature_layer=-1).eval()
    with torch.no_grad():
        hs = llama(ids, output_hidden_states=True).hidden_states
        # hs[-1]: both decoder layers and the final RMSNorm (C) (bound: tests/_tolerance.py)
        n = 2 * _layer_terms(llama.config, 5) + C
        assert_within_rounding(rm(ids).features, hs[-1], n, what="last-layer features")
    with pytest.raises(ShapeError, match=r"48.*32"):
        ReflectiveModel(llama, head=SPRMHead(48))
    with pytest.raises(ConfigError, match="feature_layer"):
        ReflectiveModel(llama, feature_layer=7)
    with pytest.raises(ConfigError):
        ReflectiveModel(llama, grad_scale=2.0)


def test_peft_wrapped_backbone():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_llama(3), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rm = ReflectiveModel(pm)
    assert rm.hidden_size == C
    out = rm(torch.randint(0, 64, (2, 6)))
    assert out.step_logits.shape == (2, 6)
    out.step_logits.sum().backward()
    lora = [p for n, p in pm.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora and any(p.grad.abs().sum() > 0 for p in lora)


def _backbone_grads(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """d(sum of step logits)/d(embedding weights) and the head's first-layer grad."""
    model = tiny_llama(5)
    torch.manual_seed(6)
    head = SPRMHead(C, dropout=0.0)
    rm = ReflectiveModel(model, head=head, grad_scale=scale)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    rm(ids).step_logits.sum().backward()
    return model.model.embed_tokens.weight.grad.clone(), head[0].weight.grad.clone()


def test_gradient_scale_is_exactly_1e4():
    g_full, h_full = _backbone_grads(1.0)
    g_ref, h_ref = _backbone_grads(1e-4)
    assert g_full.abs().sum() > 0
    # The two backward passes differ only in rounding: g_ref = B(fl(1e-4 * v)) and
    # g_full * 1e-4 = fl(1e-4 * B(v)), with B the (linear) backward through the one
    # decoder layer under hidden_states[-2] and v the head's input gradient (the head's
    # input gradient does not depend on its input values, which differ by an ulp).
    # Bound: 2 x n x eps32 x max|g| (tests/_tolerance.py), n = the head's reduction,
    # one layer's reductions, and the two multiplications by 1e-4.
    cfg = tiny_llama(5).config
    n = _head_terms(2 * C) + _layer_terms(cfg, 6) + 2
    assert_within_rounding(g_ref, g_full * 1e-4, n, what="backbone gradient / 1e-4")
    # ...and a wrong factor is far outside that bound
    assert exceeds_rounding(g_ref, g_full * 2e-4, n)
    assert exceeds_rounding(g_ref, g_full * 0.5e-4, n)
    # The head learns at full rate: its weight gradient sums 6 positions of
    # (input x upstream grad); the input f*s + f.detach()*(1-s) is f up to 3
    # roundings (f*s, 1-s, f*(1-s), the sum: 4), so n = 6 + 4 + 1.
    assert_within_rounding(h_ref, h_full, 6 + 4 + 1, what="head gradient")


def test_grad_scale_zero_is_detach_and_values_unchanged():
    model = tiny_llama(5)
    rm = ReflectiveModel(model, head=SPRMHead(C, dropout=0.0), grad_scale=0.0)
    out = rm(torch.tensor([[1, 2, 3]]))
    out.step_logits.sum().backward()
    assert model.model.embed_tokens.weight.grad is None
    f = torch.randn(2, 3, requires_grad=True)
    y = scale_grad(f, 0.25)
    assert torch.equal(y, f)
    y.sum().backward()
    assert torch.equal(f.grad, torch.full_like(f, 0.25))  # 1 * 0.25 is exact in float32
