#!/usr/bin/env bash
# SimKD for text recognition (README "Measured: SimKD (short runs)"): --kd-terms kl, simkd, kl,simkd and kl,simkd
# with --feature-weight 0 on 600 FUNSD words, 12 epochs, seeds 42 and 43; test char accuracy from each eval.json.
#
#   bash benchmarks/textrec_simkd.sh          # -> OUT/<name>-s<seed>/eval.json, a table on stdout
#
# Two runs at a time, one thread each (the README's numbers came from these commands run two lanes side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/simkdtr}
SEEDS=${SEEDS:-"42 43"}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
one() {  # name seed flags...
    local name=$1 seed=$2; shift 2
    local common=(--preset funsd-words --dataset "$SHARED/data/funsd/dataset" --cache-dir "$OUT/cache"
                  --max-samples 600 --epochs 12 --batch-size 8 --seed "$seed" --output-dir "$OUT/e12-$name-s$seed")
    $PYTHON main.py "${common[@]}" --mode train --alpha 0.5 --temperature 2 "$@" >"$OUT/e12-$name-s$seed.train.log" 2>&1
    $PYTHON main.py "${common[@]}" --mode eval --eval-split test >"$OUT/e12-$name-s$seed.eval.log" 2>&1
}
for seed in $SEEDS; do
    one kl "$seed" --kd-terms kl & one simkd "$seed" --kd-terms simkd & wait
    one klsimkd "$seed" --kd-terms kl,simkd & one klsimkd-fw0 "$seed" --kd-terms kl,simkd --feature-weight 0 & wait
done
$PYTHON - "$OUT" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "e12-*", "eval.json"))):
    scores = json.load(open(path))
    print(f"{os.path.basename(os.path.dirname(path)):24s} test char accuracy {1 - scores['student']['cer']:.3f} "
          f"exact {scores['student']['exact']:.3f} parameters {scores['student_parameters']:,}")
PY
