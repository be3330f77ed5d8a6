"""The README table from the eval.json files of benchmarks/textrec.sh: python benchmarks/textrec_table.py OUT."""
import json
import os
import sys

NAMES = {"ctc": "CTC on labels alone", "kl": "distilled: + per-step KL", "seq": "distilled: + sequence KD"}


def main(out):
    rows, teacher = [], None
    for run in ("ctc", "ctc-10ep", "kl", "seq", "lowres-ctc", "lowres-kl", "lowres-seq"):
        path = os.path.join(out, run, "eval.json")
        if not os.path.exists(path):
            continue
        r = json.load(open(path))
        teacher = teacher or r
        low = r["degradation"]["degrade_height"]
        kind = run.split("-")[1] if run.startswith("lowres-") else run.split("-")[0]
        epochs = " (10 epochs)" if run.endswith("10ep") else ""
        name = f"student ({'%d px' % low if low else 'full resolution'}), {NAMES[kind]}{epochs}"
        s = r["student"]
        rows.append(f"| {name} | {s['cer']:.4f} | {s['wer']:.4f} | {s['exact']:.4f} | {s['exact_nocase']:.4f} | "
                    f"{r['student_parameters'] / 1e6:.2f}M | {r['student_ms_per_crop']:.2f} / "
                    f"{r['teacher_ms_per_crop']:.2f} ({r['speedup_batch1']:.1f}x) | {r['teacher_agreement']:.3f} |")
    if teacher is None:
        return
    t = teacher["teacher_scores"]
    print(f"{teacher['crops']} FUNSD test words ({teacher['split']} split); ms per crop at batch 1, "
          f"{teacher['threads']} thread(s)\n")
    print("| model | CER | WER | exact | exact (any case) | parameters | ms/crop: student / teacher, same eval "
          "(speed-up) | agrees with teacher |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| teacher: PP-OCRv4 recogniser (ONNX, clean 48 px crops) | {t['cer']:.4f} | {t['wer']:.4f} | "
          f"{t['exact']:.4f} | {t['exact_nocase']:.4f} | {teacher['teacher_parameters'] / 1e6:.2f}M | "
          f"- / {teacher['teacher_ms_per_crop']:.2f} | - |")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1])
