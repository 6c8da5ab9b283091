"""Untrusted files (issue 7 §4).

* A grep-style scan of ``metastone_lab/``: every ``torch.load(`` call passes
  ``weights_only=True`` (comments and strings are skipped by tokenising the source),
  and nothing unpickles with ``pickle``/``dill``/``joblib``. The scanner is tested on
  synthetic snippets first, so a broken scanner cannot pass silently.
* Heads and adapters are saved as safetensors too (``save_score_module`` twin, the
  checkpoint's ``adapter/adapter_model.safetensors``) and round-trip exactly; every
  remaining ``.pt`` in a checkpoint loads with ``weights_only=True``.
A pickle payload being refused is case 26 of tests/integration/test_bad_inputs.py.
"""
from __future__ import annotations

import io
import tokenize
from pathlib import Path

import pytest
import torch

PKG = Path(__file__).resolve().parents[2] / "metastone_lab"


# ----------------------------------------------------------------------------- scanner

def _code_tokens(source: str) -> list[tokenize.TokenInfo]:
    skip = {tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
            tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}
    skip |= {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
             if hasattr(tokenize, n)}
    return [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in skip]


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    """(line, reason) for each ``torch.load(`` / ``torch.serialization.load(`` / bare
    ``load(`` imported from torch without ``weights_only=True``, and each use of an
    unpickler (``pickle.load(s)``, ``dill``, ``joblib.load``, ``weights_only=False``)."""
    toks = _code_tokens(source)
    s = [t.string for t in toks]
    torch_load_names = set()
    for i in range(len(s) - 3):       # from torch import load [as name]
        if s[i:i + 3] == ["from", "torch", "import"]:
            j = i + 3
            while j < len(s) and s[j] not in ("from", "import", "def", "class") and toks[j].start[0] == toks[i].start[0]:
                if s[j] == "load":
                    torch_load_names.add(s[j + 2] if j + 2 < len(s) and s[j + 1] == "as" else "load")
                j += 1
    found = []
    for i, t in enumerate(toks):
        start = None
        if s[i:i + 4] == ["torch", ".", "load", "("]:
            start = i + 3
        elif s[i:i + 6] == ["torch", ".", "serialization", ".", "load", "("]:
            start = i + 5
        elif s[i] in torch_load_names and i + 1 < len(s) and s[i + 1] == "(" and (i == 0 or s[i - 1] != "."):
            start = i + 1
        if start is not None:
            depth, j, args = 0, start, []
            while j < len(s):
                depth += {"(": 1, ")": -1}.get(s[j], 0)
                args.append(s[j])
                if depth == 0:
                    break
                j += 1
            text = " ".join(args)
            if "weights_only = True" not in text:
                found.append((t.start[0], "torch.load without weights_only=True"))
        if s[i:i + 3] in (["pickle", ".", "load"], ["pickle", ".", "loads"], ["dill", ".", "load"],
                          ["dill", ".", "loads"], ["joblib", ".", "load"], ["pickle", ".", "Unpickler"]):
            found.append((t.start[0], f"{s[i]}.{s[i + 2]} unpickles arbitrary objects"))
        if s[i:i + 3] == ["weights_only", "=", "False"]:
            found.append((t.start[0], "weights_only=False"))
    return found


@pytest.mark.parametrize("snippet", [
    "x = torch.load(p)",
    "x = torch.load(p, map_location='cpu')",
    "x = torch.load(\n    p,\n    map_location='cpu',\n)",
    "x = torch.load(p, weights_only=False)",
    "x = torch.load(p, weights_only=flag)",
    "x = torch.serialization.load(p)",
    "from torch import load\nx = load(p)",
    "from torch import load as tload\nx = tload(p, map_location='cpu')",
    "import pickle\nx = pickle.load(f)",
    "x = pickle.loads(b)",
    "x = joblib.load(p)",
    "x = torch.load(open(p, 'rb'), map_location=lambda s, l: s)",
])
def test_scanner_flags_unsafe_loads(snippet):
    assert unsafe_loads(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "x = torch.load(p, weights_only=True)",
    "x = torch.load(p, map_location='cpu', weights_only=True)",
    "x = torch.load(\n    p,\n    weights_only=True,\n)",
    "x = torch.load(f(p, q), weights_only=True)",
    "# torch.load(p) in a comment is fine",
    "s = 'torch.load(p) in a string is fine'",
    "s = f'hint: torch.load({p}) is not a call'",
    "def f():\n    '''Every torch.load(...) passes weights_only=True.'''",
    "x = safetensors.torch.load_file(p)",
    "x = json.load(f)",
    "from torch import nn\nx = load(p)",
])
def test_scanner_accepts_safe_code(snippet):
    assert unsafe_loads(snippet) == [], snippet


