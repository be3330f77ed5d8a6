"""Real-page benchmark: docdistill's page classification on real RVL-CDIP scans (issue #23, "Real pages").

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/real_pages.py --shared ../shared --out /work/real-pages/run

It does what a user with their own class folders would do, every step an ordinary `python main.py` command run
as a subprocess (its log in OUT/logs/):

1. data      a seeded split of SHARED/data/rvlcdip-sample/<class>/*.jpg per class, materialised as folders of class
             folders (symlinks to the shared images) that `datasets`' imagefolder reads with split folders:
             OUT/data/teacher/{train,validation}/<class>/, OUT/data/student/{train,validation,test}/<class>/,
             OUT/data/unlabeled/<class>/ (its class folders are read, its labels never: --unlabeled drops them).
             The teacher and the students share the validation pages; the test pages choose nothing.
2. ocr       OCR once: OUT/cache/ocr is filled with a copy of --ocr-cache (docdistill's per-page Tesseract cache,
             keyed by the decoded pixels), so no page is OCR'd again; the count of entries is checked after the runs.
3. info      --mode info on the student's data at --max-length: words per page, pages without words, truncation.
4. teachers  --mode teacher: demo-minilm (MiniLM-L6's pretrained text weights in a LayoutLMv3, words and boxes)
             fine-tuned on the teacher pages; with --transfer also the demo's teacher (trained on generated pages)
             fine-tuned the same way. The one with the better validation accuracy teaches the students.
5. students  --mode train, LayoutLMv3 from random weights: alone (--alpha 0) on the labelled pages and distilled
             (--alpha, --temperature) on labelled + unlabelled pages (--unlabeled OUT/data/unlabeled), each with
             every --seeds, the same number of optimizer steps on both sides (--student-steps); with --transfer
             the same two from the demo's distilled student (--student-config DIR --student-size full); with
             --pretrained-student-layers N the same two from the teacher's first N layers (teacher_layers); with
             --more-unlabeled also distilled with the teacher's training pages added to the unlabelled pool.
6. eval      --mode eval --eval-split test of every student (eval.json: accuracy, the teacher beside it, pages/s).
7. score     per-page correctness on the test pages of every model (the saved student read by
             registry.load_student and scored by scoring.score, as eval does; the teachers the same way), checked
             against eval.json; paired bootstrap intervals (stats.paired_bootstrap) of the gains.
8. bench     --mode bench of the first distilled student (latency per page at batch 1, one thread).
9. predict   --mode predict --input OUT/data/student/test with the first distilled student: predictions.jsonl
             compared with the scored predictions, and how many pages predict OCR'd again.
10. analysis what real scans need: pages without OCR words, pages Tesseract's OSD finds rotated, truncation, and
             the accuracy of each model on those groups; a bag-of-words reference (scikit-learn).
11. report   OUT/results.json (everything) and OUT/results.md (the tables).

A step whose outputs exist is not run again (rerun the command to resume; --redo STEP to redo one). --smoke makes
a small end-to-end check (few pages and epochs) in OUT.
"""
import argparse
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("data", "ocr", "info", "teachers", "students", "eval", "score", "bench", "predict", "analysis", "report")
SPLIT_NAMES = ("teacher_train", "labelled", "unlabeled", "validation", "test")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and outputs")
    g.add_argument("--shared", default=os.path.join(REPO, "..", "shared"),
                   help="the shared folder; its data/rvlcdip-sample/<class>/*.jpg are the pages (default: %(default)s)")
    g.add_argument("--out", default=os.path.join(REPO, "..", "docdistill-real-pages"),
                   help="where the split, the runs, the logs and the results go; never inside the repository "
                        "(default: %(default)s)")
    g.add_argument("--ocr-cache", default="",
                   help="a docdistill OCR cache (CACHE_DIR/ocr) holding these pages, copied into OUT/cache/ocr so "
                        "no page is OCR'd again; '' = OCR what is missing (default: %(default)s)")
    g.add_argument("--split-seed", type=int, default=42,
                   help="seed of the per-class shuffle that makes the split (default: %(default)s)")
    g.add_argument("--split", default="32,8,16,8,16",
                   help="pages per class for: the teacher's training, the student's labelled pages, the unlabelled "
                        "pages, validation (shared by teacher and students), test (default: %(default)s)")
    g = p.add_argument_group("models and training")
    g.add_argument("--max-length", type=int, default=128,
                   help="token limit of teacher and student (MiniLM's WordPiece with word boxes) (default: %(default)s)")
    g.add_argument("--teacher-epochs", type=int, default=6, help="teacher fine-tuning epochs (default: %(default)s)")
    g.add_argument("--teacher-lr", type=float, default=3e-4, help="teacher peak learning rate (default: %(default)s)")
    g.add_argument("--student-size", default="small", help="--student-size of the students (default: %(default)s)")
    g.add_argument("--student-image-size", type=int, default=64,
                   help="--student-image-size: the side of the page the student sees (default: %(default)s)")
    g.add_argument("--student-lr", type=float, default=1e-3, help="student peak learning rate (default: %(default)s)")
    g.add_argument("--student-steps", default="480",
                   help="optimizer steps of every student run, alone or distilled alike: epochs = steps / batches "
                        "per epoch, rounded (the best epoch on validation is kept); several comma-separated budgets "
                        "run the alone and distilled rows at each (the transfer rows at the first) (default: "
                        "%(default)s)")
    g.add_argument("--batch-size", type=int, default=8, help="student batch size (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=0.9, help="distilled students' --alpha (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="distilled students' --temperature (default: %(default)s)")
    g.add_argument("--seeds", default="42,43,44", help="seeds of every student row (default: %(default)s)")
    g.add_argument("--transfer", action=argparse.BooleanOptionalAction, default=True,
                   help="also start a teacher and students from the demo's models trained on generated pages "
                        "(--demo-run) and compare, same budget (default: %(default)s)")
    g.add_argument("--demo-run", default=os.path.join(REPO, "runs", "demo"),
                   help="a `make demo` run: its teacher/teacher and distilled_unlabeled-seed42/student are the "
                        "transfer starting points (default: %(default)s)")
    g.add_argument("--more-unlabeled", action=argparse.BooleanOptionalAction, default=True,
                   help="also distil with the teacher's training pages added to the unlabelled pool (more "
                        "unlabelled pages; their labels are not read) (default: %(default)s)")
    g.add_argument("--pretrained-student-layers", type=int, default=2,
                   help="also train students (alone and distilled, same budget) that start from the first N layers "
                        "of the students' teacher; 0 = not (default: %(default)s)")
    g.add_argument("--pretrained-student-lr", type=float, default=1e-4,
                   help="their peak learning rate (they start from fine-tuned weights) (default: %(default)s)")
    g = p.add_argument_group("running")
    g.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python") if
                   os.path.exists(os.path.join(REPO, ".venv", "bin", "python")) else sys.executable,
                   help="the interpreter that runs main.py (default: %(default)s)")
    g.add_argument("--jobs", type=int, default=2,
                   help="student runs at a time, one thread each (default: %(default)s)")
    g.add_argument("--teacher-threads", type=int, default=2,
                   help="threads of a teacher's fine-tuning, which runs alone (default: %(default)s)")
    g.add_argument("--steps", default=",".join(STEPS),
                   help=f"steps to run, comma-separated, in this order: {', '.join(STEPS)} (default: all)")
    g.add_argument("--redo", default="",
                   help="steps to run again even where their outputs exist, comma-separated (default: none)")
    g.add_argument("--osd-pages", default="test", choices=("test", "all", "none"),
                   help="pages Tesseract's orientation detection (OSD) reads in the analysis step (default: %(default)s)")
    g.add_argument("--predict-pages", type=int, default=4,
                   help="test pages per class that --mode predict reads in the predict step (it OCRs them again: "
                        "see the results page) (default: %(default)s)")
    g.add_argument("--smoke", action="store_true",
                   help="a small end-to-end check: 4 pages per split and class, 1 teacher epoch, 8 student steps, "
                        "one seed")
    args = p.parse_args(argv)
    args.split = [int(x) for x in args.split.split(",")]
    if len(args.split) != 5:
        p.error("--split needs 5 numbers")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.student_steps = [int(x) for x in str(args.student_steps).split(",")]
    args.steps = [s for s in args.steps.split(",") if s]
    args.redo = [s for s in args.redo.split(",") if s]
    for s in args.steps + args.redo:
        if s not in STEPS:
            p.error(f"unknown step {s!r}: choose from {', '.join(STEPS)}")
    if args.smoke:
        args.split, args.teacher_epochs, args.student_steps, args.seeds = [4, 2, 2, 2, 2], 1, [8], args.seeds[:1]
    if args.transfer and not os.path.isdir(os.path.join(args.demo_run, "teacher", "teacher")):
        print(f"no demo run in {args.demo_run} (`make demo` makes one): the transfer rows are left out", flush=True)
        args.transfer = False
    args.out = os.path.abspath(args.out)
    if os.path.abspath(args.out).startswith(REPO + os.sep):
        p.error("--out must be outside the repository (the pages may not be copied into it)")
    return args


