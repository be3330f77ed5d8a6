"""Training throughput: whole runs of the naive distillation loop against docdistill's, end to end.

(a) naive:      the teacher runs on every step of every epoch, every batch is padded to --max-length (512),
                random order, no cache, float32
(b) docdistill: teacher logits computed once and cached (the fill is timed: it is part of epoch 1), each batch
                padded to its longest document, documents of similar length batched together, the teacher's pages
                left out of training batches; the student in float32 (--student-amp no), bf16 (bf16), or both

Same student initialisation, data, seed and hyper-parameters. Per loop: documents per second of training
(validation excluded) in epoch 1 and in the later epochs, train seconds (all epochs, validation excluded),
wall seconds of the whole run and of its first 3 epochs (training, teacher-cache fill, validation each epoch,
checkpoints), the final validation accuracy, and the peak RSS (MiB) of the process that ran it; then the
speed-ups against naive (epoch 1, later epochs, 3 epochs, total wall time) and, with --student-amp both, bf16
against float32.

The limit of epoch 1 (Speed III): one teacher forward per training page plus one student step per batch. The
teacher forward alone is timed over the training split in each precision this CPU offers (float32, bf16 where
native, int8: the cache fill's batches, in a process of its own, after one warm-up batch); the limit is the
fastest of them plus a later epoch's training seconds (student steps alone, the teacher cached), and epoch 1 is
reported against it. The machine line names the CPU and its AMX / AVX512-BF16 features.

Each loop runs in a fresh process (so each has its own peak RSS); the splits are preprocessed once beforehand
(not timed), and each docdistill run fills the teacher cache anew (<cache-dir>/teacher is emptied first; the
default --cache-dir is OUTPUT_DIR/cache). The table goes to OUTPUT_DIR/train_throughput.md, everything to
OUTPUT_DIR/train_throughput.json, each run's own files to OUTPUT_DIR/<loop>/.

A whole default-length run (6 epochs) with the real shapes (DiT-large teacher with random weights,
LayoutLMv3-Tiny student at 224 px), float32 and bf16 student:

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py --preset demo \
        --teacher ../shared/models/dit-large-finetuned-rvlcdip --tokenizer ../shared/models/layoutlmv3-base \
        --student-config ../shared/models/layoutlmv3-base --student-image-size 224 \
        --max-samples 96 --epochs 6 --student-amp both --output-dir runs/throughput

A quick check that it runs (the demo preset's built-in small models; about 4 minutes on one busy core):

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --preset demo --max-samples 8 --epochs 2 \
        --student-amp both --output-dir /tmp/throughput

Any main.py flag can be given except --amp (the naive loop is float32; --student-amp sets docdistill's).
"""
import argparse
import dataclasses
import multiprocessing
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from config import parse_config  # noqa: E402

STUDENT_AMP = {"no": ["no"], "bf16": ["bf16"], "both": ["no", "bf16"]}


def loops(base, student_amp):
    """(name, Config) of each run, naive first."""
    runs = [("naive", dict(teacher_cache=False, group_by_length=False, amp="no"))]
    runs += [("docdistill" + ("" if amp == "no" else f"-{amp}"), dict(teacher_cache=True, group_by_length=True, amp=amp))
             for amp in STUDENT_AMP[student_amp]]
    return [(name, dataclasses.replace(base, output_dir=os.path.join(base.output_dir, name), **settings))
            for name, settings in runs]


def preprocess(cfg):
    """Fill the preprocessing cache once, so that no timed run pays for it."""
    from registry import build_task
    utils.setup_logging()
    build_task(cfg)


def teacher_alone(cfg):
    """{precision: seconds} of the teacher's forward over the whole training split, in each precision the cache
    may be filled in here (teacher_cache.candidate_precisions for auto, and float32), after one warm-up batch."""
    import torch
    from torch.utils.data import DataLoader

    import models
    import teacher_cache
    from registry import build_task
    utils.setup_logging()
    task = build_task(cfg)
    teacher = models.freeze(task.teacher)
    loader = DataLoader(task.splits[cfg.train_split], batch_size=cfg.batch_size, collate_fn=task.collator)
    seconds = {}
    for precision in ["float32", *teacher_cache.candidate_precisions("auto", teacher, torch.device("cpu"))]:
        model = models.quantize_int8(teacher) if precision == "int8" else teacher
        batches = list(loader)
        with torch.no_grad():
            teacher_cache.run_teacher(model, task.teacher_outputs, batches[0], precision)  # warm-up
            start = time.perf_counter()
            for batch in batches:
                teacher_cache.run_teacher(model, task.teacher_outputs, batch, precision)
            seconds[precision] = time.perf_counter() - start
    return seconds


