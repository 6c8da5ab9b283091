#!/usr/bin/env bash
# The engine's CUDA checks, in one call on a GPU machine (nothing here runs in CI):
#   1. tests/integration/test_cuda.py (batch independence, in-flight == re-forward,
#      device auto, bfloat16, bench engine --device cuda prints the CPU run's JSON);
#   2. bench engine --device cuda on the tiny default and on a SmolLM2-135M-shaped
#      model with random weights (ignore_eos: every path decodes exactly T tokens, so
#      throughput does not depend on the weights), float32 and bfloat16.
#
# Usage: scripts/cuda_check.sh CARRY OUT
#   CARRY holds cache/ (a built tiny backbone: METASTONE_LAB_CACHE) and smollm2-shape/
#   (SmolLM2's config.json and tokenizer files, no weights); OUT receives the logs.
# Each step has its own time limit and a failing step does not stop the next.
set -u
CARRY=${1:?carry dir}; OUT=${2:?out dir}
export METASTONE_LAB_CACHE="$CARRY/cache" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
nvidia-smi -L
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

timeout 240 $PY -m pytest -q -p no:cacheprovider tests/integration/test_cuda.py 2>&1 \
    | tee "$OUT/test_cuda.log" | tail -25

SHAPE="$CARRY/smollm2-shape"
timeout 60 $PY - "$SHAPE" <<'EOF'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
d = sys.argv[1]
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d))
m.save_pretrained(d)
print("random SmolLM2-shaped weights:", sum(p.numel() for p in m.parameters()) / 1e6, "M params")
EOF

bench() {   # name, then bench engine arguments
    local name=$1; shift
    echo "== bench engine $name: $*"
    timeout 150 $PY -m metastone_lab.cli bench engine --device cuda "$@" > "$OUT/bench_$name.log" 2>&1
    echo "rc=$?"; tail -1 "$OUT/bench_$name.log"
}
bench tiny --backbone tiny --repeats 3
bench smol_fp32 --backbone "$SHAPE" --repeats 3
bench smol_bf16 --backbone "$SHAPE" --repeats 3 --dtype bfloat16
bench smol_bf16_rows256 --backbone "$SHAPE" --repeats 2 --dtype bfloat16 --problems 32 \
    --batch-rows 256 --skip-hf
