"""FUNSD as words and lines: a crop table (train/validation/test.jsonl) for a student that also reads lines.

    python benchmarks/funsd_lines.py ../shared/data/funsd/dataset runs/funsd-wordlines [--seed 42]

train.jsonl: every word of the training split that --dataset FUNSD_FOLDER gives (the same 90% of the training forms,
textrec/data.py's split by form with --seed), then, for the same forms, every entity whose words are on one line
(each word's vertical centre within the first word's box) and has more than one word: its words' boxes joined, its
words joined by single spaces. validation.jsonl and test.jsonl: the words of the validation and test splits, as
--dataset FUNSD_FOLDER gives them (so validation and test scores compare with the words-only runs). Image paths are
absolute: the folder holds tables only, never the images (../shared stays out of the repository).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from textrec import data  # noqa: E402


def line_rows(image):
    """The single-line, multi-word entities of a FUNSD form image, as crop rows."""
    annotation = image.replace(f"{os.sep}images{os.sep}", f"{os.sep}annotations{os.sep}").rsplit(".", 1)[0] + ".json"
    with open(annotation) as f:
        form = json.load(f)["form"]
    rows = []
    for entity in form:
        words = [w for w in entity["words"] if w["text"].strip()]
        if len(words) < 2:
            continue
        top, bottom = words[0]["box"][1], words[0]["box"][3]
        if not all(top <= (w["box"][1] + w["box"][3]) / 2 <= bottom for w in words):
            continue
        boxes = [w["box"] for w in words]
        rows.append({"image": os.path.abspath(image), "text": " ".join(w["text"].strip() for w in words),
                     "box": [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                             max(b[3] for b in boxes)]})
    return rows


def main(funsd, out, seed=42):
    splits = data.load_records(funsd, seed)
    os.makedirs(out, exist_ok=True)
    for name, records in splits.items():
        rows = [{"image": os.path.abspath(r["image"]), "text": r["text"], "box": r["box"]} for r in records]
        if name == "train":
            rows += [row for image in sorted({r["image"] for r in records}) for row in line_rows(image)]
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(name, len(rows), "crops", sum(" " in r["text"].strip() for r in rows), "with a space")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 42)