# ----------------------------------------------------------------------------- helpers

START = time.time()


def cpu_seconds():
    """User + system CPU seconds of this process and of every child it has waited for (main.py runs, Tesseract)."""
    import resource
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def say(*parts):
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - START:6.0f}s]", *parts, flush=True)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class Runner:
    """Runs `python main.py ...` commands as subprocesses, up to `jobs` at a time, each logged to OUT/logs."""

    def __init__(self, args, state):
        self.args = args
        self.logs = os.path.join(args.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.seconds = state.setdefault("command_seconds", {})  # name -> wall seconds of its command
        self.commands = state.setdefault("commands", {})  # name -> the command line
        self.cpu = state.setdefault("command_cpu_seconds", {})  # name -> user + system CPU seconds

    def env(self, threads):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads))
        return env

    def command(self, flags):
        return [self.args.python, "main.py", *[str(f) for f in flags]]

    def run_all(self, jobs, parallel, threads):
        """jobs: [(name, flags)]; run `parallel` at a time with `threads` threads each; stop on a failure."""
        pending, running, failed = list(jobs), [], []
        while pending or running:
            while pending and len(running) < parallel:
                name, flags = pending.pop(0)
                cmd = self.command(flags)
                self.commands[name] = " ".join(cmd[1:])
                log = open(os.path.join(self.logs, f"{name}.log"), "w")
                log.write("$ " + " ".join(cmd) + "\n")
                log.flush()
                say(f"start {name} ({threads} thread{'s' if threads > 1 else ''}): {' '.join(cmd[1:])}")
                proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(threads), stdout=log, stderr=subprocess.STDOUT)
                running.append((name, proc, log, time.time()))
            time.sleep(2)
            for item in list(running):
                name, proc, log, started = item
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # its CPU seconds, which a busy machine
                if pid == 0:  # inflates less than its wall seconds
                    continue
                proc.returncode = os.waitstatus_to_exitcode(status)
                running.remove(item)
                log.close()
                self.seconds[name] = time.time() - started
                self.cpu[name] = usage.ru_utime + usage.ru_stime
                if proc.returncode != 0:
                    failed.append(name)
                    say(f"FAILED {name} (exit {proc.returncode}); the end of {self.logs}/{name}.log:")
                    print("".join(open(os.path.join(self.logs, f"{name}.log")).readlines()[-15:]), flush=True)
                else:
                    say(f"done {name} in {self.seconds[name]:.0f}s ({self.cpu[name]:.0f} CPU s)")
        if failed:
            raise SystemExit(f"failed: {', '.join(failed)} (logs in {self.logs})")


# ----------------------------------------------------------------------------- 1. data

def make_split(args):
    """{split: {class: [absolute paths]}}: each class's pages shuffled with --split-seed, then cut by --split."""
    root = os.path.join(args.shared, "data", "rvlcdip-sample")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise SystemExit(f"no class folders in {root}")
    split = {name: {} for name in SPLIT_NAMES + ("predict_sample",)}
    for cls in classes:
        files = sorted(os.path.abspath(f) for f in glob.glob(os.path.join(root, cls, "*")) if not
                       os.path.basename(f).startswith("."))
        random.Random(f"{args.split_seed}:{cls}").shuffle(files)
        if len(files) < sum(args.split):
            raise SystemExit(f"{cls}: {len(files)} pages, fewer than the {sum(args.split)} the split needs")
        start = 0
        for name, n in zip(SPLIT_NAMES, args.split):
            split[name][cls] = sorted(files[start:start + n])
            start += n
        split["predict_sample"][cls] = split["test"][cls][:args.predict_pages]
    return classes, split


def folders(args):
    """Where each docdistill dataset lives, and which split-of-the-split fills which of its folders."""
    data = os.path.join(args.out, "data")
    return data, {
        os.path.join(data, "teacher", "train"): ["teacher_train"],
        os.path.join(data, "teacher", "validation"): ["validation"],
        os.path.join(data, "student", "train"): ["labelled"],
        os.path.join(data, "student", "validation"): ["validation"],
        os.path.join(data, "student", "test"): ["test"],
        os.path.join(data, "unlabeled"): ["unlabeled"],
        os.path.join(data, "unlabeled-more"): ["unlabeled", "teacher_train"],
        os.path.join(data, "predict-sample"): ["predict_sample"],
    }


