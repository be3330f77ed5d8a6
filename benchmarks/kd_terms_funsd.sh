#!/usr/bin/env bash
# Which distillation terms help on FUNSD word tagging (issue #14): the student alone and with each --kd-terms
# choice, seeds 42 and 43, validation and test F1, with the teacher and student of benchmarks/studies.sh's FUNSD
# study (run it first: STUDIES=funsd bash benchmarks/studies.sh) at its best setting (T 1, alpha 0.9).
#
#   bash benchmarks/kd_terms_funsd.sh         # -> OUT/<terms>-seed<seed>/eval.json, OUT/results.md
#
# Two runs at a time, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
STUDY=${STUDY:-runs/studies/funsd}
OUT=${OUT:-runs/kd-terms-funsd}
TERMS=${TERMS:-"alone kd feature simkd kd,feature kd,attention"}
SEEDS=${SEEDS:-"42 43"}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
DISTILBERT=$SHARED/models/distilbert-base-uncased
FUNSD=(--preset funsd --dataset "$SHARED/data/funsd" --cache-dir "$STUDY/cache" --batch-size 8
       --teacher "$STUDY/teacher/teacher" --student-config "$DISTILBERT" --tokenizer "$DISTILBERT"
       --student-size small --lr 1e-3 --epochs 10 --temperature 1 --alpha 0.9)
mkdir -p "$OUT"
one() {  # terms seed
    local dir=$OUT/${1//,/+}-seed$2 flags=(--kd-terms "$1")
    [[ $1 == alone ]] && flags=(--alpha 0)
    if [[ ! -e $dir/student_model.pth ]]; then
        $PYTHON main.py "${FUNSD[@]}" "${flags[@]}" --seed "$2" --mode train --output-dir "$dir" >"$dir.log" 2>&1
    fi
    $PYTHON main.py "${FUNSD[@]}" "${flags[@]}" --seed "$2" --mode eval --eval-split test --output-dir "$dir" \
        >"$dir.eval.log" 2>&1
}
queue=()
for terms in $TERMS; do for seed in $SEEDS; do queue+=("$terms $seed"); done; done
for job in "${queue[@]}"; do
    one $job &
    while (( $(jobs -rp | wc -l) >= 2 )); do sleep 5; done
done
wait
$PYTHON - "$OUT" $TERMS <<'PY'
import json, os, sys
import numpy as np
out, terms = sys.argv[1], sys.argv[2:]
lines = ["| --kd-terms | validation F1 (best epoch) | test F1 | per seed (test) |", "|---|---|---|---|"]
for t in terms:
    val, test = [], []
    for d in sorted(os.listdir(out)):
        if d.startswith(t.replace(",", "+") + "-seed") and os.path.isdir(os.path.join(out, d)):
            rows = [json.loads(l) for l in open(os.path.join(out, d, "student_metrics.jsonl"))]
            val.append(max(r["val_f1"] for r in rows))
            test.append(json.load(open(os.path.join(out, d, "eval.json")))["f1"])
    name = "none (alpha 0)" if t == "alone" else t
    lines.append(f"| {name} | {np.mean(val):.3f} +- {np.std(val, ddof=1) if len(val) > 1 else 0:.3f} | "
                 f"{np.mean(test):.3f} +- {np.std(test, ddof=1) if len(test) > 1 else 0:.3f} | "
                 f"{', '.join(f'{x:.3f}' for x in test)} |")
text = "\n".join(lines)
print(text)
open(os.path.join(out, "results.md"), "w").write(text + "\n")
PY
