#!/usr/bin/env bash
# Text recognition: PP-OCRv4 (ONNX) teacher -> small CRNN student, alone and distilled, at full and at low
# resolution, with all labels or only a share of them; every student scored on the whole test split next to the
# teacher, and each distilled student compared with the student alone (paired bootstrap over the test crops).
#
#   bash benchmarks/textrec.sh                       # the runs below on FUNSD words, results in $OUT/results.md
#   RUNS="ctc kl" bash benchmarks/textrec.sh         # a subset of the runs
#   PRESET=sroie-lines DATA=../shared/data/sroie OUT=runs/textrec-sroie bash benchmarks/textrec.sh
#
# Runs: ctc (CTC on the labels alone), kl (+ per-step KL, the labels' conventions found and taught), klnoconv (kl
# with --no-label-conventions: the teacher taught as it reads), klsimkd (kl + SimKD), seq (+ sequence KD), each also
# as lowres-* (the student reads crops shrunk to LOWRES px high), l10-* (only 10% of the training crops keep their
# transcripts, --labeled-fraction 0.1: the teacher alone teaches the rest; l10-ctc trains on the labelled 10% alone)
# and l0-* (no transcript at all, --labeled-fraction 0: the teacher alone teaches).
# Settings (environment): PRESET, DATA (the dataset folder), OUT, TRAIN_SAMPLES (seeded subset of the training
# crops, 0 = all), EPOCHS, LOWRES (the low-resolution student's --degrade-height), THREADS (1 by default),
# EXTRA (more flags for every run, train and eval), TRAIN_EXTRA (more flags for training only, e.g. --augment).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-funsd-words}
DATA=${DATA:-${FUNSD:-../shared/data/funsd/dataset}}
OUT=${OUT:-runs/textrec}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-4000}
EPOCHS=${EPOCHS:-6}
LOWRES=${LOWRES:-8}
RUNS=${RUNS:-"ctc kl seq lowres-ctc lowres-kl lowres-seq"}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${THREADS:-1} HF_HUB_OFFLINE=1
COMMON=(--preset "$PRESET" --dataset "$DATA" --cache-dir "$OUT/cache" --epochs "$EPOCHS" ${EXTRA:-})

for run in $RUNS; do
  flags=() train=(${TRAIN_EXTRA:-})  # train: flags that shape training only (eval refuses them)
  case $run in
    lowres-*) flags+=(--degrade-height "$LOWRES"); kind=${run#lowres-} ;;
    l10-*) train+=(--labeled-fraction 0.1); kind=${run#l10-} ;;
    l0-*) train+=(--labeled-fraction 0); kind=${run#l0-} ;;
    *) kind=$run ;;
  esac
  case $kind in
    ctc) flags+=(--alpha 0) ;;                                  # CTC on the labels alone, no teacher
    kl)  flags+=(--alpha 0.5 --temperature 2 --kd-terms kl) ;;  # + per-step KL on the folded CTC distributions
    klnoconv) flags+=(--alpha 0.5 --temperature 2 --kd-terms kl); train+=(--no-label-conventions) ;;
    klsimkd) flags+=(--alpha 0.5 --temperature 2 --kd-terms kl,simkd) ;;
    seq) flags+=(--alpha 0.5 --kd-terms seq) ;;                 # + CTC on the teacher's transcripts
  esac
  if [ ! -f "$OUT/$run/eval.json" ]; then
    echo "== $run: ${flags[*]} ${train[*]}"
    /usr/bin/time -f "$run train: %e s" $PY main.py "${COMMON[@]}" --mode train --max-samples "$TRAIN_SAMPLES" \
      --output-dir "$OUT/$run" "${flags[@]}" "${train[@]}"
    /usr/bin/time -f "$run eval: %e s" $PY main.py "${COMMON[@]}" --mode eval --eval-split test \
      --output-dir "$OUT/$run" "${flags[@]}"
  fi
done
$PY benchmarks/textrec_table.py "$OUT" | tee "$OUT/results.md"
