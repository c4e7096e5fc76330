#!/usr/bin/env bash
# One lent-GPU session (15 minutes of device time in all, see README "Measured figures"); each step fits one
# `device` call (10 minutes) and writes its logs and JSON under $OUT (copied back). Run from the repository root:
#
#   bash bench/gpu/session.sh smoke     # versions, build (no deps: the image has them), CUDA tests + whole suite
#   bash bench/gpu/session.sh kernels   # fused_moe vs per-expert cuBLAS loop vs dense matmul, bf16, 3 shapes
#   bash bench/gpu/session.sh tune      # kernel configs for this device (then commit triton_kernels/configs/)
#   bash bench/gpu/session.sh io        # H2D from the pinned ring vs torch pinned / pageable copies; disk reads
#   bash bench/gpu/session.sh loads     # disk-resident expert loads: today's torch path vs one native call per
#                                       # record (read into a ring slot, cudaMemcpyAsync, event), per read engine
#   bash bench/gpu/session.sh e2e       # every policy + accelerate on a random checkpoint of a real model's shapes,
#                                       # klotski also with host compute off
#   bash bench/gpu/session.sh selection # after `all`, when device time is left (~2 min): klotski with decode-step
#                                       # expert selection (off, lynx:0.6, lynx-offload:0.8) paired, OLMoE shapes
#   bash bench/gpu/session.sh all       # THE call for a lent GPU (15 minutes of device time in all, ~9 min here):
#                                       # smoke, the cuda-marked tests only, a short kernel sweep, expert loads,
#                                       # a small e2e run, each under its own timeout, each writing under $OUT as it finishes
#
# Afterwards: copy the JSON next to a bench/results/<date>-<device>-<what>.md naming the device, the commit,
# the command and the table (a figure that is not in the repository is lost).
set -uo pipefail
step=${1:?usage: bench/gpu/session.sh all|smoke|cuda|kernels|tune|io|loads|e2e|selection}
OUT=${OUT:-/tmp/klotski-gpu}
mkdir -p "$OUT"
if [ "$step" = all ]; then
    # At most 8 files come back from $OUT: smoke.log, cuda.log, pytest-cuda.xml, kernels.log (the loads step
    # appends to it), fused_moe_cuda.json, record_load_cuda.json, e2e.log, one e2e JSON. A step cut short by its
    # timeout keeps what it wrote.
    export KLOTSKI_GPU_QUICK=1 PYTHONUNBUFFERED=1
    here=$(dirname "$0")
    timeout 100 bash "$here/session.sh" smoke || echo "smoke: exit $?"
    timeout 150 bash "$here/session.sh" cuda || echo "cuda tests: exit $?"
    timeout 75 bash "$here/session.sh" kernels || echo "kernels: exit $?"
    KLOTSKI_STEP_LOG="$OUT/kernels.log" timeout 45 bash "$here/session.sh" loads || echo "loads: exit $?"
    timeout 170 bash "$here/session.sh" e2e || echo "e2e: exit $?"
    exit 0
fi
log="${KLOTSKI_STEP_LOG:-$OUT/$step.log}"
exec > >(tee -a "$log") 2>&1
echo "klotski $(git rev-parse --short HEAD 2>/dev/null || echo '?') step $step, $(date -u +%FT%TZ)"

build() {
    pip install -e . --no-build-isolation --no-deps -q && python -c "import klotski._C" \
        || { echo "build failed"; exit 1; }
}

case "$step" in
smoke)
    nvidia-smi
    python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
    python - <<'PY'
import importlib
for name in ("transformers", "accelerate", "pybind11", "cmake", "ninja", "numpy", "safetensors"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError as e:
        print(name, "missing:", e)
PY
    build
    [ -n "${KLOTSKI_GPU_QUICK:-}" ] && exit 0
    # the GPU tests first (bf16 kernels, CUDA graphs, ring + H2D, runtime cuda path), then everything
    python -m pytest -q -p no:cacheprovider -m cuda -x --junitxml="$OUT/pytest-cuda.xml" tests
    HF_HUB_OFFLINE=1 python -m pytest -q -p no:cacheprovider --junitxml="$OUT/pytest-all.xml" tests
    ;;
cuda)
    # only the tests that need the GPU (the CPU suite runs in CI): bf16 kernels, CUDA graphs, ring + H2D,
    # the runtime's CUDA path, equality with transformers on cuda
    python -c "import klotski._C" 2>/dev/null || build
    HF_HUB_OFFLINE=1 python -m pytest -q -p no:cacheprovider -m cuda -x --junitxml="$OUT/pytest-cuda.xml" tests
    ;;
kernels)
    python -c "import klotski._C" 2>/dev/null || build
    if [ -n "${KLOTSKI_GPU_QUICK:-}" ]; then  # a short M sweep of the three model shapes
        python bench/kernels/bench_fused_moe.py --dtype bf16 --m 1 16 64 256 1024 4096 --iters 10 \
            --out "$OUT/fused_moe_cuda.json"
    else
        python bench/kernels/bench_fused_moe.py --dtype bf16 --out "$OUT/fused_moe_cuda.json"
    fi
    ;;
