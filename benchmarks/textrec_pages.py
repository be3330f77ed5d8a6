"""Text recognition in a real OCR pipeline, measured: whole FUNSD pages and the drop-in recogniser.

    python benchmarks/textrec_pages.py --student runs/x/student --dropin runs/x/onnx/rec_ppocr.onnx \
        --funsd ../shared/data/funsd/dataset [--pages 50] [--crops 2000] > pages.md

pages: FUNSD's test forms through PP-OCRv4's text detector (textrec/pages.py: rapidocr's own code) once, then every
line crop read by PP-OCRv4's recogniser (the teacher, rapidocr's TextRecognizer), by the student in PyTorch and by
the student's rec_ppocr.onnx in rapidocr's TextRecognizer. Page CER: the page's text in reading order (lines grouped
into rows, pages.page_text) against the ground-truth words of the form grouped into rows the same way, both with
runs of whitespace as one space (jiwer, edits / reference characters over all pages), and the same with every
space removed (PP-OCRv4 runs English words together, and a student trained on word crops never saw a space).
pages/s: detection plus
recognition, one thread, the same pages.
crops: the drop-in file in RapidOCR itself, RapidOCR(rec_model_path=...)(crop, use_det=False, use_cls=False), against
RapidOCR's own recogniser on the same FUNSD test word crops (cut with their ground-truth boxes), one crop a call: CER
(texts folded onto ASCII) and ms per crop (median).
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

import jiwer
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from textrec import data, pages, teachers  # noqa: E402


def squash(text):
    return re.sub(r"\s+", " ", text).strip()


def truth_text(annotation):
    with open(annotation) as f:
        words = [w for entity in json.load(f)["form"] for w in entity["words"] if w["text"].strip()]
    return squash(pages.page_text([w["box"] for w in words], [data.fold(w["text"]) for w in words]))


def measure_pages(args, readers):
    root = os.path.join(args.funsd, "testing_data")
    names = sorted(os.listdir(os.path.join(root, "images")))[:args.pages]
    detector = pages.LineDetector()
    truths, found, detect_seconds = [], [], 0.0
    for name in names:
        page = Image.open(os.path.join(root, "images", name)).convert("RGB")
        start = time.perf_counter()
        found.append(detector(page))
        detect_seconds += time.perf_counter() - start
        truths.append(truth_text(os.path.join(root, "annotations", os.path.splitext(name)[0] + ".json")))
    lines = sum(len(f) for f in found)
    rows = []
    for label, reader in readers:
        texts, seconds = [], 0.0
        for detected in found:
            start = time.perf_counter()
            readings = reader([crop for _, crop in detected]) if detected else []
            seconds += time.perf_counter() - start
            texts.append(squash(pages.page_text([pages.box_of(q) for q, _ in detected], [r["text"] for r in readings])))
        nospace = lambda text: text.replace(" ", "") or "\x00"  # noqa: E731
        rows.append((label, jiwer.cer(truths, [t or "\x00" for t in texts]),
                     jiwer.cer([nospace(t) for t in truths], [nospace(t) for t in texts]), seconds, texts))
    print(f"{len(names)} FUNSD test forms, {lines} detected lines; detection {detect_seconds:.1f} s "
          f"({detect_seconds / len(names):.2f} s a page); one thread\n")
    print("| recogniser after PP-OCRv4's detector | page CER | page CER, spaces ignored | recognition s | "
          "pages/s (detection + recognition) |")
    print("|---|---|---|---|---|")
    for label, cer, loose, seconds, _ in rows:
        print(f"| {label} | {cer:.4f} | {loose:.4f} | {seconds:.1f} | {len(names) / (detect_seconds + seconds):.3f} |")
    same = [sum(a == b for a, b in zip(rows[1][4], rows[2][4])), len(names)] if len(rows) > 2 else None
    if same:
        print(f"\nPages read identically by the student in PyTorch and in its rec_ppocr.onnx: {same[0]} of {same[1]}")


def measure_crops(args):
    from rapidocr_onnxruntime import RapidOCR  # heavy
    rows = data.funsd_records(args.funsd)["test"][:args.crops]
    crops = [c for c in (data.cut(r) for r in rows)]
    keep = [(r, c) for r, c in zip(rows, crops) if c is not None and data.fold(r["text"])]
    truths = [data.fold(r["text"]) for r, _ in keep]
    bgr = [np.ascontiguousarray(np.asarray(c.convert("RGB"))[:, :, ::-1]) for _, c in keep]
    print(f"\n{len(keep)} FUNSD test word crops, RapidOCR(rec_model_path=...)(crop, use_det=False, use_cls=False), one "
          f"crop a call, one thread\n")
    print("| recogniser in RapidOCR | CER | exact | ms/crop (median) |")
    print("|---|---|---|---|")
    for label, path in (("PP-OCRv4's own (ch_PP-OCRv4_rec_infer.onnx)", teachers.ppocrv4_path()),
                        ("the student's rec_ppocr.onnx", args.dropin)):
        engine = RapidOCR(rec_model_path=path, use_cls=False, intra_op_num_threads=1, inter_op_num_threads=1)
        texts, times = [], []
        for image in bgr:
            start = time.perf_counter()
            result, _ = engine(image, use_det=False, use_cls=False, use_rec=True)
            times.append(time.perf_counter() - start)
            texts.append(data.fold(result[0][0]) if result else "")
        scores = data.text_metrics(truths, texts)
        print(f"| {label} | {scores['cer']:.4f} | {scores['exact']:.4f} | {1e3 * statistics.median(times):.2f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True, help="the student (student/ or student_model.pth)")
    parser.add_argument("--dropin", required=True, help="its rec_ppocr.onnx (--mode export)")
    parser.add_argument("--funsd", default="../shared/data/funsd/dataset")
    parser.add_argument("--pages", type=int, default=50)
    parser.add_argument("--crops", type=int, default=2000)
    args = parser.parse_args()
    student = pages.saved_student(args.student)
    readers = [("PP-OCRv4 recogniser (the teacher)", pages.OnnxReader(teachers.ppocrv4_path())),
               ("student, PyTorch", pages.StudentReader(student, student.config.chars, student.config.height)),
               ("student, rec_ppocr.onnx in rapidocr's TextRecognizer", pages.OnnxReader(args.dropin))]
    if args.pages:
        measure_pages(args, readers)
    if args.crops:
        measure_crops(args)


if __name__ == "__main__":
    main()
