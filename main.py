"""docdistill entry point: `python main.py --mode MODE [flags]` (see --help). It parses and dispatches:

train    distil the frozen teacher into the student       -> OUTPUT_DIR/student_model.pth, student/, metrics
teacher  train or fine-tune the teacher on the dataset    -> OUTPUT_DIR/teacher_model.pth, teacher/
eval     score a saved student (and its teacher agreement) -> OUTPUT_DIR/eval.json, confusion_matrix.png
info     describe the data and both models
demo     the whole job on the built-in corpus: teacher, baseline, distilled student, evaluation, table
bench    speed, size and memory of teacher and student    -> OUTPUT_DIR/bench.json, bench.md
predict  run a saved student on files, folders, globs     -> OUTPUT_DIR/predictions.jsonl (+ .csv)
export   the student as ONNX (float32 and int8), checked  -> OUTPUT_DIR/onnx/

train/teacher/info live in training_modes.py, eval in evaluate.py, bench in bench.py, predict in predict.py
and export in export.py.
"""
import dataclasses
import errno
import logging
import os
import signal
import sys

import torch
from accelerate import PartialState

import models
import train
import utils
from config import UserError, parse_config
from evaluate import run_eval, saved_label_names
from training_modes import run_info, run_teacher, run_train

log = logging.getLogger("docdistill")


# The demo's teacher is a ViT trained from scratch on 640 pages: it needs many more optimizer steps than
# the students (which start from the same random initialisation in both runs), and each step is cheap.
DEMO_TEACHER = dict(epochs=30, lr=3e-4, batch_size=16)


def run_demo(cfg):
    """Teacher, no-distillation baseline, distilled student, evaluation on the test split, and the table."""
    from tasks import build_task
    root = cfg.output_dir
    steps = [("teacher", dict(mode="teacher", output_dir=os.path.join(root, "teacher"), **DEMO_TEACHER)),
             ("baseline", dict(mode="train", alpha=0.0, output_dir=os.path.join(root, "baseline"))),
             ("distilled", dict(mode="train", output_dir=os.path.join(root, "distilled")))]
    teacher_dir = os.path.join(root, "teacher", "teacher")
    results = {}
    for name, overrides in steps:
        log.info("demo step: %s", name)
        if name != "teacher":
            overrides["teacher"] = teacher_dir
        step_cfg = dataclasses.replace(cfg, **overrides)
        task = build_task(step_cfg, train_teacher=name == "teacher")
        {"teacher": run_teacher, "train": run_train}[step_cfg.mode](step_cfg, task)
        if name != "teacher":
            eval_cfg = dataclasses.replace(step_cfg, mode="eval", eval_split="test")
            results[name] = run_eval(eval_cfg, build_task(eval_cfg))
            results[name]["parameters"] = models.count_parameters(task.student)
            results["teacher_parameters"] = models.count_parameters(task.teacher)
    table = demo_table(results)
    print("\n" + table)
    utils.atomic_text(table + "\n", os.path.join(root, "demo_results.md"))
    utils.atomic_json(results, os.path.join(root, "demo_results.json"))


def demo_table(results):
    base, dist = results["baseline"], results["distilled"]
    rows = [("teacher (small DiT, image only)", base["teacher_accuracy"], None, results["teacher_parameters"]),
            ("student, no distillation (alpha 0)", base["accuracy"], base["macro_f1"], base["parameters"]),
            ("student, distilled (alpha 0.7, T 4)", dist["accuracy"], dist["macro_f1"], dist["parameters"])]
    lines = [f"test split: {base['documents']} documents",
             "| model | test accuracy | macro F1 | parameters |", "|---|---|---|---|"]
    lines += [f"| {n} | {acc:.3f} | {'-' if f1 is None else f'{f1:.3f}'} | {p / 1e6:.2f}M |" for n, acc, f1, p in rows]
    lines.append(f"\nteacher/student size ratio: {results['teacher_parameters'] / dist['parameters']:.2f}x; "
                 f"distilled student agrees with the teacher on {dist['teacher_agreement']:.1%} of pages "
                 f"(baseline {base['teacher_agreement']:.1%})")
    return "\n".join(lines)


def error_line(error, cfg):
    """The one line reported for bad input or a failed file operation: what is wrong and how to fix it."""
    if isinstance(error, UserError):
        return f"error: {error}"
    if error.errno == errno.ENOSPC or "No space left on device" in str(error):  # Arrow's errors carry no errno
        where = error.filename or (f"--output-dir {cfg.output_dir} or --cache-dir {cfg.cache_dir}" if cfg else
                                   "the output or cache directory")
        return f"error: no space left on device at {where}: free space or use another --output-dir/--cache-dir"
    return f"error: {utils.first_line(error)} (--debug shows where)"


def main(argv=None):
    cfg = None
    try:
        cfg = parse_config(argv)
        process = PartialState()  # one per process under `accelerate launch`, a single one otherwise
        utils.setup_logging(process.is_main_process)
        if not cfg.cache_dir:
            cfg.cache_dir = os.path.join(os.path.dirname(os.path.abspath(cfg.output_dir)), "cache")
        # --output-dir is not created here: every write (utils.atomic_*) creates it, so bad input leaves none behind
        utils.seed_everything(cfg.seed)
        if cfg.mode == "demo":
            return run_demo(cfg) or 0
        if cfg.mode == "bench":
            import bench
            return bench.run(cfg)
        if cfg.mode == "predict":  # the student alone: no dataset, no teacher
            import predict
            return predict.run(cfg)
        if cfg.mode == "export":
            import export
            return export.run(cfg)
        if cfg.mode in ("train", "teacher"):  # before any slow work: never replace a run by accident
            train.refuse_to_overwrite(cfg, "student" if cfg.mode == "train" else "teacher")
        from tasks import build_task
        # Where the teacher's outputs are not used (info, training with alpha 0), a teacher whose head has other
        # labels is accepted with a re-initialised head, as when it is about to be trained.
        teacher_unused = cfg.mode == "info" or (cfg.mode == "train" and cfg.alpha == 0)
        # eval works in the saved student's label space: the data may hold a subset of its classes
        model_labels = saved_label_names(cfg.model or os.path.join(cfg.output_dir, "student_model.pth")) \
            if cfg.mode == "eval" else None
        with process.main_process_first():  # the main process fills the caches; the others then read them
            task = build_task(cfg, train_teacher=cfg.mode == "teacher" or teacher_unused, model_labels=model_labels)
        {"train": run_train, "teacher": run_teacher, "eval": run_eval, "info": run_info}[cfg.mode](cfg, task)
        return 0
    except (UserError, OSError) as e:  # OSError: disk full, no permission... (writes are atomic, nothing is torn)
        if cfg.debug if cfg is not None else "--debug" in (sys.argv[1:] if argv is None else argv):  # bad flags
            raise
        print(error_line(e, cfg), file=sys.stderr)
        return 2
    except train.Stopped as e:  # SIGTERM: a resumable checkpoint was saved
        print(e, file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    sys.exit(main())
