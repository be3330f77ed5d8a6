"""The README table from benchmarks/textrec.sh's runs: python benchmarks/textrec_table.py OUT.

One row per run directory of OUT with an eval.json; each distilled run is compared with the student alone of the
same data (kl, seq -> ctc; lowres-kl -> lowres-ctc; l10-kl -> l10-ctc), the strongest of them when there are
several (l10-ctc and l10-ctc60: the same run at 60 epochs): the CER difference and its 95% paired bootstrap
interval over the test crops (eval_predictions.jsonl; predictions.jsonl in runs made before it was renamed). "CER, case and spaces ignored" reads the same
predictions with both sides upper-cased and spaces removed: what is left when a label convention (SROIE's
upper-case transcripts) and the teacher's reading (letter case as printed, no spaces in lines) disagree.
"""
import functools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import stats  # noqa: E402
from textrec import data  # noqa: E402

NAMES = {"ctc": "CTC on labels alone", "kl": "distilled: + per-step KL", "seq": "distilled: + sequence KD",
         "klnoconv": "distilled: + per-step KL, the teacher as it reads (--no-label-conventions)",
         "klsimkd": "distilled: + per-step KL and SimKD"}
PREFIXES = {"lowres": None, "l10": "10% of the training crops labelled", "l0": "no training transcript"}


def describe(run, result):
    prefix, _, kind = run.rpartition("-") if run.rpartition("-")[0] in PREFIXES else ("", "", run)
    low = result["degradation"]["degrade_height"]
    where = [f"{low} px" if low else "full resolution"]
    if PREFIXES.get(prefix):
        where.append(PREFIXES[prefix])
    base = kind.rstrip("0123456789")  # e.g. ctc60: the same run kind at another --epochs
    epochs = f", {kind[len(base):]} epochs" if kind != base else ""
    return prefix, kind, f"student ({', '.join(where)}), {NAMES.get(base, base)}{epochs}"


@functools.lru_cache(maxsize=None)
def predictions(out, run):
    """A run's eval_predictions.jsonl rows (read once), or None without it."""
    path = os.path.join(out, run, "eval_predictions.jsonl")
    if not os.path.exists(path):  # a run made before --mode eval's file was renamed (--mode predict's is this name)
        path = os.path.join(out, run, "predictions.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else None


def edits(out, run):
    rows = predictions(out, run)
    return None if rows is None else [(r["student_edits"], len(r["truth"])) for r in rows]


def loose_cer(out, run, who):
    """CER with both sides upper-cased and without spaces, from eval_predictions.jsonl (None without it)."""
    rows = predictions(out, run)
    if rows is None:
        return None
    norm = lambda text: text.replace(" ", "").upper()  # noqa: E731
    chars = sum(len(norm(r["truth"])) for r in rows)
    return sum(data.char_errors(norm(r["truth"]), norm(r[who])) for r in rows) / max(chars, 1)


def fmt(value):
    return "-" if value is None else f"{value:.4f}"


def main(out):
    runs = sorted(d for d in os.listdir(out) if os.path.exists(os.path.join(out, d, "eval.json")))
    results = {run: json.load(open(os.path.join(out, run, "eval.json"))) for run in runs}
    if not results:
        return
    teacher = next(iter(results.values()))
    rows = []
    for run, r in results.items():
        prefix, kind, name = describe(run, r)
        gain = "-"
        # the strongest student alone on the same data (lowest CER; e.g. ctc60, trained as many steps as kl)
        alone = [a for a in results if describe(a, results[a])[0] == (prefix if prefix != "l0" else "")
                 and describe(a, results[a])[1].startswith("ctc") and predictions(out, a)]  # l0: vs all labels
        if not kind.startswith("ctc") and alone and predictions(out, run):
            baseline = min(alone, key=lambda a: results[a]["student"]["cer"])
            s = stats.paired_bootstrap(edits(out, baseline), edits(out, run))
            gain = f"{s['difference']:+.4f} [{s['low']:+.4f}, {s['high']:+.4f}] vs {baseline}"
        s = r["student"]
        rows.append(f"| {name} | {s['cer']:.4f} | {gain} | {fmt(loose_cer(out, run, 'student'))} | {s['wer']:.4f} | "
                    f"{s['exact']:.4f} | {s['exact_nocase']:.4f} | {r['student_parameters'] / 1e6:.2f}M | "
                    f"{r['student_ms_per_crop']:.2f} / {r['teacher_ms_per_crop']:.2f} ({r['speedup_batch1']:.1f}x) | "
                    f"{r['teacher_agreement']:.3f} |")
    t = teacher["teacher_scores"]
    print(f"{teacher['crops']} test crops ({teacher['split']} split); ms per crop at batch 1, {teacher['threads']} "
          f"thread(s); CER change against the strongest student alone on the same data, 95% paired bootstrap "
          f"interval over the test crops ({stats.RESAMPLES} resamples)\n")
    print("| model | CER | CER change vs alone | CER, case and spaces ignored | WER | exact | exact (any case) | "
          "parameters | ms/crop: student / teacher, same eval (speed-up) | agrees with teacher |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| teacher: PP-OCRv4 recogniser (ONNX, clean 48 px crops) | {t['cer']:.4f} | - | "
          f"{fmt(loose_cer(out, next(iter(results)), 'teacher'))} | {t['wer']:.4f} | "
          f"{t['exact']:.4f} | {t['exact_nocase']:.4f} | {teacher['teacher_parameters'] / 1e6:.2f}M | "
          f"- / {teacher['teacher_ms_per_crop']:.2f} | - |")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1])
