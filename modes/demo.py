"""`--mode demo`: the whole job on the built-in generated corpora, in the conditions where distillation pays off.

The teacher knows more than the student for the two reasons a real one does: it is pretrained (MiniLM-L6's
text weights, the one pretrained encoder that installs offline, as DiT-large was pretrained on 42M pages) and it
has seen more labelled pages (demo-teacher: 64 per class); the student starts from random weights with a few
labelled pages (demo: 10 per class) and a pool of unlabelled ones (demo-unlabeled: 64 per class, same distribution),
which only the teacher's soft labels can teach. Steps (each a normal --mode teacher/train run in OUTPUT_DIR/<step>):

    teacher                   --mode teacher on demo-teacher
    alone                     student on the labelled pages, no teacher (alpha 0)
    distilled                 student on the labelled pages, distilled (T 1, alpha 0.9: the demo study's best)
    distilled_unlabeled       student on the labelled + unlabelled pages, distilled (--unlabeled demo-unlabeled)

then every model is scored on the same test pages (demo: 50 per class), with a paired bootstrap interval of
each student's accuracy minus the alone student's, and the table goes to OUTPUT_DIR/demo_results.md and .json.
"""
import dataclasses
import gc
import logging
import multiprocessing
import os
import time

import numpy as np
import torch

import demo_corpus
import models
import recipe
import registry
import scoring
import stats
import train
import utils
from modes.training import run_teacher, run_train

log = logging.getLogger("docdistill")

# The teacher: LayoutLMv3 with MiniLM-L6's pretrained text weights and pooler (6 layers of 384, 22M parameters;
# minilm.py, models.demo_minilm_teacher), reading words and boxes, fine-tuned for two epochs on demo-teacher's
# 1,024 labelled pages. Pretrained as a real teacher is (DiT-large: 42M unlabelled pages, then 320,000 labelled
# ones). Teachers trained from scratch were tried first and did not learn within the budget (README). 16 pages a
# step, as 2 batches of 8 (gradient accumulation): the same steps at half the activation memory (LayoutLMv3's
# attention keeps about a dozen [batch, 12, 128, 128] tensors a layer for its backward pass); with batches of 16
# this fine-tuning, the demo's largest process, peaked at 2.5 GB.
TEACHER = dict(dataset="demo-teacher", teacher="demo-minilm", epochs=2, lr=3e-4, batch_size=8, grad_accum=2)
# The students: the small size (2 layers of 128), random weights, the teacher's tokenizer (as a real student takes
# its teacher's), the same 128 tokens, the page at 64 px. Distilled at T 1, alpha 0.9: the best setting of the
# demo's temperature x alpha study (README "Studies: measured"; T 4 and alpha 0.7, the flags' defaults, were weaker).
STUDENT = dict(student_size="small", tokenizer="minilm", max_length=128, student_image_size=64, lr=1e-3,
               temperature=1.0, alpha=0.9)
# Epochs per student run: the labelled set is 8x smaller than labelled + unlabelled, so it gets more epochs
# (the best epoch on validation is kept in every run).
LABELLED_EPOCHS, UNLABELED_EPOCHS = 20, 8
SEEDS = (42, 43)  # the two rows that matter (alone, distilled with unlabelled pages) run with both
MMAP_THRESHOLD = 4 << 20  # bytes: the worker processes' glibc mmap threshold (run())


def steps(cfg):
    """(name, seed, Config overrides) of each student run, in the order they start, two at a time."""
    unlabeled = [("distilled_unlabeled", seed, dict(unlabeled="demo-unlabeled", epochs=UNLABELED_EPOCHS))
                 for seed in SEEDS]
    alone = [("alone", seed, dict(alpha=0.0, epochs=LABELLED_EPOCHS)) for seed in SEEDS]
    # longest first, so that two slots finish together (the teacher job has cached their teacher logits)
    return [unlabeled[0], alone[0], unlabeled[1], ("distilled", SEEDS[0], dict(epochs=LABELLED_EPOCHS)), alone[1]]


def student_config(cfg, name, seed, overrides):
    """The Config of one student run of steps(cfg), in OUTPUT_DIR/<name>-seed<seed>: STUDENT, then its overrides."""
    run = dataclasses.replace(cfg, mode="train", teacher=os.path.join(cfg.output_dir, "teacher", "teacher"), seed=seed,
                              output_dir=os.path.join(cfg.output_dir, f"{name}-seed{seed}"), **{**STUDENT, **overrides})
    # alone: the teacher is not used; an untrained one of the same kind keeps the same preprocessing
    return run if run.uses_teacher else dataclasses.replace(run, teacher=TEACHER["teacher"])