def test_no_bare_torch_load_in_the_library():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 20, files          # the scan really covers the package
    offenders = [f"{f.relative_to(PKG.parent)}:{line}: {why}"
                 for f in files for line, why in unsafe_loads(f.read_text(encoding="utf-8"))]
    assert not offenders, ("every torch.load must pass weights_only=True (and nothing may "
                           "unpickle): " + "; ".join(offenders))
    # and the library does load torch files somewhere (the scan is not vacuous)
    assert sum(f.read_text(encoding="utf-8").count("torch.load(") for f in files) >= 2


# ------------------------------------------------------------------ safetensors twins

def test_head_is_saved_as_safetensors_too(tmp_path):
    from safetensors import safe_open

    from metastone_lab.sprm import HEAD_KEYS, SPRMHead, load_score_module, save_score_module

    torch.manual_seed(0)
    head = SPRMHead(16)
    pt = save_score_module(head, tmp_path / "score_module.pt")
    st = tmp_path / "score_module.safetensors"
    assert pt.is_file() and st.is_file()
    with safe_open(str(st), framework="pt") as f:
        assert sorted(f.keys()) == sorted(HEAD_KEYS)
        for k, v in head.state_dict().items():
            assert torch.equal(f.get_tensor(k), v)
    from_st = load_score_module(st, hidden_size=16)
    from_pt = load_score_module(pt, hidden_size=16)
    x = torch.randn(3, 16)
    assert torch.equal(from_st(x), from_pt(x))
    assert torch.equal(from_st(x), head.eval()(x))  # same weights bit for bit, same ops
    # with the .pt gone (a consumer that only trusts safetensors) the head still loads
    pt.unlink()
    assert torch.equal(load_score_module(st, hidden_size=16)(x), from_pt(x))


def test_checkpoint_adapter_and_heads_are_safetensors(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from metastone_lab.sprm import SPRMHead, load_score_module
    from metastone_lab.training import checkpoint as ck

    def policy(seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
        m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, lora_alpha=4,
                                                             target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():                      # non-zero B so the round trip is meaningful
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_()
        return m

    pol, head, prm = policy(0), SPRMHead(16), SPRMHead(16)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    head(torch.randn(2, 16)).sum().backward()
    opt.step()
    parts = ck.CheckpointParts(policy=pol, head=head, optimizers={"head": opt},
                               state={"fingerprint_fields": {}}, rng_states=[ck.rng_state()],
                               prm_head=prm)
    ckpt = ck.save_checkpoint(tmp_path / "run", 3, parts)
    files = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}
    assert "adapter/adapter_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pkl", ".pickle")) for f in files), files
    for name in ("score_module", "prm_score_module"):
        assert {f"{name}.pt", f"{name}.safetensors"} <= files
    # adapter round trip (strict) into a fresh model with different LoRA weights
    fresh = policy(1)
    ck.load_adapter_weights(fresh, ckpt / "adapter")
    a = {k: v for k, v in pol.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in fresh.state_dict().items() if "lora_" in k}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # heads from the safetensors twins equal the trained ones
    x = torch.randn(4, 16)
    # same weights bit for bit, same ops: equal
    assert torch.equal(load_score_module(ckpt / "score_module.safetensors", 16)(x), head.eval()(x))
    assert torch.equal(load_score_module(ckpt / "prm_score_module.safetensors", 16)(x), prm.eval()(x))
    # every other .pt (optimiser, RNG) is plain tensors/primitives: loads with weights_only=True
    for f in ckpt.glob("*.pt"):
        ck.torch_load(f)