def step_data(args, state):
    classes, split = make_split(args)
    data, layout = folders(args)
    if os.path.isdir(data):
        shutil.rmtree(data)
    for folder, parts in layout.items():
        for cls in classes:
            os.makedirs(os.path.join(folder, cls))
            for part in parts:
                for f in split[part][cls]:
                    os.symlink(f, os.path.join(folder, cls, os.path.basename(f)))
    write_json({"seed": args.split_seed, "per_class": dict(zip(SPLIT_NAMES, args.split)), "classes": classes,
                "files": split}, os.path.join(data, "split.json"))
    say(f"split: {len(classes)} classes x {dict(zip(SPLIT_NAMES, args.split))} pages (seed {args.split_seed}) "
        f"-> {data}")
    check_imagefolder(args, classes)


def check_imagefolder(args, classes):
    """Load each folder the way docdistill does (dataset.load_source -> imagefolder) and check splits and labels."""
    sys.path.insert(0, REPO)
    import dataset  # noqa: E402 (docdistill, for its loader)
    split = read_json(os.path.join(args.out, "data", "split.json"))
    n = dict(zip(SPLIT_NAMES, args.split))
    expect = {"teacher": {"train": n["teacher_train"], "validation": n["validation"]},
              "student": {"train": n["labelled"], "validation": n["validation"], "test": n["test"]},
              "unlabeled": {"train": n["unlabeled"]},
              "unlabeled-more": {"train": n["unlabeled"] + n["teacher_train"]}}
    for name, splits in expect.items():
        loaded = dataset.load_source(os.path.join(args.out, "data", name), os.path.join(args.out, "cache"))
        got = {k: len(v) for k, v in loaded.items()}
        want = {k: v * len(classes) for k, v in splits.items()}
        names = loaded[next(iter(loaded))].features["label"].names
        if got != want or names != classes:
            raise SystemExit(f"imagefolder read {name} as {got} with classes {names}, expected {want}, {classes}")
        for k, v in loaded.items():  # each page under its own class
            counts = {c: 0 for c in classes}
            for label in v["label"]:
                counts[classes[label]] += 1
            if set(counts.values()) != {splits[k]}:
                raise SystemExit(f"{name}/{k}: pages per class {counts}, expected {splits[k]} each")
        say(f"imagefolder reads data/{name}: {got}, {len(names)} classes, {list(splits.values())} pages per class")
    del split


# ----------------------------------------------------------------------------- 2. OCR cache

def ocr_dir(args):
    return os.path.join(args.out, "cache", "ocr")


def count_ocr(args):
    return len(glob.glob(os.path.join(ocr_dir(args), "*.json")))


def step_ocr(args, state):
    os.makedirs(ocr_dir(args), exist_ok=True)
    copied = 0
    if args.ocr_cache:
        for f in glob.glob(os.path.join(args.ocr_cache, "*.json")):
            target = os.path.join(ocr_dir(args), os.path.basename(f))
            if not os.path.exists(target):
                shutil.copyfile(f, target)
                copied += 1
    state["ocr_entries_before_runs"] = count_ocr(args)
    say(f"OCR cache {ocr_dir(args)}: {copied} entries copied from {args.ocr_cache}, "
        f"{state['ocr_entries_before_runs']} in all")


# ----------------------------------------------------------------------------- the flags of every run

def common(args):
    return ["--cache-dir", os.path.join(args.out, "cache"), "--num-proc", 1, "--tokenizer", "minilm",
            "--max-length", args.max_length, "--student-config", "builtin:layoutlmv3-base",
            "--student-size", args.student_size, "--student-image-size", args.student_image_size]


def data_path(args, name):
    return os.path.join(args.out, "data", name)


def run_dir(args, name):
    return os.path.join(args.out, "runs", name)


def teacher_runs(args):
    """name -> --teacher to fine-tune."""
    runs = {"teacher": "demo-minilm"}
    if args.transfer:
        runs["teacher-from-demo"] = os.path.join(args.demo_run, "teacher", "teacher")
    return runs


def step_info(args, state, runner):
    out = run_dir(args, "info")
    flags = ["--mode", "info", "--dataset", data_path(args, "student"), "--teacher", "demo-minilm",
             "--output-dir", out, *common(args)]
    runner.run_all([("info", flags)], 1, 1)
    text = open(os.path.join(runner.logs, "info.log")).read()
    blocks = {}
    for name, body in re.findall(r"^\[(\w+)\]\n(\{.*?^\})", text, flags=re.S | re.M):
        blocks[name] = json.loads(body)
    write_json(blocks, os.path.join(out, "info.json"))
    for name, b in blocks.items():
        w = b["words_per_document"]
        say(f"info {name}: {b['documents']} pages, words/page mean {w['mean']:.0f} median {w['median']:.0f} max "
            f"{w['max']}, {w['zero']} without words, {100 * b['truncated_share']:.0f}% truncated at "
            f"{args.max_length} tokens")


def teacher_flags(args, name, source):
    return ["--mode", "teacher", "--dataset", data_path(args, "teacher"), "--teacher", source,
            "--epochs", args.teacher_epochs, "--lr", args.teacher_lr, "--batch-size", 8, "--grad-accum", 2,
            "--seed", 42, "--output-dir", run_dir(args, name), *common(args)]


def step_teachers(args, state, runner):
    jobs = [(name, teacher_flags(args, name, source)) for name, source in teacher_runs(args).items()
            if "teachers" in args.redo or not os.path.exists(os.path.join(run_dir(args, name), "teacher",
                                                                          "config.json"))]
    if jobs and "teachers" in args.redo:
        jobs = [(n, f + ["--overwrite"]) for n, f in jobs]
    runner.run_all(jobs, 1, args.teacher_threads)
    state["teachers"] = {}
    for name in teacher_runs(args):
        rows = [json.loads(line) for line in open(os.path.join(run_dir(args, name), "teacher_metrics.jsonl"))]
        best = max(rows, key=lambda r: r.get("val_accuracy", -1))  # the first best epoch is the one kept
        state["teachers"][name] = {"validation_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
                                   "epochs": [{k: r[k] for k in ("epoch", "train_loss", "train_accuracy",
                                                                 "val_accuracy", "train_seconds")} for r in rows]}
        say(f"{name}: best validation accuracy {best['val_accuracy']:.3f} (epoch {best['epoch']} of {len(rows)})")
    chosen = max(state["teachers"], key=lambda n: state["teachers"][n]["validation_accuracy"])
    state["chosen_teacher"] = chosen
    say(f"the students' teacher: {chosen} (best on validation)")


