"""--ocr-engine for the page tasks, measured on real RVL-CDIP pages: pages/s end to end, words per page, and how
far each engine's words are from Tesseract's.

    python benchmarks/ocr_engines.py --pages 32 --engines tesseract ppocrv4 runs/x/student runs/x/onnx/rec_ppocr.onnx

A seeded sample of --pages pages of ../shared/data/rvlcdip-sample (the same number from each class), each OCR'd by
each engine as training and predict do (ocr.cached_page_ocr, into a fresh cache: nothing reused), one thread. Words
against Tesseract's: the F1 of the two bags of lower-cased words per page, averaged over pages (Tesseract is no
ground truth: this says how different the page tasks' input becomes, not which engine is right).
"""
import argparse
import collections
import glob
import os
import random
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ocr  # noqa: E402
from textrec import pages  # noqa: E402


def bag_f1(a, b):
    a, b = collections.Counter(w.lower() for w in a), collections.Counter(w.lower() for w in b)
    common = sum((a & b).values())
    if not a and not b:
        return 1.0
    return 2 * common / max(sum(a.values()) + sum(b.values()), 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/rvlcdip-sample")
    parser.add_argument("--pages", type=int, default=32)
    parser.add_argument("--engines", nargs="+", default=["tesseract", "ppocrv4"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    classes = sorted(d for d in os.listdir(args.data) if os.path.isdir(os.path.join(args.data, d)))
    per_class = max(1, args.pages // len(classes))
    files = []
    for name in classes:
        found = sorted(glob.glob(os.path.join(args.data, name, "*.jpg")))
        files += random.Random(args.seed).sample(found, min(per_class, len(found)))
    images = [Image.open(f).convert("RGB") for f in files]
    results = {}
    print(f"{len(files)} RVL-CDIP pages ({per_class} of each of {len(classes)} classes, seed {args.seed}), "
          f"{images[0].height} px high; one thread; OCR only (no page model)\n")
    print("| --ocr-engine | pages/s | s/page | words/page | bag-of-words F1 against Tesseract's words |")
    print("|---|---|---|---|---|")
    for spec in args.engines:
        engine = pages.ocr_engine(spec)
        with tempfile.TemporaryDirectory() as cache:
            if engine is not None:
                engine.read(images[0])  # load the models once, outside the timing (as a long run would)
            start = time.perf_counter()
            results[spec] = [ocr.cached_page_ocr(image, cache, engine)["ocr_words"] for image in images]
            seconds = time.perf_counter() - start
        words = sum(map(len, results[spec])) / len(images)
        f1 = sum(bag_f1(w, t) for w, t in zip(results[spec], results.get("tesseract", results[spec]))) / len(images)
        print(f"| {spec} | {len(images) / seconds:.3f} | {seconds / len(images):.2f} | {words:.0f} | "
              f"{f1:.3f}{' (itself)' if spec == 'tesseract' else ''} |")


if __name__ == "__main__":
    main()
