#!/usr/bin/env bash
# One prepared GPU check, sized for a 10-minute command on one H100/H200-class GPU whose image
# has Python 3.12 with torch and triton, and nothing else of dsclip's (no package index either).
#
#   python bench/gpu_wheels.py      # first, on a machine with pip: the missing wheels into .whl/
#   bash bench/gpu_check.sh         # then on the GPU machine, with .whl/ in the tree
#
# It installs the wheels with pip --no-index into a --target folder, then runs, each stage under
# its own timeout and recorded in $OUT/gpu_check.json the moment it ends:
#   kernel_tests  tests/test_kernels.py compiled for real (needs torch and triton alone)
#   loss_tests    tests/test_loss.py's CUDA cases against open_clip's losses
#   loss_B<n>     bench/loss.py, bf16, 1 GPU, dsclip's Triton loss vs open_clip's ClipLoss at B=<n>
#                 (ClipLoss skipped where its logits would not fit), one JSON per B
#   roofline      bench/kernel_roofline.py: the kernels' TFLOP/s against torch.matmul's, bf16
#   train         bench/train.py: ViT-B-32 bf16 on 1 GPU, dsclip's ZeRO-3 Trainer vs open_clip's model
#                 in a plain loop
# The stage limits add up to 565 s, so with the install the whole check ends inside 10 minutes
# even if every stage runs to its limit. Output (8 files at most): $OUT/gpu_check.json,
# $OUT/gpu_check.log and each benchmark's JSON. The exit status is non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/dsclip-site}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
RECORD="$OUT/gpu_check.json"

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_check: error: no wheels in $WHEELS/: run 'python bench/gpu_wheels.py' where pip can reach an index, and bring $WHEELS/ along" >&2
    exit 1
fi
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: error: no CUDA device (torch sees none); run this on a GPU machine (${#wheels[@]} wheels ready in $WHEELS/)" >&2
    exit 1
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
    || { echo "gpu_check: error: installing $WHEELS/*.whl into $SITE failed" >&2; exit 1; }
export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

python3 - "$RECORD" <<'EOF'
import json, sys, time, torch, triton
json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "triton": triton.__version__, "python": sys.version.split()[0], "stages": []}, open(sys.argv[1], "w"), indent=1)
EOF
status=0

# stage NAME SECONDS COMMAND...: runs COMMAND under its timeout, appends its output to the log
# and its result (exit status, seconds, last output line) to $RECORD at once.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s): $*" | tee -a "$LOG"
    local began=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$OUT/.stage_output"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || status=1
    python3 - "$RECORD" "$name" "$rc" "$((SECONDS - began))" "$*" "$OUT/.stage_output" <<'EOF'
import json, sys
record, name, rc, seconds, command, output = sys.argv[1:]
lines = [line for line in open(output).read().splitlines() if line.strip()]
data = json.load(open(record))
data["stages"].append({"stage": name, "command": command, "returncode": int(rc), "seconds": int(seconds),
                       "timed_out": int(rc) in (124, 137), "last_line": lines[-1] if lines else ""})
json.dump(data, open(record, "w"), indent=1)
EOF
    rm -f "$OUT/.stage_output"
}

# Correctness first: the kernels compiled for real (every tile config, the tuner, determinism),
# spread over processes for compile time (the tests' tuner timings need no quiet GPU).
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
stage kernel_tests 170 python3 -m pytest tests/test_kernels.py -m "not slow and not multiprocess" -q -p no:cacheprovider $xdist
stage loss_tests 50 python3 -m pytest tests/test_loss.py -m gpu -q -p no:cacheprovider

# Benchmarks, one process at a time (each tunes the kernels for its shapes).
for batch in 16384 65536 262144; do
    limit=$(( batch > 65536 ? 90 : batch > 16384 ? 55 : 40 ))
    stage "loss_B$batch" "$limit" python3 bench/loss.py --device cuda --dtype bf16 --impl triton --ranks 1 \
        --batches "$batch" --repeats 3 --json "$OUT/loss_cuda_bf16_B$batch.json"
done
stage roofline 60 python3 bench/kernel_roofline.py --dtype bf16 --batches 16384 65536 262144 --rows 8192 \
    --json "$OUT/kernel_roofline_cuda_bf16.json"
stage train 100 python3 bench/train.py --device cuda --dtype bf16 --model ViT-B-32 --batch-size 128 --ranks 1 \
    --systems open_clip_loop zero3 --warmup 5 --windows 2 --window-steps 10 --pool-batches 2 \
    --json "$OUT/train_cuda_bf16.json"
exit $status
