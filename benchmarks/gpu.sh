#!/usr/bin/env bash
# GPU checks and timings: AMP training (bf16, fp16) end to end, then both benchmarks on the GPU.
#   bash benchmarks/gpu.sh MODELS_DIR OUT_DIR      (MODELS_DIR holds dit-large-finetuned-rvlcdip and layoutlmv3-base)
set -euo pipefail
MODELS=${1:-../shared/models}
OUT=${2:-runs/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
TINY="--preset demo --dataset demo --cache-dir $OUT/cache --max-length 128 --student-image-size 112"
python main.py --mode teacher $TINY --epochs 2 --output-dir "$OUT/amp" --amp bf16
for amp in bf16 fp16; do
    python main.py --mode train $TINY --epochs 2 --teacher "$OUT/amp/teacher" --output-dir "$OUT/amp-$amp" --amp $amp
    python main.py --mode eval $TINY --teacher "$OUT/amp/teacher" --output-dir "$OUT/amp-$amp" --amp $amp
done
REAL="--preset demo --cache-dir $OUT/cache --teacher $MODELS/dit-large-finetuned-rvlcdip --tokenizer $MODELS/layoutlmv3-base --student-config $MODELS/layoutlmv3-base --student-image-size 224"
python main.py --mode bench $REAL --eval-split test --output-dir "$OUT/bench-fp32"
python main.py --mode bench $REAL --eval-split test --output-dir "$OUT/bench-bf16" --amp bf16
python benchmarks/train_throughput.py $REAL --max-samples 256 --epochs 3 --output-dir "$OUT/throughput"