def run(cfg, naive):
    """One whole run in this (fresh) process; its per-epoch rows, wall seconds and peak RSS."""
    from registry import build_task
    from train import fit
    utils.setup_logging()
    if cfg.teacher_cache:  # each docdistill run fills the cache itself: its epoch 1 includes that
        shutil.rmtree(os.path.join(cfg.cache_dir, "teacher"), ignore_errors=True)
    utils.seed_everything(cfg.seed)  # the same student initialisation for every run
    task = build_task(cfg)
    if naive:
        task.collator.pad_to = cfg.max_length
    teacher_seconds = [0.0]

    def timed_teacher(teacher, batch):  # on the CPU a forward is synchronous: its wall time is its cost
        start = time.perf_counter()
        try:
            return teacher_outputs(teacher, batch)
        finally:
            teacher_seconds[0] += time.perf_counter() - start

    teacher_outputs, task.teacher_outputs = task.teacher_outputs, timed_teacher  # what fit() asks the teacher
    start = time.perf_counter()
    fit(cfg, task, task.student, task.student_logits)
    wall = time.perf_counter() - start
    rows = utils.read_jsonl(os.path.join(cfg.output_dir, "student_metrics.jsonl"))
    return {"rows": rows, "wall_seconds": wall, "teacher_seconds": teacher_seconds[0],
            "peak_rss_mb": utils.peak_memory_mb()["peak_rss_mb"]}


def summarise(out, naive):
    rows = out["rows"]
    later = rows[1:] or rows
    # Epoch 1's teacher seconds: the naive loop runs the teacher alike every epoch (validation does not: it scores
    # the student), docdistill only while it fills the cache (float32 check and reduced-precision fill).
    teacher = out["teacher_seconds"] / len(rows) if naive else out["teacher_seconds"]
    return {"epochs": len(rows), "epoch1_docs_per_s": rows[0]["train_docs_per_s"],
            "epoch1_seconds": rows[0]["train_seconds"], "epoch1_teacher_seconds": teacher,
            "epoch1_precision_check_seconds": rows[0].get("precision_check_seconds", 0.0),
            "epoch1_cache_fill_seconds": rows[0].get("teacher_cache_seconds", 0.0),
            "later_docs_per_s": sum(r["train_docs_per_s"] for r in later) / len(later),
            "later_epoch_seconds": sum(r["train_seconds"] for r in later) / len(later),
            "train_seconds": sum(r["train_seconds"] for r in rows), "wall_seconds": out["wall_seconds"],
            "wall_seconds_3_epochs": rows[min(3, len(rows)) - 1]["run_seconds"],
            "final_val_accuracy": rows[-1]["val_accuracy"], "best_val_accuracy": max(r["val_accuracy"] for r in rows),
            "peak_rss_mb": out["peak_rss_mb"]}


def ratios(fast, slow):
    """How many times faster `fast` is than `slow`: epoch 1, later epochs, the whole run's wall time."""
    return {"epoch1": fast["epoch1_docs_per_s"] / slow["epoch1_docs_per_s"],
            "later_epochs": fast["later_docs_per_s"] / slow["later_docs_per_s"],
            "three_epochs": slow["wall_seconds_3_epochs"] / fast["wall_seconds_3_epochs"],
            "total": slow["wall_seconds"] / fast["wall_seconds"]}


