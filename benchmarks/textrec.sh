#!/usr/bin/env bash
# Text recognition on FUNSD words: PP-OCRv4 (ONNX) teacher -> small CRNN student, alone and distilled, at full
# and at low resolution; every student scored on all 8,707 FUNSD test words next to the teacher.
#
#   bash benchmarks/textrec.sh                       # everything below, results in $OUT/results.md
#   RUNS="ctc kl" bash benchmarks/textrec.sh         # a subset of the runs
#
# Settings (environment): FUNSD (the dataset folder), OUT, TRAIN_SAMPLES (seeded subset of the training words,
# 0 = all 20,176), EPOCHS, LOWRES (the low-resolution student's --degrade-height), THREADS (1 by default).
set -euo pipefail
cd "$(dirname "$0")/.."
FUNSD=${FUNSD:-../shared/data/funsd/dataset}
OUT=${OUT:-runs/textrec}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-4000}
EPOCHS=${EPOCHS:-6}
LOWRES=${LOWRES:-8}
RUNS=${RUNS:-"ctc kl seq lowres-ctc lowres-kl lowres-seq"}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${THREADS:-1} HF_HUB_OFFLINE=1
COMMON=(--preset funsd-words --dataset "$FUNSD" --cache-dir "$OUT/cache" --epochs "$EPOCHS")

for run in $RUNS; do
  flags=()
  case $run in
    lowres-*) flags+=(--degrade-height "$LOWRES"); kind=${run#lowres-} ;;
    *) kind=$run ;;
  esac
  case $kind in
    ctc) flags+=(--alpha 0) ;;                                  # CTC on the labels alone, no teacher
    kl)  flags+=(--alpha 0.5 --temperature 2 --kd-terms kl) ;;  # + per-step KL on the folded CTC distributions
    seq) flags+=(--alpha 0.5 --kd-terms seq) ;;                 # + CTC on the teacher's transcripts
  esac
  if [ ! -f "$OUT/$run/eval.json" ]; then
    echo "== $run: ${flags[*]}"
    /usr/bin/time -f "$run train: %e s" $PY main.py "${COMMON[@]}" --mode train --max-samples "$TRAIN_SAMPLES" \
      --output-dir "$OUT/$run" "${flags[@]}"
    /usr/bin/time -f "$run eval: %e s" $PY main.py "${COMMON[@]}" --mode eval --eval-split test \
      --output-dir "$OUT/$run" "${flags[@]}"
  fi
done
$PY benchmarks/textrec_table.py "$OUT" | tee "$OUT/results.md"
