#!/usr/bin/env bash
# One prepared GPU check, under 7 minutes on one CUDA GPU:
#   1. the Triton kernel and loss parity tests, compiled for real (no interpreter);
#   2. the loss benchmark (open_clip ClipLoss vs dsclip with Triton kernels), bf16 and fp32, 1 rank;
#   3. the training-throughput benchmark, ViT-B-32 bf16 on one GPU (about 2 more minutes).
# Logs and JSON go to $OUT (default bench/results). Each stage has its own timeout, so a
# hang in one still leaves the others' results; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
status=0

python -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device';
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee "$OUT/gpu_env.txt" || exit 1

echo "== kernel + loss tests on CUDA"
# Autotuning compiles each kernel for 6 tile configs per shape: spread the tests over 4 processes.
xdist=$(python -c "import xdist" 2>/dev/null && echo "-n 4")
timeout 170 python -m pytest tests/test_kernels.py tests/test_loss.py -m "gpu or not slow" -q -p no:cacheprovider $xdist \
    2>&1 | tee "$OUT/gpu_tests.txt" || status=1

for dtype in bf16 fp32; do
    echo "== loss benchmark, Triton kernels, $dtype"
    timeout 75 python bench/loss.py --device cuda --dtype "$dtype" --impl triton --ranks 1 \
        --batches 4096 16384 65536 --repeats 2 --host-budget-gb 100 --json "$OUT/loss_cuda_$dtype.json" 2>&1 | tee "$OUT/gpu_bench_$dtype.txt" || status=1
done

# ---- training throughput (bench/train.py), appended for issue 10 --------------------------------
# One GPU, ViT-B-32, bf16, 128 per step: open_clip's model in a plain loop (autocast bf16), and
# dsclip's Trainer under ZeRO-2 and ZeRO-3 (bf16 weights, fp32 master), 30 timed steps each after
# 10 warm-up steps. About 2 minutes (each system starts fresh processes; the first dsclip run
# compiles the Triton loss kernels). open_clip's own trainer is left out here: its synthetic data
# is made on the host, one image at a time, and would time PIL rather than the GPU.
echo "== training throughput, ViT-B-32, bf16, 1 GPU"
timeout 160 python bench/train.py --device cuda --dtype bf16 --model ViT-B-32 --batch-size 128 --ranks 1 \
    --systems open_clip_loop zero2 zero3 --warmup 10 --windows 3 --window-steps 10 \
    --pool-batches 2 --json "$OUT/train_cuda_bf16.json" 2>&1 | tee "$OUT/gpu_train.txt" || status=1
exit $status
