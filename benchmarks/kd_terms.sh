#!/usr/bin/env bash
# Which distillation terms help (issue #14): the student alone and with each --kd-terms choice (and two teachers
# against one), seeds 42 and 43, validation and test score, on FUNSD word tagging or the demo corpus, at the best
# setting of benchmarks/studies.sh's study of that corpus (T 1, alpha 0.9 on both), with its teacher and student.
#
#   bash benchmarks/kd_terms.sh                 # FUNSD (run STUDIES=funsd bash benchmarks/studies.sh first)
#   CORPUS=demo bash benchmarks/kd_terms.sh     # the demo corpus (STUDIES=demo-grid ... first: its teacher)
#   # -> OUT/<terms>-seed<seed>/eval.json, OUT/results.md
#
# TERMS: "alone" is the student without a teacher (alpha 0, no unlabelled pages, the study's baseline epochs);
# "two-teachers" is kd from the study's teacher and SECOND_TEACHER (demo: the same recipe with seed 43,
# trained here if absent), soft targets averaged. Two runs at a time, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
CORPUS=${CORPUS:-funsd}
SEEDS=${SEEDS:-"42 43"}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
if [[ $CORPUS == funsd ]]; then
    STUDY=${STUDY:-runs/studies/funsd} OUT=${OUT:-runs/kd-terms-funsd} METRIC=f1
    TERMS=${TERMS:-"alone kd feature simkd kd,feature kd,attention"}
    DISTILBERT=$SHARED/models/distilbert-base-uncased
    TEACHER=$STUDY/teacher/teacher
    COMMON=(--preset funsd --dataset "$SHARED/data/funsd" --cache-dir "$STUDY/cache" --batch-size 8
            --student-config "$DISTILBERT" --tokenizer "$DISTILBERT" --student-size small --lr 1e-3 --epochs 10
            --temperature 1 --alpha 0.9)
    ALONE=(--alpha 0)
else
    STUDY=${STUDY:-runs/studies} OUT=${OUT:-runs/kd-terms-demo} METRIC=accuracy
    TERMS=${TERMS:-"alone kd feature simkd kd,feature kd,attention two-teachers"}
    TEACHER=$STUDY/demo-teacher/teacher
    SECOND_TEACHER=${SECOND_TEACHER:-$STUDY/demo-teacher-seed43/teacher}
    COMMON=(--preset demo --student-size small --tokenizer minilm --max-length 128 --student-image-size 64 --lr 1e-3
            --cache-dir runs/cache --temperature 1 --alpha 0.9)
    ALONE=(--alpha 0 --epochs 20)
    if [[ " $TERMS " == *" two-teachers "* && ! -e $SECOND_TEACHER/config.json ]]; then
        $PYTHON main.py --preset demo --mode teacher --dataset demo-teacher --teacher demo-minilm --epochs 2 --lr 3e-4 \
            --batch-size 16 --student-size small --tokenizer minilm --max-length 128 --student-image-size 64 \
            --seed 43 --output-dir "$(dirname "$SECOND_TEACHER")"
    fi
fi
mkdir -p "$OUT"
one() {  # terms seed
    local dir=$OUT/${1//,/+}-seed$2 flags=(--teacher "$TEACHER" --kd-terms "$1")
    [[ $CORPUS == demo ]] && flags+=(--unlabeled demo-unlabeled --epochs 8)
    [[ $1 == alone ]] && flags=(--teacher "$TEACHER" "${ALONE[@]}")
    [[ $1 == two-teachers ]] && flags=(--teacher "$TEACHER" --teacher "$SECOND_TEACHER" --kd-terms kd
                                       --unlabeled demo-unlabeled --epochs 8)
    if [[ ! -e $dir/student_model.pth ]]; then
        $PYTHON main.py "${COMMON[@]}" "${flags[@]}" --seed "$2" --mode train --output-dir "$dir" >"$dir.log" 2>&1
    fi
    $PYTHON main.py "${COMMON[@]}" "${flags[@]}" --seed "$2" --mode eval --eval-split test --output-dir "$dir" \
        >"$dir.eval.log" 2>&1
}
queue=()
for terms in $TERMS; do for seed in $SEEDS; do queue+=("$terms $seed"); done; done
for job in "${queue[@]}"; do
    one $job &
    while (( $(jobs -rp | wc -l) >= 2 )); do sleep 5; done
done
wait
$PYTHON - "$OUT" "$METRIC" $TERMS <<'PY'
import json, os, sys
import numpy as np
out, metric, terms = sys.argv[1], sys.argv[2], sys.argv[3:]
lines = [f"| --kd-terms | validation {metric} (best epoch) | test {metric} | per seed (test) |", "|---|---|---|---|"]
for t in terms:
    val, test = [], []
    for d in sorted(os.listdir(out)):
        if d.startswith(t.replace(",", "+") + "-seed") and os.path.isdir(os.path.join(out, d)):
            rows = [json.loads(l) for l in open(os.path.join(out, d, "student_metrics.jsonl"))]
            val.append(max(r[f"val_{metric}"] for r in rows))
            test.append(json.load(open(os.path.join(out, d, "eval.json")))[metric])
    name = {"alone": "none (alpha 0)", "two-teachers": "kd, two teachers"}.get(t, t)
    lines.append(f"| {name} | {np.mean(val):.3f} +- {np.std(val, ddof=1) if len(val) > 1 else 0:.3f} | "
                 f"{np.mean(test):.3f} +- {np.std(test, ddof=1) if len(test) > 1 else 0:.3f} | "
                 f"{', '.join(f'{x:.3f}' for x in test)} |")
text = "\n".join(lines)
print(text)
open(os.path.join(out, "results.md"), "w").write(text + "\n")
PY