def score_test(task, model, forward, cfg):
    """The model scored on the test pages (scoring.score): its scores, which pages it got right, and pages per
    second of the whole pass (batching included)."""
    scored = scoring.score(task, model, "test", cfg, forward, desc="test")
    return {**scored.metrics, "correct": (scored.preds == scored.labels).tolist(),
            "pages_per_second": len(scored.labels) / scored.seconds}


def _worker_init():
    """Each student process uses one thread: two single-thread runs side by side use 2 cores better than one
    run on two threads (small models), and do not oversubscribe a machine that other jobs share. (The teacher,
    22M parameters, trains first on every core: 2.2x faster on two threads than on one beside a student.)"""
    torch.set_num_threads(1)
    utils.setup_logging(True)


def teacher_job(cfg, student_cfg):
    """Fine-tune the teacher, score it on the test pages, and cache its logits on the pages of `student_cfg` (a
    distilled run with unlabelled pages: the longest student runs then start training at once)."""
    start = time.perf_counter()
    utils.seed_everything(cfg.seed)  # as main() left it for this run before the teacher had a process of its own
    task = registry.build_task(cfg)
    run_teacher(cfg, task)
    trained = time.perf_counter() - start
    labelled_pages = task.describe(cfg.train_split)["documents"]
    del task  # the fine-tuned teacher is read back from disk below: this one's memory is free for the student task
    gc.collect()
    student_task = registry.build_task(student_cfg)
    teacher = models.freeze(student_task.teacher)
    train.cached_teacher(recipe.make_accelerator(student_cfg), student_task, teacher, student_task.teacher_logits,
                         student_cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # pages/s on one thread, as the students' are measured
    scores = score_test(student_task, teacher, student_task.teacher_logits, student_cfg)
    torch.set_num_threads(threads)
    return {**scores, "parameters": models.count_parameters(teacher), "labelled_pages": labelled_pages,
            "reads": "words and boxes" + (f", page at {teacher.config.input_size} px" if models.reads_page(teacher)
                                           else ""), "test_pages": len(scores["correct"]),
            "shape": f"{teacher.config.num_hidden_layers}x{teacher.config.hidden_size}",
            "train_seconds": trained, "seconds": time.perf_counter() - start}


def student_job(cfg, name):
    """Train one student, then score it on the test pages; returns what the table needs (plain values)."""
    start = time.perf_counter()
    utils.seed_everything(cfg.seed)
    task = registry.build_task(cfg)
    run_train(cfg, task)
    trained = time.perf_counter() - start
    student = models.freeze(registry.load_student(os.path.join(cfg.output_dir, "student_model.pth"), task))
    return {"name": name, "seed": cfg.seed, **score_test(task, student, task.student_logits, cfg),
            "parameters": models.count_parameters(student), "seconds": time.perf_counter() - start,
            "train_seconds": trained, "labelled_pages": task.describe(cfg.train_split)["documents"],
            "unlabeled_pages": task.describe("unlabeled")["documents"] if cfg.unlabeled else 0}


def worker_context():
    """Processes that fork from a server that has imported docdistill once (and has run nothing): they share its
    imported modules' memory (about 400 MB a process: torch, transformers, datasets) instead of importing them
    each, as spawned processes do, and inherit no thread pool or state of this one."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["main"])
    return context


def worker_pool(processes, initializer):
    return worker_context().Pool(processes, initializer=initializer, maxtasksperchild=1)


def generate_corpora(cache_dir):
    """Every corpus of demo_corpus.CORPORA in cache_dir (generated once; later runs reuse them)."""
    for name in demo_corpus.CORPORA:
        demo_corpus.load_corpus(name, cache_dir)


def run(cfg):
    root = cfg.output_dir
    timings, started = {}, time.perf_counter()
    start = time.perf_counter()
    # glibc serves a large block from the heap once a block of its size was freed (its mmap threshold rises to
    # 32 MB), so the attention tensors of batches of changing length fragment the heap and the fine-tuning's RSS
    # keeps what it once held; a fixed 4 MB threshold maps them and gives them back. Read by the processes this
    # one starts, the fork server first, so it is set before that starts (the numbers they compute are the same).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    # In a process of its own (not a pool's: it starts processes of its own to draw the pages in parallel): the
    # memory that generating takes (about 550 MB) goes back to the system with it, not kept by this process.
    generator = worker_context().Process(target=generate_corpora, args=(cfg.cache_dir,))
    generator.start()
    generator.join()
    if generator.exitcode:
        raise RuntimeError(f"generating the demo corpora failed (exit code {generator.exitcode}): see above")
    timings["generate pages (cached between runs)"] = time.perf_counter() - start
    teacher_cfg = dataclasses.replace(cfg, mode="teacher", output_dir=os.path.join(root, "teacher"),
                                      **{**STUDENT, **TEACHER})

    results = {"runs": {}, "timings_s": timings}
    start = time.perf_counter()  # the teacher first, on every core; then the students, one thread each
    first_unlabeled = next(j for j in steps(cfg) if j[0] == "distilled_unlabeled")
    # In a process of its own, as the students are: its memory (fine-tuning is the demo's peak) goes back to the
    # system when it ends instead of staying with this process while the two students train beside it.
    with worker_pool(1, utils.setup_logging) as pool:
        results["teacher"] = pool.apply(teacher_job, (teacher_cfg, student_config(cfg, *first_unlabeled)))
    timings["teacher: training, logits cached, test"] = time.perf_counter() - start
    with worker_pool(2, _worker_init) as pool:
        start = time.perf_counter()
        pending = [pool.apply_async(student_job, (student_config(cfg, *j), j[0])) for j in steps(cfg)]
        for job in pending:
            out = job.get()
            results["runs"][f"{out['name']} (seed {out['seed']})"] = out
        timings["students: training and test, 2 at a time"] = time.perf_counter() - start
    for out in results["runs"].values():
        timings[f"{out['name']} (seed {out['seed']})"] = out["seconds"]
    results["test_pages"] = results["teacher"]["test_pages"]

    correct = {(r["name"], r["seed"]): np.asarray(r["correct"]) for r in results["runs"].values()}
    alone_mean = np.mean([correct[("alone", s)] for s in SEEDS], axis=0)  # per page, averaged over the seeds
    results["spread"] = {}
    for name in ("distilled_unlabeled", "distilled", "teacher"):
        seeds = [s for s in SEEDS if (name, s) in correct] if name != "teacher" else list(SEEDS)
        mine = np.asarray(results["teacher"]["correct"]) if name == "teacher" else \
            np.mean([correct[(name, s)] for s in seeds], axis=0)
        base = alone_mean if len(seeds) == len(SEEDS) else correct[("alone", seeds[0])]
        results["spread"][name] = {**stats.paired_bootstrap(base, mine), "seeds": seeds}
    timings["total"] = time.perf_counter() - started
    table = demo_table(results)
    print("\n" + table)
    utils.atomic_text(table + "\n", os.path.join(root, "demo_results.md"))
    utils.atomic_json(results, os.path.join(root, "demo_results.json"))
    return 0


def demo_table(results):
    """The comparison on the same test pages, as markdown."""
    runs, teacher = results["runs"], results["teacher"]

    def row(name):
        found = [r for r in runs.values() if r["name"] == name]
        accs = [r["accuracy"] for r in found]
        acc = f"{np.mean(accs):.3f}" + (f" ({', '.join(f'{a:.3f}' for a in accs)})" if len(accs) > 1 else "")
        return found[0], acc, np.mean([r["macro_f1"] for r in found])

    lines = [f"test split: {results['test_pages']} pages, GENERATED (the demo's corpus, not real scans; the same for "
             f"every model). On real RVL-CDIP scans: docs/results/real-pages.md", "",
             "| model | labelled pages | unlabelled pages | test accuracy | macro F1 | parameters | pages/s |",
             "|---|---|---|---|---|---|---|",
             f"| teacher (LayoutLMv3 {teacher['shape']}, MiniLM-L6 text weights; {teacher['reads']}) | "
             f"{teacher['labelled_pages']} | - | "
             f"{teacher['accuracy']:.3f} | {teacher['macro_f1']:.3f} | {teacher['parameters'] / 1e6:.2f}M | "
             f"{teacher['pages_per_second']:.0f} |"]
    titles = {"alone": "student alone (alpha 0)", "distilled": "student distilled, labelled pages only",
              "distilled_unlabeled": "student distilled, labelled + unlabelled pages"}
    for name, title in titles.items():
        r, acc, f1 = row(name)
        lines.append(f"| {title} (2x128, random weights; words, boxes, page at 64 px) | {r['labelled_pages']} | {r['unlabeled_pages'] or '-'} | {acc} | {f1:.3f} | "
                     f"{r['parameters'] / 1e6:.2f}M | {r['pages_per_second']:.0f} |")
    lines += ["", "Accuracy with two seeds is their mean (each seed in brackets). Difference to the student alone, "
              f"paired bootstrap over the test pages ({stats.RESAMPLES} resamples, 95% interval):", ""]
    for name, title in (("distilled_unlabeled", titles["distilled_unlabeled"]), ("distilled", titles["distilled"]),
                        ("teacher", "teacher")):
        s = results["spread"][name]
        lines.append(f"- {title}: {100 * s['difference']:+.1f} points [{100 * s['low']:+.1f}, {100 * s['high']:+.1f}]"
                     f" (seeds {', '.join(map(str, s['seeds']))})")
    lines += ["", "Pages/s: one pass over the test pages, batch size as in training, one thread (the teacher "
              "alone on the machine, each student beside another single-thread run).", "", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items())]
    return "\n".join(lines)
