"""The demo's distilled student with its teacher cache filled in each precision: is its accuracy the same?

Speed III lets `--teacher-precision auto` fill the teacher cache in bf16 or int8 where either is faster and passes
the KL check. This trains the demo's best student (labelled + unlabelled pages, T 1, alpha 0.9: modes/demo.py
STUDENT) from the demo's fine-tuned teacher once per precision and seed, each precision's cache filled anew,
scores every student on the 800 test pages, and compares each precision with float32 (paired bootstrap over the
test pages, the seeds' per-page correctness averaged). Needs a finished `make demo` (its teacher and corpora).

    python benchmarks/teacher_precision.py --demo runs/demo --out runs/teacher-precision

Writes OUT/teacher_precision.md and .json; each run's files in OUT/<precision>-seed<seed>/.
"""
import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from config import parse_config  # noqa: E402


def student_run(demo, out, precision, seed):
    """Train and score one student (a fresh process: its own threads and memory); its test scores and log."""
    import torch

    import models
    import registry
    import teacher_cache
    import train
    from modes import demo as demo_mode
    from modes.training import run_train
    torch.set_num_threads(1)
    utils.setup_logging()
    base = parse_config(["--preset", "demo", "--mode", "demo", "--output-dir", demo])
    base.cache_dir = os.path.join(os.path.dirname(os.path.abspath(demo)), "cache")
    cfg = demo_mode.student_config(base, "distilled_unlabeled", seed,
                                   dict(unlabeled="demo-unlabeled", epochs=demo_mode.UNLABELED_EPOCHS))
    cfg = dataclasses.replace(cfg, output_dir=os.path.join(out, f"{precision}-seed{seed}"),
                              cache_dir=os.path.join(out, "cache", precision), teacher_precision=precision,
                              overwrite=True)
    os.makedirs(cfg.cache_dir, exist_ok=True)
    for name in os.listdir(base.cache_dir):  # the corpora and their preprocessing; not the teacher caches
        target = os.path.join(cfg.cache_dir, name)
        if name != "teacher" and not os.path.exists(target):
            os.symlink(os.path.abspath(os.path.join(base.cache_dir, name)), target)
    utils.seed_everything(seed)
    task = registry.build_task(cfg)
    start = time.perf_counter()
    run_train(cfg, task)
    student = models.freeze(registry.load_student(os.path.join(cfg.output_dir, "student_model.pth"), task))
    scores = demo_mode.score_test(task, student, task.student_logits, cfg)
    used = sorted(f for f in os.listdir(os.path.join(cfg.cache_dir, "teacher")) if f.endswith(".safetensors"))
    key = {p: teacher_cache.cache_key(models.freeze(task.teacher), task.splits[cfg.train_split],
                                      train.cache_extra(cfg, task, task.teacher), p)
           for p in ("float32", "bf16", "int8")}
    filled = [p for p, k in key.items() if k + ".safetensors" in used]
    return {"precision": precision, "seed": seed, "accuracy": scores["accuracy"], "correct": scores["correct"],
            "seconds": time.perf_counter() - start, "cache_precision": filled}


def main(argv=None):
    import stats
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished demo's OUTPUT_DIR (its teacher/teacher)")
    parser.add_argument("--out", default="runs/teacher-precision", help="where the runs and the table go")
    parser.add_argument("--precisions", default="float32,bf16,int8", help="comma-separated, float32 first")
    parser.add_argument("--seeds", default="42,43", help="comma-separated seeds")
    parser.add_argument("--processes", type=int, default=2, help="runs side by side, one thread each")
    args = parser.parse_args(argv)
    precisions, seeds = args.precisions.split(","), [int(s) for s in args.seeds.split(",")]
    shutil.rmtree(os.path.join(args.out, "cache"), ignore_errors=True)  # each precision's cache filled anew
    jobs = [(args.demo, args.out, p, s) for p in precisions for s in seeds]
    with multiprocessing.get_context("spawn").Pool(args.processes, maxtasksperchild=1) as pool:
        runs = pool.starmap(student_run, jobs)
    by = {(r["precision"], r["seed"]): r for r in runs}
    lines = ["| teacher cache | test accuracy (seeds " + ", ".join(map(str, seeds)) + ") | mean | against float32, "
             "paired bootstrap 95% |", "|---|---|---|---|"]
    reference = np.mean([by[(precisions[0], s)]["correct"] for s in seeds], axis=0)
    for p in precisions:
        accs = [by[(p, s)]["accuracy"] for s in seeds]
        mine = np.mean([by[(p, s)]["correct"] for s in seeds], axis=0)
        gap = stats.paired_bootstrap(reference, mine) if p != precisions[0] else None
        filled = sorted({c for s in seeds for c in by[(p, s)]["cache_precision"]})
        lines.append(f"| {p} (filled in {', '.join(filled)}) | {', '.join(f'{a:.3f}' for a in accs)} | "
                     f"{np.mean(accs):.3f} | " + (f"{100 * gap['difference']:+.1f} points [{100 * gap['low']:+.1f}, "
                                                  f"{100 * gap['high']:+.1f}]" if gap else "-") + " |")
    lines += ["", f"machine: {json.dumps(utils.device_info())}"]
    table = "\n".join(lines)
    utils.atomic_text(table + "\n", os.path.join(args.out, "teacher_precision.md"))
    utils.atomic_json({"runs": runs, "machine": utils.device_info()}, os.path.join(args.out, "teacher_precision.json"))
    print(table)


if __name__ == "__main__":
    main()
