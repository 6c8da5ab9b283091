"""The engine on CUDA: the batch-independence and in-flight-equals-re-forward tests of
test_engine.py / test_generate.py, re-collected here with the models on the GPU,
plus ``device: auto``, bfloat16 and ``bench engine --device cuda``.

Skipped where CUDA is absent (CI, the 2-core CPU machine); run on a GPU machine
with ``pytest tests/integration/test_cuda.py``.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_engine  # noqa: E402
from test_engine import (  # noqa: E402,F401  (re-collected with the CUDA fixtures below)
    test_a_problems_samples_do_not_depend_on_its_batch,
    test_decode_batch_composition_and_order_do_not_change_a_problem,
    test_inflight_scores_equal_reforward_in_multi_problem_batches)
from test_generate import (make_model, make_tokenizer,  # noqa: E402,F401
                           test_inflight_scores_equal_reforward)

from metastone_lab.generate import GenerateConfig, generate_best_of_n  # noqa: E402
from metastone_lab.next_token import uniforms  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok).to("cuda")


@pytest.fixture(scope="module")
def eos_model(tok):
    m = make_model(tok, seed=1)
    boost = torch.zeros(len(tok), device="cuda")
    boost[tok.eos_token_id] = 2.0
    m.backbone.lm_head.register_forward_hook(lambda mod, inp, out: out + boost)
    return m.to("cuda")


def test_device_auto_moves_a_cpu_model_to_cuda(tok):
    m = make_model(tok, seed=5)
    out = generate_best_of_n(m, tok, test_engine.probs()[:2], None,
                             GenerateConfig(k=2, max_new_tokens=6))
    assert next(m.parameters()).device.type == "cuda"
    assert all(len(ps.trajectories) == 2 for ps in out)


def test_device_cpu_keeps_the_model_on_the_cpu(tok):
    m = make_model(tok, seed=5)
    generate_best_of_n(m, tok, test_engine.probs()[:1], None,
                       GenerateConfig(k=2, max_new_tokens=4, device="cpu"))
    assert next(m.parameters()).device.type == "cpu"


def test_a_seed_draws_the_same_uniforms_on_cpu_and_cuda():
    like_cpu = torch.empty(0)
    like_gpu = torch.empty(0, device="cuda")
    a = uniforms((5, 1), torch.Generator().manual_seed(7), like_cpu)
    b = uniforms((5, 1), torch.Generator().manual_seed(7), like_gpu)
    assert b.device.type == "cuda" and torch.equal(a, b.cpu())


def test_bfloat16_on_cuda_keeps_a_float32_head(tok):
    m = make_model(tok, seed=4)
    out = generate_best_of_n(m, tok, test_engine.probs(), None,
                             GenerateConfig(k=3, max_new_tokens=8, dtype="bfloat16",
                                            device="cuda"))
    assert next(m.backbone.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in m.head.parameters()} == {torch.float32}
    assert all(len(ps.trajectories) == 3 for ps in out)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_bench_engine_on_cuda_prints_the_same_json(capsys, dtype):
    from metastone_lab.cli import main

    argv = ["bench", "engine", "--backbone", "random-small", "--problems", "3", "--k", "2",
            "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0", "--batch-rows", "4"]
    assert main(argv + ["--device", "cuda"] + (["--dtype", dtype] if dtype else [])) == 0
    gpu = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(argv + ["--device", "cpu"] + (["--dtype", dtype] if dtype else [])) == 0
    cpu = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert set(gpu) - set(cpu) == {"peak_gpu_gib"} and set(cpu) <= set(gpu)
    assert gpu["tokens_per_s"] > 0 and gpu["peak_gpu_gib"] > 0