def table(results):
    lines = ["| loop | epoch 1 docs/s | later epochs docs/s | train s | wall s, 3 epochs | wall s (whole run) | "
             "final val accuracy | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["loops"].items():
        lines.append(f"| {name} | {r['epoch1_docs_per_s']:.2f} | {r['later_docs_per_s']:.2f} | "
                     f"{r['train_seconds']:.0f} | {r['wall_seconds_3_epochs']:.0f} | {r['wall_seconds']:.0f} | "
                     f"{r['final_val_accuracy']:.3f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Where epoch 1 goes (seconds; the naive loop's teacher share is its whole run's teacher time / epochs):",
              "", "| loop | epoch 1 | teacher forward | of which the float32 precision check | whole cache fill (forward, "
              "collation, save) | the rest (student steps, data) |", "|---|---|---|---|---|---|"]
    for name, r in results["loops"].items():
        lines.append(f"| {name} | {r['epoch1_seconds']:.1f} | {r['epoch1_teacher_seconds']:.1f} | "
                     f"{r['epoch1_precision_check_seconds']:.1f} | {r['epoch1_cache_fill_seconds']:.1f} | "
                     f"{r['epoch1_seconds'] - r['epoch1_teacher_seconds']:.1f} |")
    limit = results["limit"]
    lines += ["", "The teacher forward alone over the training pages (seconds): " + ", ".join(
        f"{p} {s:.1f}" for p, s in limit["teacher_seconds"].items()) + f". Epoch 1's limit: the fastest of them "
        f"plus a later epoch's student steps ({limit['student_seconds']:.1f} s) = {limit['seconds']:.1f} s.", ""]
    for name, r in results["loops"].items():
        if name != "naive":
            lines.append(f"- {name}: epoch 1 {r['epoch1_seconds']:.1f} s, {r['epoch1_seconds'] / limit['seconds']:.2f}x"
                         f" the limit")
    for pair, s in results["speedups"].items():
        lines.append(f"- {pair}: {s['epoch1']:.2f}x in epoch 1, {s['later_epochs']:.2f}x in later epochs, "
                     f"{s['three_epochs']:.2f}x over 3 epochs, {s['total']:.2f}x in total wall time")
    lines += ["", f"machine: {results['machine']}"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--student-amp", choices=tuple(STUDENT_AMP), default="no",
                        help="the student's training precision in docdistill's loop: no (float32), bf16, or both "
                             "(two docdistill runs, compared at equal epochs); the naive loop is float32")
    own, rest = parser.parse_known_args(argv)
    if "--amp" in rest or any(a.startswith("--amp=") for a in rest):
        parser.error("--amp: the naive loop is float32; give docdistill's precision with --student-amp")
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nmain.py's flags, all accepted:")
    base = parse_config(rest)
    utils.setup_logging()
    base.cache_dir = base.cache_dir or os.path.join(base.output_dir, "cache")
    runs = loops(base, own.student_amp)
    import demo_corpus
    for corpus in {base.dataset, base.unlabeled} & set(demo_corpus.CORPORA):  # here: pool workers cannot fork
        demo_corpus.load_corpus(corpus, base.cache_dir)
    spawn = multiprocessing.get_context("spawn")  # a fresh process per run: its own peak RSS
    with spawn.Pool(1, maxtasksperchild=1) as pool:
        pool.apply(preprocess, (runs[-1][1],))
    results = {"loops": {}}
    with spawn.Pool(1, maxtasksperchild=1) as pool:
        teacher_seconds = pool.apply(teacher_alone, (runs[-1][1],))
    for name, cfg in runs:
        with spawn.Pool(1, maxtasksperchild=1) as pool:
            results["loops"][name] = summarise(pool.apply(run, (cfg, name == "naive")), name == "naive")
    found = results["loops"]
    student = found[runs[-1][0]]["later_epoch_seconds"]
    results["limit"] = {"teacher_seconds": teacher_seconds, "student_seconds": student,
                        "seconds": min(teacher_seconds.values()) + student}
    results["speedups"] = {f"{name} vs naive": ratios(found[name], found["naive"]) for name in found if name != "naive"}
    if "docdistill-bf16" in found and "docdistill" in found:
        results["speedups"]["docdistill-bf16 vs docdistill (float32 student)"] = ratios(found["docdistill-bf16"],
                                                                                        found["docdistill"])
    results["machine"] = utils.device_info()
    md = table(results)
    utils.atomic_json(results, os.path.join(base.output_dir, "train_throughput.json"))
    utils.atomic_text(md + "\n", os.path.join(base.output_dir, "train_throughput.md"))
    print("\n" + md)


if __name__ == "__main__":
    main()
