#!/usr/bin/env bash
# Checks and measurements of the CUDA paths, as one run on a GPU machine (the repository root
# as working directory, the machine's own PyTorch/timm/Triton, nothing installed):
#   1. tests/test_cuda.py (+ test_cuda_precision.py): the Triton kernels against the fp64 reference (SA alone and the
#      BN -> SA -> + -> ReLU block tail), fp16/bf16, torch.compile, determinism, saved memory,
#      a model in training mode and under autocast;
#   2. sanet bench on the GPU, fp32 and bf16 (layers: reference / torch / fused / x.clone();
#      models: sa_resnet50 vs resnet50 at batch 64);
#   3. benchmarks/gpu_profile.py: host time per call, kernel time of a training step, the step
#      captured in a CUDA graph;
#   4. a short sanet train run with --amp bf16 --channels-last --compile, then sanet eval --json.
# With a cold Triton cache the tests compile every kernel first: on an H200 (ebd63eb) that
# took over 130 s (the old limit here cut it off), the tests themselves 20 s once compiled;
# the rest of the script took 190 s.
# Logs and JSON go to $OUT (default /tmp/sanet-gpu). The CPU extension is not built here.
# Exit status: 0 when every step passed, 1 when any failed (the others still run, so one run
# gives every measurement it can), 2 when PyTorch sees no CUDA device (nothing is run).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" SANET_DISABLE_EXT=1 PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/sanet-gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# Without CUDA every step below would fail or, worse, run on the CPU (the training step did)
# and look like a result: refuse before anything runs.
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.is_available() is false or torch failed to import); run it on a GPU machine" >&2
    exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT/gpu_check.log") 2>&1
rc=0  # 1 once any step fails; every step still runs

echo "== environment (${SECONDS}s)"
$PY -c "import torch, timm, triton; print('torch', torch.__version__, '| timm', timm.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())" || rc=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv,noheader || rc=1

echo "== tests/test_cuda.py tests/test_cuda_precision.py (${SECONDS}s)"
timeout 270 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_precision.py || rc=1

echo "== sanet bench, fp32 (${SECONDS}s)"
SHAPES="8x256x56x56 8x1024x14x14 64x256x56x56 64x1024x14x14 64x2048x7x7"
timeout 70 $PY -m sanet bench --device cuda --shapes $SHAPES --rounds 50 --batch-size 64 \
    --model-rounds 15 --output "$OUT/bench-cuda-fp32.json" || rc=1
echo "== sanet bench, bf16 (${SECONDS}s)"
timeout 70 $PY -m sanet bench --device cuda --dtype bf16 --shapes $SHAPES --rounds 50 --batch-size 64 \
    --model-rounds 15 --output "$OUT/bench-cuda-bf16.json" || rc=1

echo "== benchmarks/gpu_profile.py (${SECONDS}s)"
timeout 150 $PY benchmarks/gpu_profile.py --out "$OUT" || rc=1

echo "== sanet train --amp bf16 --channels-last --compile (2 epochs), then sanet eval --json (${SECONDS}s)"
{ $PY -c "from pathlib import Path; from sanet.demo import write_digits_imagefolder as w; print(w(Path('$WORK/digits')))" \
  && timeout 90 $PY -m sanet train --model sa_resnet_test --data "$WORK/digits" --output "$WORK/amp" \
    --img-size 32 --batch-size 64 --epochs 2 --lr 0.1 --workers 4 --amp bf16 --channels-last --compile \
    --device cuda --no-progress --overwrite \
  && timeout 40 $PY -m sanet eval --checkpoint "$WORK/amp/last.pt" --data "$WORK/digits/val" \
    --amp bf16 --channels-last --device cuda --json; } || rc=1
echo "== done (${SECONDS}s), $([ $rc -eq 0 ] && echo 'every step passed' || echo 'SOME STEP FAILED: see above')"
exit $rc