tune)
    build
    python bench/kernels/tune_fused_moe.py --models mixtral-8x7b qwen3-30b-a3b deepseek-v2-lite --dtype bf16 \
        --out-dir "$OUT/configs"
    ;;
io)
    build
    python bench/io/bench_h2d.py --out "$OUT/h2d.json"
    python bench/io/bench_disk_read.py --file /tmp/klotski_bench_io.safetensors --size-gib 8 --depths 1,4,16 \
        --bytes-per-run 1G --repeat 3 --engines threads,uring --label "$(nvidia-smi --query-gpu=name --format=csv,noheader) host" \
        --out "$OUT/disk_read.json"
    ;;
loads)
    # ~30 s: 9 MiB bf16 expert records (Qwen3-30B-A3B shapes) from the local disk into a bf16 pool on the GPU,
    # cold (O_DIRECT + page cache dropped) and page-cached; torch/sync (read_now, Tensor.copy_) vs native/<engine>
    # (one klotski._C.load_record call per record), paired in one run
    python -c "import klotski._C" 2>/dev/null || build
    python bench/io/bench_record_load.py --device cuda --dir /tmp --shapes qwen3-30b-a3b --bytes-per-run 128 \
        --repeat 3 --overhead --torch-threads 0 --label "$(nvidia-smi --query-gpu=name --format=csv,noheader) host" \
        --out "$OUT/record_load_cuda.json"
    ;;
e2e)
    python -c "import klotski._C" 2>/dev/null || build
    if [ -n "${KLOTSKI_GPU_QUICK:-}" ]; then  # small enough to write in well under a minute: OLMoE shapes, 8 of
        # its 16 layers (~7 GB bf16) under a 3 GB device budget, no calibration pass, accelerate beside it
        PRESET=${PRESET:-olmoe-1b-7b} LAYERS=${LAYERS:-8} GPU_MEMORY=${GPU_MEMORY:-3GB} CPU_MEMORY=${CPU_MEMORY:-3GB}
        CALIBRATE=${CALIBRATE-} PROMPT_LEN=${PROMPT_LEN:-256} GEN_LEN=${GEN_LEN:-16}
        export PRESET LAYERS GPU_MEMORY CPU_MEMORY CALIBRATE PROMPT_LEN GEN_LEN
    fi
    # a model bigger than the emulated 24 GB card (Qwen3-30B-A3B shapes, 24 of 48 layers: 31.2 GB bf16, fits the
    # 64 GB disk; backup: PRESET=mixtral-8x7b LAYERS=10, 29.5 GB). The checkpoint is kept in CKPT, so a second
    # call (e.g. POLICIES=layerwise after a timeout) reuses it. bench_offload.py rewrites its JSON after each policy.
    # klotski runs once more with host_compute="off" (HOST_OFF= to skip): tokens/s with and without the planner's
    # host placements (CPU attention / cold experts on the CPU), paired in this one invocation.
    python bench/e2e/bench_offload.py --preset "${PRESET:-qwen3-30b-a3b}" --layers "${LAYERS:-24}" \
        --gpu-memory "${GPU_MEMORY:-24GB}" --cpu-memory "${CPU_MEMORY:-48GB}" --prompt-len "${PROMPT_LEN:-512}" --gen-len "${GEN_LEN:-32}" \
        --policies "${POLICIES:-klotski,flexgen,layerwise}" --baseline "${BASELINE:-accelerate}" ${CALIBRATE---calibrate} \
        ${HOST_OFF---host-compute-off} \
        --checkpoint-dir "${CKPT:-/tmp/klotski-ckpt-${PRESET:-qwen3-30b-a3b}-${LAYERS:-24}}" \
        --label "$(nvidia-smi --query-gpu=name --format=csv,noheader)" --out "$OUT"
    ;;
selection)
    # bytes loaded per decode step and tokens/s with batch-aware expert selection against exact routing, paired in
    # one invocation (0.6 / 0.8: each variant's cheapest aggressiveness within 1 % perplexity on the trained
    # 64-expert top-8 model, OLMoE's routing shape, four samples pooled:
    # bench/results/20261203-expert-selection-e64.md; this is a random checkpoint, so only bytes and speed are
    # read from it), at batch 16 for every row (the planner would otherwise size each row's group for its own
    # selection; it still picks each row's prefetch width). Reuses the e2e step's checkpoint when there.
    python -c "import klotski._C" 2>/dev/null || build
    python bench/e2e/bench_offload.py --preset "${PRESET:-olmoe-1b-7b}" --layers "${LAYERS:-8}" \
        --gpu-memory "${GPU_MEMORY:-3GB}" --cpu-memory "${CPU_MEMORY:-3GB}" --prompt-len "${PROMPT_LEN:-256}" \
        --gen-len "${GEN_LEN:-32}" --policies klotski --baseline none --num-batches 1 --batch-size 16 \
        --num-prompts 16 --expert-selection "${SELECTION:-off,lynx:0.6,lynx-offload:0.8}" \
        --checkpoint-dir "${CKPT:-/tmp/klotski-ckpt-${PRESET:-olmoe-1b-7b}-${LAYERS:-8}}" \
        --label "$(nvidia-smi --query-gpu=name --format=csv,noheader)" --out "$OUT"
    ;;
*)
    echo "unknown step $step"; exit 2 ;;
esac