def epochs_for(args, pages, steps):
    """Epochs that give about `steps` optimizer steps on `pages` training pages."""
    per_epoch = -(-pages // args.batch_size)
    return max(1, round(steps / per_epoch))


def teacher_layers(args, teacher):
    """A student that starts from the first --pretrained-student-layers layers of the students' teacher (as
    DistilBERT starts from BERT's; its head too, the same labels) and reads the page as the other students do (a
    fresh patch embedding at --student-image-size): OUT/transfer-init/teacher-N-layers, a copy of the teacher's
    directory whose config.json keeps N layers, given to `--student-config DIR --student-size full`."""
    target = os.path.join(args.out, "transfer-init", f"teacher-{args.pretrained_student_layers}-layers")
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(teacher):
        if name not in ("config.json", "checksums.json", "README.md"):
            shutil.copyfile(os.path.join(teacher, name), os.path.join(target, name))
    config = read_json(os.path.join(teacher, "config.json"))
    config.update(num_hidden_layers=args.pretrained_student_layers, visual_embed=True,
                  input_size=args.student_image_size)
    write_json(config, os.path.join(target, "config.json"))
    return target


def student_runs(args, state):
    """[(name, row, seed, flags, evaluated)] of every student run; evaluated: scored with --mode eval too."""
    n = dict(zip(SPLIT_NAMES, args.split))
    classes = read_json(os.path.join(args.out, "data", "split.json"))["classes"]
    labelled, unlabeled = n["labelled"] * len(classes), n["unlabeled"] * len(classes)
    teacher = os.path.join(run_dir(args, state["chosen_teacher"]), "teacher")
    rows = {"alone": ([], labelled, 0), "distilled": (["--unlabeled", data_path(args, "unlabeled")], labelled + unlabeled,
                                                      args.alpha)}
    if args.more_unlabeled:
        rows["distilled-more-unlabeled"] = (["--unlabeled", data_path(args, "unlabeled-more")],
                                            labelled + unlabeled + n["teacher_train"] * len(classes), args.alpha)
    runs = []
    first = args.student_steps[0]
    for steps in args.student_steps:
        tag = "" if steps == first else f"-{steps}steps"  # the first budget's runs keep the plain names
        for seed in args.seeds:
            for row, (extra, pages, alpha) in rows.items():
                runs.append((f"{row}{tag}-seed{seed}", row + tag, seed, extra, pages, alpha, [], True, steps))
                if args.transfer and row in ("alone", "distilled") and steps == first:
                    demo_student = os.path.join(args.demo_run, "distilled_unlabeled-seed42", "student")
                    init = ["--student-config", demo_student, "--student-size", "full"]  # head rows matched by name
                    runs.append((f"transfer-{row}-seed{seed}", f"transfer-{row}", seed, extra, pages, alpha, init,
                                 True, steps))
                if args.pretrained_student_layers and row in ("alone", "distilled") and steps == first:
                    init = ["--student-config", teacher_layers(args, teacher), "--student-size", "full",
                            "--lr", args.pretrained_student_lr]  # the last --lr given is the one used
                    runs.append((f"pretrained-{row}-seed{seed}", f"pretrained-{row}", seed, extra, pages, alpha,
                                 init, True, steps))
    out = []
    for name, row, seed, extra, pages, alpha, init, evaluated, steps in runs:
        flags = ["--mode", "train", "--dataset", data_path(args, "student"), "--teacher", teacher, *extra,
                 "--alpha", alpha, "--temperature", args.temperature, "--lr", args.student_lr,
                 "--batch-size", args.batch_size, "--epochs", epochs_for(args, pages, steps), "--seed", seed,
                 "--output-dir", run_dir(args, name), *common(args), *init]
        out.append((name, row, seed, flags, evaluated))
    return out


def step_students(args, state, runner):
    runs = student_runs(args, state)
    # the distilled runs first (the first of each pool fills the teacher cache at its start), the largest pool first
    runs.sort(key=lambda r: (not r[1].startswith(("distilled", "transfer-distilled")), "more" not in r[1], r[0]))
    redo = "students" in args.redo
    jobs = [(name, flags + (["--overwrite"] if redo else [])) for name, row, seed, flags, _ in runs
            if redo or not os.path.exists(os.path.join(run_dir(args, name), "student_model.pth"))]
    runner.run_all(jobs, args.jobs, 1)
    state["students"] = {name: {"row": row, "seed": seed, "epochs": int(flags[flags.index("--epochs") + 1]),
                                "evaluated": evaluated}
                         for name, row, seed, flags, evaluated in runs}
    for name in state["students"]:
        rows = [json.loads(line) for line in open(os.path.join(run_dir(args, name), "student_metrics.jsonl"))]
        best = max(rows, key=lambda r: r["val_accuracy"])
        state["students"][name]["validation_accuracy"] = best["val_accuracy"]
        state["students"][name]["best_epoch"] = best["epoch"]
        state["students"][name]["train_seconds"] = sum(r["train_seconds"] for r in rows)


def step_eval(args, state, runner):
    redo = "eval" in args.redo
    jobs = []
    for name, info in state["students"].items():
        if info["evaluated"] and (redo or not os.path.exists(os.path.join(run_dir(args, name), "eval.json"))):
            jobs.append((f"eval-{name}", ["--mode", "eval", "--dataset", data_path(args, "student"), "--eval-split",
                                          "test", "--output-dir", run_dir(args, name), "--cache-dir",
                                          os.path.join(args.out, "cache"), "--num-proc", 1]))
    runner.run_all(jobs, args.jobs, 1)
    for name, info in state["students"].items():
        if not info["evaluated"]:
            continue
        e = read_json(os.path.join(run_dir(args, name), "eval.json"))
        info["eval"] = {k: e[k] for k in ("accuracy", "macro_f1", "documents", "teacher_accuracy", "teacher_agreement",
                                          "student_parameters", "teacher_parameters",
                                          "student_documents_per_second", "teacher_documents_per_second")}
        say(f"eval {name}: test accuracy {e['accuracy']:.3f} (teacher {e['teacher_accuracy']:.3f}), "
            f"{e['student_documents_per_second']:.1f} pages/s against the teacher's "
            f"{e['teacher_documents_per_second']:.1f}")


# ----------------------------------------------------------------------------- 7. per-page scores

def step_score(args, state):
    """Per-page predictions on the test pages: each saved student as eval reads it (registry.load_student,
    scoring.score), each teacher the same way; written to OUT/scores.json."""
    path = os.path.join(args.out, "scores.json")
    scores = {"models": {}}
    if os.path.exists(path) and "score" not in args.redo:  # score only the models not scored yet
        scores = read_json(path)
        if set(state["students"]) | set(teacher_runs(args)) <= set(scores["models"]):
            state["scores"] = scores
            say(f"scores: read {path}")
            return
    sys.path.insert(0, REPO)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets  # noqa: E402
    import torch  # noqa: E402
    torch.set_num_threads(1)
    import config  # noqa: E402 (docdistill)
    import models  # noqa: E402
    import registry  # noqa: E402
    import saved  # noqa: E402
    import scoring  # noqa: E402
    import utils  # noqa: E402
    utils.setup_logging(True)
    cache = os.path.join(args.out, "cache")
    task = None
    for name in state["students"]:
        if name in scores["models"]:
            continue
        out = run_dir(args, name)
        model = os.path.join(out, "student_model.pth")
        cfg = config.parse_config(["--mode", "eval", "--dataset", data_path(args, "student"), "--eval-split", "test",
                                   "--output-dir", out, "--cache-dir", cache, "--num-proc", "1"])
        task = registry.build_task(cfg, model_labels=saved.label_names(model))
        student = models.freeze(registry.load_student(model, task))
        scored = scoring.score(task, student, "test", cfg, desc=name)
        correct = (scored.preds == scored.labels).int().tolist()
        if os.path.exists(os.path.join(out, "eval.json")):
            expected = read_json(os.path.join(out, "eval.json"))["accuracy"]
            if abs(sum(correct) / len(correct) - expected) > 1e-9:
                raise SystemExit(f"{name}: per-page accuracy {sum(correct) / len(correct)} differs from eval.json's "
                                 f"{expected}")
        scores["models"][name] = {"correct": correct, "preds": scored.preds.tolist(),
                                  "accuracy": scored.metrics["accuracy"], "macro_f1": scored.metrics["macro_f1"],
                                  "pages_per_second_1_thread": len(scored.labels) / scored.seconds,
                                  "parameters": models.count_parameters(student)}
        if "labels" in scores and scored.labels.tolist() != scores["labels"]:
            raise SystemExit(f"{name}: the test pages are not in the order of the models scored before")
        if "labels" not in scores:
            scores["labels"] = scored.labels.tolist()
            scores["indices"] = [int(i) for i in task.splits["test"].with_format(None)["index"]]
            docs = task.documents["test"]
            scores["files"] = [c["path"] for c in docs.cast_column("image", datasets.Image(decode=False))["image"]]
            scores["class_names"] = task.labels
            scores["n_words"] = [int(n) for n in task.splits["test"].with_format(None)["n_words"]]
            scores["truncated"] = [bool(t) for t in task.splits["test"].with_format(None)["truncated"]]
        say(f"scored {name}: {sum(correct)}/{len(correct)}")
    for name in teacher_runs(args):
        if name in scores["models"]:
            continue
        teacher_dir = os.path.join(run_dir(args, name), "teacher")
        cfg = config.parse_config(["--mode", "eval", "--dataset", data_path(args, "student"), "--eval-split", "test",
                                   "--output-dir", os.path.join(args.out, "runs", "score-" + name), "--cache-dir", cache,
                                   "--num-proc", "1", "--teacher", teacher_dir, *[str(f) for f in common(args)[4:]]])
        teacher_task = registry.build_task(cfg)
        teacher = models.freeze(teacher_task.teacher)
        scored = scoring.score(teacher_task, teacher, "test", cfg, forward=teacher_task.teacher_logits, desc=name)
        if scored.labels.tolist() != scores["labels"]:
            raise SystemExit("the teacher's test pages are not in the students' order")
        scores["models"][name] = {"correct": (scored.preds == scored.labels).int().tolist(),
                                  "preds": scored.preds.tolist(), "accuracy": scored.metrics["accuracy"],
                                  "macro_f1": scored.metrics["macro_f1"],
                                  "pages_per_second_1_thread": len(scored.labels) / scored.seconds,
                                  "parameters": models.count_parameters(teacher)}
        say(f"scored {name}: {sum(scores['models'][name]['correct'])}/{len(scored.labels)}")
    write_json(scores, path)
    state["scores"] = scores


# ----------------------------------------------------------------------------- 8. bench, 9. predict

def first_distilled(args):
    return f"distilled-seed{args.seeds[0]}"


def step_bench(args, state, runner):
    out = run_dir(args, first_distilled(args))
    if "bench" in args.redo or not os.path.exists(os.path.join(out, "bench.json")):
        runner.run_all([("bench", ["--mode", "bench", "--dataset", data_path(args, "student"), "--eval-split", "test",
                                   "--output-dir", out, "--cache-dir", os.path.join(args.out, "cache"),
                                   "--num-proc", 1])], 1, 1)
    state["bench"] = read_json(os.path.join(out, "bench.json"))
    say("bench:\n" + open(os.path.join(out, "bench.md")).read())


def step_predict(args, state, runner):
    model_run = run_dir(args, first_distilled(args))
    out = run_dir(args, "predict-test")
    before = count_ocr(args)
    if "predict" in args.redo or not os.path.exists(os.path.join(out, "predictions.jsonl")):
        runner.run_all([("predict", ["--mode", "predict", "--input", data_path(args, "predict-sample"),
                                     "--model", os.path.join(model_run, "student"), "--output-dir", out,
                                     "--cache-dir", os.path.join(args.out, "cache"), "--batch-size", 16] +
                                    (["--overwrite"] if "predict" in args.redo else []))], 1, 1)
        state["predict_new_ocr_entries"] = count_ocr(args) - before
    rows = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    if len(rows) != min(args.predict_pages, args.split[4]) * len(scores_classes(state)):
        raise SystemExit(f"predict wrote {len(rows)} rows for {args.predict_pages} pages of each class")
    summary = read_json(os.path.join(out, "predict_summary.json"))
    scores = state["scores"]
    names = scores["class_names"]
    by_file = {os.path.basename(f): names[p] for f, p in
               zip(scores["files"], scores["models"][first_distilled(args)]["preds"])}
    truth = {os.path.basename(f): os.path.basename(os.path.dirname(f)) for f in scores["files"]}
    agree = sum(by_file[os.path.basename(r["file"])] == r["label"] for r in rows)
    right = sum(truth[os.path.basename(r["file"])] == r["label"] for r in rows)
    state["predict"] = {"pages": len(rows), "agree_with_scored": agree, "accuracy": right / len(rows),
                        "summary": summary, "new_ocr_entries": state.get("predict_new_ocr_entries")}
    say(f"predict: {len(rows)} pages, accuracy {right / len(rows):.3f}, the same label as eval's scoring on {agree}; "
        f"new OCR cache entries written by predict: {state.get('predict_new_ocr_entries')} (0: it read training's)")


def scores_classes(state):
    return state["scores"]["class_names"]


# ----------------------------------------------------------------------------- 10. analysis

def osd(files, path):
    """Tesseract's orientation and script detection of each file (cached in `path`): rotate (degrees) or None."""
    import pytesseract
    from PIL import Image
    done = read_json(path) if os.path.exists(path) else {}
    todo = [f for f in files if f not in done]
    start = time.time()
    for k, f in enumerate(todo):
        try:
            out = pytesseract.image_to_osd(Image.open(f), output_type=pytesseract.Output.DICT)
            done[f] = {"rotate": out["rotate"], "confidence": out["orientation_conf"]}
        except pytesseract.TesseractError as e:
            done[f] = {"rotate": None, "error": str(e).splitlines()[-1][:120]}
        if k % 50 == 49:
            say(f"OSD {k + 1}/{len(todo)} ({time.time() - start:.0f}s)")
            write_json(done, path)
    write_json(done, path)
    return done, time.time() - start


def accuracy_on(correct, mask):
    n = sum(mask)
    return (sum(c for c, m in zip(correct, mask) if m) / n if n else None), n


def sideways(ocr_result):
    """Whether Tesseract read the page sideways: most of its words of 3+ characters have boxes taller than wide
    (text printed at 90 or 270 degrees, which Tesseract, run without orientation detection, reads as garbage)."""
    long = [b for w, b in zip(ocr_result["ocr_words"], ocr_result["word_boxes"]) if len(w) >= 3]
    tall = sum(b[3] - b[1] > b[2] - b[0] for b in long)
    return len(long) >= 5 and tall > 0.5 * len(long)


def step_analysis(args, state):
    sys.path.insert(0, REPO)
    import numpy as np
    split = read_json(os.path.join(args.out, "data", "split.json"))
    ocr_by_file = ocr_lookup(args, split)
    a = {}
    zero, turned = {}, {}
    for part, by_class in split["files"].items():
        if part not in SPLIT_NAMES:  # predict_sample: test pages again
            continue
        for cls, files in by_class.items():
            for f in files:
                if not ocr_by_file[f]["ocr_words"]:
                    zero.setdefault(cls, []).append((part, os.path.basename(f)))
                if sideways(ocr_by_file[f]):
                    turned.setdefault(cls, []).append((part, os.path.basename(f)))
    a["zero_word_pages"] = {"total": sum(len(v) for v in zero.values()),
                            "by_class": {c: len(v) for c, v in sorted(zero.items())}, "pages": zero}
    a["sideways_pages"] = {"total": sum(len(v) for v in turned.values()),
                           "by_class": {c: len(v) for c, v in sorted(turned.items())}, "pages": turned}
    words = np.array([len(o["ocr_words"]) for o in ocr_by_file.values()])
    a["words_all_pages"] = {"pages": len(words), "mean": float(words.mean()), "median": float(np.median(words)),
                            "p90": float(np.percentile(words, 90)), "max": int(words.max())}
    a["landscape_pages"] = sum(o["width"] > o["height"] for o in ocr_by_file.values())
    a["page_sizes"] = sorted({f"{o['width']}x{o['height']}" for o in ocr_by_file.values()})[:5]
    a["page_heights"] = sorted({o["height"] for o in ocr_by_file.values()})
    scores = state["scores"]
    test_real = [os.path.realpath(f) for f in scores["files"]]
    found = {}
    if args.osd_pages != "none":  # Tesseract's orientation detection, a cross-check of the sideways pages
        files = test_real if args.osd_pages == "test" else [os.path.realpath(f) for f in ocr_by_file]
        found, seconds = osd(files, os.path.join(args.out, "analysis", "osd.json"))
        found = {f: found[f] for f in files}
        by_rotate = {str(r): sum(v.get("rotate") == r for v in found.values()) for r in (0, 90, 180, 270)}
        side_ocr = {f for f in files if sideways(ocr_by_file[next(k for k in ocr_by_file
                                                                   if os.path.realpath(k) == f)])}
        side_osd = {f for f, v in found.items() if v.get("rotate") in (90, 270)}
        a["osd"] = {"pages": len(files), "seconds_new": seconds, "rotate": by_rotate,
                    "failed (too few characters)": sum(v.get("rotate") is None for v in found.values()),
                    "sideways_by_osd": len(side_osd), "sideways_by_boxes": len(side_ocr),
                    "both": len(side_osd & side_ocr)}
    real_to_ocr = {os.path.realpath(k): v for k, v in ocr_by_file.items()}
    side = [sideways(real_to_ocr[f]) for f in test_real]
    groups = {"no OCR words": [n == 0 for n in scores["n_words"]],
              "sideways (word boxes taller than wide)": side,
              "upright with OCR words": [n > 0 and not t for n, t in zip(scores["n_words"], side)],
              f"truncated at {args.max_length} tokens": scores["truncated"],
              "not truncated": [not t for t in scores["truncated"]]}
    if found:
        groups["OSD says 90 or 270"] = [found.get(f, {}).get("rotate") in (90, 270) for f in test_real]
    a["by_group"] = {}
    for g, mask in groups.items():
        a["by_group"][g] = {"pages": int(sum(mask))}
        for model in scores["models"]:
            acc, _ = accuracy_on(scores["models"][model]["correct"], mask)
            a["by_group"][g][model] = acc
    a["bag_of_words"] = bag_of_words(args, split, ocr_by_file)
    state["analysis"] = a
    write_json(a, os.path.join(args.out, "analysis", "analysis.json"))
    say(f"analysis: {a['zero_word_pages']['total']} pages without OCR words ({a['zero_word_pages']['by_class']}); "
        f"{a['sideways_pages']['total']} sideways ({a['sideways_pages']['by_class']}); OSD {a.get('osd')}; "
        f"bag of words {a['bag_of_words']}")


def ocr_lookup(args, split):
    """{file: the OCR docdistill cached for it} (the same key as ocr._cached_ocr for a path-only page)."""
    import datasets
    import ocr
    decoder = datasets.Image()
    out = {}
    for by_class in split["files"].values():
        for files in by_class.values():
            for f in files:
                out[f] = ocr._cached_ocr({"bytes": None, "path": f}, decoder, ocr_dir(args))
    return out


def bag_of_words(args, split, ocr_by_file):
    """Test accuracy of a TF-IDF logistic regression on the OCR words (scikit-learn, not part of docdistill): how
    much the words say, from each pool of labelled pages, with all of a page's words and with those that fit in
    128/256/512 of MiniLM's tokens (what the models read)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.out, "cache", "minilm-tokenizer"))

    def first(words, limit):
        if not words or not limit:
            return words
        enc = tokenizer([words], boxes=[[[0, 0, 1, 1]] * len(words)], truncation=True, max_length=limit)
        ids = [i for i in enc.word_ids(0) if i is not None]
        return words[:max(ids) + 1] if ids else []

    def xy(parts, limit):
        docs, ys = [], []
        for part in parts:
            for cls, files in split["files"][part].items():
                for f in files:
                    docs.append(" ".join(first(ocr_by_file[f]["ocr_words"], limit)).lower())
                    ys.append(cls)
        return docs, np.array(ys)

    out = {}
    pools = (("labelled pages (8/class)", ["labelled"]), ("teacher pages (32/class)", ["teacher_train"]),
             ("all but test (64/class)", ["teacher_train", "labelled", "unlabeled", "validation"]))
    for limit in (128, 256, 512, 0):
        test_x, test_y = xy(["test"], limit)
        for name, parts in pools:
            x, y = xy(parts, limit)
            vec = TfidfVectorizer(sublinear_tf=True)
            clf = LogisticRegression(C=10, max_iter=3000).fit(vec.fit_transform(x), y)
            out[f"{name}, {f'first {limit} tokens' if limit else 'all words'}"] = float(
                (clf.predict(vec.transform(test_x)) == test_y).mean())
    return out


# ----------------------------------------------------------------------------- 11. report

def mean(xs):
    return sum(xs) / len(xs)


def step_report(args, state, runner):
    sys.path.insert(0, REPO)
    import numpy as np
    import stats
    scores = state["scores"]
    students = state["students"]
    rows = {}
    for name, info in students.items():
        rows.setdefault(info["row"], []).append(name)
    results = {"args": vars(args), "state": {k: v for k, v in state.items() if k != "scores"}}
    per_row = {}
    for row, names in rows.items():
        names = sorted(names, key=lambda n: students[n]["seed"])
        got = [scores["models"][n] for n in names]
        ev = [students[n].get("eval") for n in names]
        per_row[row] = {"runs": names, "seeds": [students[n]["seed"] for n in names],
                        "accuracy": [g["accuracy"] for g in got], "mean": mean([g["accuracy"] for g in got]),
                        "macro_f1": mean([g["macro_f1"] for g in got]), "epochs": students[names[0]]["epochs"],
                        "validation_accuracy": [students[n]["validation_accuracy"] for n in names],
                        "parameters": got[0]["parameters"],
                        "pages_per_second_eval": mean([e["student_documents_per_second"] for e in ev]) if all(ev)
                        else None,
                        "teacher_pages_per_second_eval": mean([e["teacher_documents_per_second"] for e in ev])
                        if all(ev) else None,
                        "pages_per_second_scored": mean([g["pages_per_second_1_thread"] for g in got]),
                        "train_seconds": [students[n]["train_seconds"] for n in names]}
    results["rows"] = per_row

    def per_page(names):
        return np.mean([scores["models"][n]["correct"] for n in names], axis=0)

    comparisons = {}
    pairs = [("transfer-alone", "alone"), ("transfer-distilled", "distilled"), ("transfer-distilled", "alone"),
             ("transfer-distilled", "transfer-alone"), ("pretrained-distilled", "pretrained-alone"),
             ("pretrained-distilled", "distilled"), ("pretrained-distilled", "transfer-distilled")]
    for steps in args.student_steps:
        tag = "" if steps == args.student_steps[0] else f"-{steps}steps"
        pairs += [(f"distilled{tag}", f"alone{tag}"), (f"distilled-more-unlabeled{tag}", f"alone{tag}"),
                  (f"distilled-more-unlabeled{tag}", f"distilled{tag}")]
        if tag:
            pairs += [(f"{row}{tag}", row) for row in ("alone", "distilled", "distilled-more-unlabeled")]
    for b, a in pairs:
        if b in per_row and a in per_row:
            comparisons[f"{b} - {a}"] = {**stats.paired_bootstrap(per_page(per_row[a]["runs"]),
                                                                   per_page(per_row[b]["runs"])),
                                         "seeds": per_row[b]["seeds"]}
    chosen = state["chosen_teacher"]
    for row in per_row:
        comparisons[f"{row} - teacher ({chosen})"] = stats.paired_bootstrap(per_page([chosen]),
                                                                            per_page(per_row[row]["runs"]))
    if "teacher-from-demo" in scores["models"]:
        comparisons["teacher-from-demo - teacher"] = stats.paired_bootstrap(per_page(["teacher"]),
                                                                            per_page(["teacher-from-demo"]))
    results["comparisons"] = comparisons
    results["teachers"] = {n: {"test_accuracy": scores["models"][n]["accuracy"],
                               "test_macro_f1": scores["models"][n]["macro_f1"],
                               "validation_accuracy": state["teachers"][n]["validation_accuracy"],
                               "best_epoch": state["teachers"][n]["best_epoch"],
                               "parameters": scores["models"][n]["parameters"],
                               "pages_per_second_scored": scores["models"][n]["pages_per_second_1_thread"],
                               "train_seconds": state["command_seconds"].get(n)}
                           for n in teacher_runs(args)}
    results["seconds"] = {"steps": state.get("step_seconds", {}), "commands": state.get("command_seconds", {}),
                          "steps_total": sum(state.get("step_seconds", {}).values()),
                          "cpu_steps": state.get("step_cpu_seconds", {}),
                          "cpu_commands": state.get("command_cpu_seconds", {}),
                          "cpu_steps_total": sum(state.get("step_cpu_seconds", {}).values())}
    write_json(results, os.path.join(args.out, "results.json"))
    table = report_table(args, state, results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table, flush=True)


TITLES = {"alone": "student alone (alpha 0), random weights",
          "distilled": "student distilled, random weights",
          "distilled-more-unlabeled": "student distilled, + teacher's pages as unlabelled, random weights",
          "transfer-alone": "student alone, from the demo's student (head matched by name)",
          "transfer-distilled": "student distilled, from the demo's student (head matched by name)",
          "pretrained-alone": "student alone, from the teacher's first layers",
          "pretrained-distilled": "student distilled, from the teacher's first layers"}


def report_table(args, state, results):
    rows, comp, teachers = results["rows"], results["comparisons"], results["teachers"]
    chosen = state["chosen_teacher"]
    n = dict(zip(SPLIT_NAMES, args.split))
    k = len(read_json(os.path.join(args.out, "data", "split.json"))["classes"])
    lines = [f"test: {n['test'] * k} real pages ({n['test']} per class), the same for every model; max length "
             f"{args.max_length} tokens", "",
             "| model | labelled pages | unlabelled pages | optimizer steps (epochs) | validation accuracy | "
             "test accuracy per seed | test accuracy, mean | macro F1 | parameters | pages/s (eval, batch 16, 1 "
             "thread) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in teachers.items():
        what = "teacher, MiniLM-L6 pretrained text weights" + (", first fine-tuned on the demo's generated pages"
                                                             if name == "teacher-from-demo" else "")
        mark = " **(teaches the students)**" if name == chosen else ""
        steps = -(-n["teacher_train"] * k // 16) * args.teacher_epochs
        lines.append(f"| {name}: {what}{mark} | {n['teacher_train'] * k} | - | {steps} ({args.teacher_epochs}) | "
                     f"{t['validation_accuracy']:.3f} | {t['test_accuracy']:.3f} | {t['test_accuracy']:.3f} | "
                     f"{t['test_macro_f1']:.3f} | {t['parameters'] / 1e6:.2f}M | "
                     f"{t['pages_per_second_scored']:.1f} (scored alone) |")
    for row, r in rows.items():
        unl = "-" if "alone" in row else ((n["unlabeled"] + n["teacher_train"]) * k if "more" in row
                                          else n["unlabeled"] * k)
        pages = n["labelled"] * k + (0 if unl == "-" else unl)
        steps = -(-pages // args.batch_size) * r["epochs"]
        speed = f"{r['pages_per_second_eval']:.1f}" if r["pages_per_second_eval"] else \
            f"{r['pages_per_second_scored']:.1f} (scored, no eval)"
        title = TITLES.get(row.split("-")[0] if row.endswith("steps") and not row.startswith("distilled-more")
                           else row.rsplit("-", 1)[0] if row.endswith("steps") else row, row)
        lines.append(f"| {row}: {title} | {n['labelled'] * k} | {unl} | {steps} ({r['epochs']}) | "
                     f"{mean(r['validation_accuracy']):.3f} | {', '.join(f'{a:.3f}' for a in r['accuracy'])} | "
                     f"**{r['mean']:.3f}** | {r['macro_f1']:.3f} | {r['parameters'] / 1e6:.2f}M | {speed} |")
    lines += ["", "Paired bootstrap over the test pages (each page's correctness averaged over the seeds; 2,000 "
              "resamples; 95% interval), in points:", ""]
    for name, c in comp.items():
        lines.append(f"- {name}: {100 * c['difference']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]")
    b = state.get("bench")
    if b:
        lines += ["", f"`--mode bench` of {first_distilled(args)} (first {min(30, n['test'] * k)} test pages at batch "
                  f"1, one thread):", "",
                  "| model | parameters | size on disk | p50 ms/page (batch 1) | p95 ms | pages/s (batch 16) | "
                  "accuracy |", "|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
            lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['size_mb']:.1f} MB | "
                         f"{r['latency_ms_p50']:.1f} | {r['latency_ms_p95']:.1f} | {r['throughput_pages_per_s']:.1f} | "
                         f"{acc} |")
        lines.append(f"\nstudent {b['summary']['student_speedup_batch1']:.1f}x faster per page than the teacher at "
                     f"batch 1, {b['summary']['throughput_ratio']:.1f}x the throughput at batch 16")
    a = state.get("analysis")
    if a:
        models_ = [chosen] + [r for r in rows if not r.startswith("transfer")]
        lines += ["", "Test accuracy by kind of page (students: mean over seeds):", "",
                  "| pages | count | " + " | ".join(models_) + " |", "|---|---|" + "---|" * len(models_)]
        for g, v in a["by_group"].items():
            cells = []
            for m in models_:
                names = [m] if m == chosen else rows[m]["runs"]
                accs = [v[x] for x in names if v.get(x) is not None]
                cells.append(f"{mean(accs):.3f}" if accs else "-")
            lines.append(f"| {g} | {v['pages']} | " + " | ".join(cells) + " |")
        lines += ["", f"Pages without OCR words (all {a['words_all_pages']['pages']}): {a['zero_word_pages']['total']} "
                  f"{a['zero_word_pages']['by_class']}; sideways: {a['sideways_pages']['total']} "
                  f"{a['sideways_pages']['by_class']}; OSD on the test pages: {a.get('osd')}",
                  "", "Bag of words (TF-IDF + logistic regression) test accuracy: " +
                  "; ".join(f"{k}: {v:.3f}" for k, v in a["bag_of_words"].items())]
    sc = state.get("scores")
    if sc:  # per class: the teacher and the two main student rows (mean over seeds)
        import numpy as np
        labels = np.asarray(sc["labels"])
        cols = [chosen] + [r for r in rows if not r.startswith("transfer")]
        lines += ["", "Test accuracy per class (students: mean over seeds):", "",
                  "| class | pages without words | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for i, name in enumerate(sc["class_names"]):
            mask = labels == i
            cells = []
            for c in cols:
                names = [c] if c == chosen else rows[c]["runs"]
                cells.append(f"{np.mean([np.asarray(sc['models'][x]['correct'])[mask].mean() for x in names]):.3f}")
            zero = int(sum(n == 0 for n, m in zip(sc["n_words"], mask) if m))
            lines.append(f"| {name} | {zero} | " + " | ".join(cells) + " |")
    pr = state.get("predict")
    if pr:
        lines += ["", f"--mode predict on the test folder: {pr['pages']} pages, accuracy {pr['accuracy']:.3f}, the "
                  f"same label as the scored student on {pr['agree_with_scored']}; it OCR'd "
                  f"{pr['new_ocr_entries']} pages again ({pr['summary']['seconds']['ocr']:.0f} s of OCR; 0 = it read "
                  f"the OCR training cached)"]
    lines += ["", f"Wall time of the steps: {results['seconds']['steps_total']:.0f} s " +
              str({k: round(v) for k, v in results["seconds"]["steps"].items()}),
              f"CPU time (user + system, all processes): {results['seconds']['cpu_steps_total']:.0f} s " +
              str({k: round(v) for k, v in results["seconds"]["cpu_steps"].items()})]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    state_path = os.path.join(args.out, "state.json")
    state = read_json(state_path) if os.path.exists(state_path) else {}
    runner = Runner(args, state)
    if os.path.exists(os.path.join(args.out, "scores.json")):
        state["scores"] = read_json(os.path.join(args.out, "scores.json"))
    say(f"real-page benchmark -> {args.out}; steps {', '.join(args.steps)}")
    steps = {"data": lambda: step_data(args, state), "ocr": lambda: step_ocr(args, state),
             "info": lambda: step_info(args, state, runner), "teachers": lambda: step_teachers(args, state, runner),
             "students": lambda: step_students(args, state, runner), "eval": lambda: step_eval(args, state, runner),
             "score": lambda: step_score(args, state), "bench": lambda: step_bench(args, state, runner),
             "predict": lambda: step_predict(args, state, runner), "analysis": lambda: step_analysis(args, state),
             "report": lambda: step_report(args, state, runner)}
    timings = state.setdefault("step_seconds", {})
    cpu_timings = state.setdefault("step_cpu_seconds", {})
    for name in STEPS:
        if name not in args.steps:
            continue
        if name == "data" and os.path.exists(os.path.join(args.out, "data", "split.json")) and \
                "data" not in args.redo:
            say("data: the split exists (--redo data to make it again)")
            continue
        start, cpu = time.time(), cpu_seconds()
        say(f"== {name}")
        steps[name]()
        timings[name] = time.time() - start
        cpu_timings[name] = cpu_seconds() - cpu
        say(f"{name}: {timings[name]:.0f} s wall, {cpu_timings[name]:.0f} CPU s")
        state["ocr_entries_now"] = count_ocr(args)
        write_json({k: v for k, v in state.items() if k != "scores"}, state_path)
    say(f"finished in {time.time() - START:.0f}s; OCR cache entries: {count_ocr(args)} "
        f"(before the runs: {state.get('ocr_entries_before_runs')})")


if __name__ == "__main__":
    main()
