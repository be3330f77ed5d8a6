"""Preprocessing at corpus scale: pages per second with --num-proc 1 and 2, disk bytes per page, and the
projection to RVL-CDIP's 320,000 training pages.

N pages of the demo corpus generator (demo_corpus.py; generated once into CACHE_DIR/preprocess-scale-N) are
preprocessed as a page-classification run preprocesses its splits (dataset.preprocess_classification: words and
boxes tokenised, the page resized once for the student and once for the teacher), into a fresh cache per
--num-proc value; each result is checked equal to the first's. With --ocr the pages' OCR columns are dropped first
and Tesseract reads every page (ocr.add_ocr_columns, with the same --num-proc), timed on its own.

What is stored per page (the cache's arrow file; the table gives each column's bytes): input_ids (int32, one per
token, at most --max-length), bbox (4 x int16 per token), the student's page (uint8, 3 x S x S at
--student-image-size S, the size its patch embedding reads), the teacher's page (uint8, 3 x T x T at the
teacher's processor size: DiT 224; none for a teacher that reads no page) and a few scalars (index, label,
n_words, n_tokens, truncated, problem). Pages are stored as uint8 at the size each model reads, never at scan
resolution and never as float: normalisation happens per batch (collate.py).

The real shapes (DiT-large's 224-px pages, LayoutLMv3's tokenizer, the student at 224 px), 2000 pages:

    OMP_NUM_THREADS=1 python benchmarks/preprocess_scale.py --pages 2000 --num-proc 1,2 \
        --teacher ../shared/models/dit-large-finetuned-rvlcdip --tokenizer ../shared/models/layoutlmv3-base \
        --student-image-size 224 --max-length 512 --output-dir runs/preprocess-scale

A quick check (the demo preset's shapes): --pages 200. The table goes to OUTPUT_DIR/preprocess_scale.md, all of
it to OUTPUT_DIR/preprocess_scale.json. Timings exclude generating the pages and loading the models.
"""
import argparse
import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers.models.layoutlmv3.image_processing_pil_layoutlmv3 import LayoutLMv3ImageProcessorPil  # noqa: E402

import dataset  # noqa: E402
import demo_corpus  # noqa: E402
import models  # noqa: E402
import ocr  # noqa: E402
import utils  # noqa: E402
from config import parse_config  # noqa: E402
from classification import load_tokenizer  # noqa: E402

RVLCDIP_TRAIN_PAGES = 320_000


def generate(pages, cache_dir):
    """The first `pages` pages of the demo generator's training stream (all 16 classes in turn)."""
    per_class = math.ceil(pages / len(demo_corpus.RVLCDIP_LABELS))
    corpus = demo_corpus.generate_pages(os.path.join(cache_dir, f"preprocess-scale-{pages}"), {"train": ("train", per_class)})
    return corpus["train"].select(range(pages))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--pages", type=int, default=2000, help="pages to generate and preprocess")
    parser.add_argument("--num-proc", default="1,2", help="comma-separated process counts to compare")
    parser.add_argument("--ocr", action="store_true", help="also run Tesseract on every page (OCR columns dropped)")
    own, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nmain.py's flags, all accepted:")
    cfg = parse_config(["--preset", "demo", *rest])
    counts = [int(n) for n in own.num_proc.split(",")]
    if own.pages < 1 or not counts or min(counts) < 1:
        parser.error("--pages and every --num-proc value must be >= 1")
    utils.setup_logging()
    cfg.cache_dir = cfg.cache_dir or os.path.join(cfg.output_dir, "cache")
    split = generate(own.pages, cfg.cache_dir)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.cache_dir, split)
    teacher, processor = models.load_document_teacher(cfg.teacher, demo_corpus.RVLCDIP_LABELS, vocab_size=len(tokenizer),
                                                      pad_token_id=tokenizer.pad_token_id)
    teacher_spec = dataset.image_spec(processor) if models.reads_page(teacher) else None
    del teacher
    student_spec = dataset.image_spec(LayoutLMv3ImageProcessorPil(
        apply_ocr=False, size={"height": cfg.student_image_size, "width": cfg.student_image_size}))
    results = {"pages": own.pages, "student_page": student_spec["size"],
               "teacher_page": teacher_spec and teacher_spec["size"], "max_length": cfg.max_length, "runs": {}}
    reference = None
    for n in counts:
        work = os.path.join(cfg.output_dir, f"num-proc-{n}")
        shutil.rmtree(work, ignore_errors=True)  # a fresh cache: nothing reused
        pages, run = split, {}
        if own.ocr:
            bare = split.remove_columns(list(ocr.OCR_FEATURES))
            pages, run["ocr_seconds"] = timed(lambda: ocr.add_ocr_columns(bare, os.path.join(work, "ocr"),
                                                                          num_proc=n))
            run["ocr_pages_per_s"] = own.pages / run["ocr_seconds"]
        prepared, run["seconds"] = timed(lambda: dataset.preprocess_classification(
            pages, tokenizer, student_spec, teacher_spec, cfg.max_length, work, desc=f"preprocess, {n} processes",
            num_proc=n))
        table = prepared.with_format(None).data.table
        run["pages_per_s"] = own.pages / run["seconds"]
        run["bytes_per_page"] = os.path.getsize(prepared.cache_files[0]["filename"]) / own.pages
        run["column_bytes_per_page"] = {c: table.column(c).nbytes / own.pages for c in table.column_names}
        run["equal_to_first"] = reference is None or table.equals(reference)
        reference = reference if reference is not None else table
        run["rvlcdip_hours"] = RVLCDIP_TRAIN_PAGES / run["pages_per_s"] / 3600
        run["rvlcdip_ocr_hours"] = RVLCDIP_TRAIN_PAGES / run["ocr_pages_per_s"] / 3600 if own.ocr else None
        run["rvlcdip_gb"] = RVLCDIP_TRAIN_PAGES * run["bytes_per_page"] / 1e9
        results["runs"][n] = run
    results["machine"] = utils.device_info()
    md = report(results)
    utils.atomic_json(results, os.path.join(cfg.output_dir, "preprocess_scale.json"))
    utils.atomic_text(md + "\n", os.path.join(cfg.output_dir, "preprocess_scale.md"))
    print("\n" + md)


def report(results):
    lines = [f"{results['pages']} demo pages; student page {results['student_page']}, teacher page "
             f"{results['teacher_page'] or 'none'}, at most {results['max_length']} tokens", "",
             "| processes | pages/s | OCR pages/s | bytes/page on disk | same result | RVL-CDIP 320k: hours | OCR hours "
             "| GB |", "|---|---|---|---|---|---|---|---|"]
    for n, r in results["runs"].items():
        ocr_speed = f"{r['ocr_pages_per_s']:.2f}" if r["rvlcdip_ocr_hours"] is not None else "-"
        ocr_hours = f"{r['rvlcdip_ocr_hours']:.1f}" if r["rvlcdip_ocr_hours"] is not None else "-"
        lines.append(f"| {n} | {r['pages_per_s']:.1f} | {ocr_speed} | {r['bytes_per_page']:,.0f} | "
                     f"{'yes' if r['equal_to_first'] else 'NO'} | {r['rvlcdip_hours']:.2f} | {ocr_hours} | "
                     f"{r['rvlcdip_gb']:.1f} |")
    first = next(iter(results["runs"].values()))
    lines += ["", "Stored per page (bytes, in memory): " + ", ".join(
        f"{c} {b:,.0f}" for c, b in sorted(first["column_bytes_per_page"].items(), key=lambda kv: -kv[1])),
        "", f"machine: {results['machine']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
