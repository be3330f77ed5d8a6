"""docdistill entry point: `python main.py --mode train|eval|info|teacher|bench [flags]` (see --help).

train    distil the frozen teacher into the student       -> OUTPUT_DIR/student_model.pth, student/, metrics
teacher  train or fine-tune the teacher on the dataset    -> OUTPUT_DIR/teacher_model.pth, teacher/
eval     score a saved student (and its teacher agreement) -> OUTPUT_DIR/eval.json, confusion_matrix.png
info     describe the data and both models
demo     the whole job on the built-in corpora: teacher, students alone and distilled (with unlabelled pages), table
bench    speed, size and memory of teacher and student    -> OUTPUT_DIR/bench.json, bench.md
"""
import json
import logging
import os
import sys
import time

import torch
from accelerate import PartialState

import models
import train
import utils
from config import UserError, parse_config

log = logging.getLogger("docdistill")


def run_train(cfg, task):
    for name in (cfg.train_split, cfg.eval_split):
        stats = task.describe(name)
        log.info("%s: %d documents, %.1f words/document, %.1f%% truncated at %d tokens", name,
                 stats["documents"], stats["words_per_document"]["mean"], 100 * stats["truncated_share"],
                 cfg.max_length)
    if cfg.unlabeled:
        log.info("unlabeled (%s): %d documents join %s, taught by the teacher only (KD weight %g)", cfg.unlabeled,
                 task.describe("unlabeled")["documents"], cfg.train_split, cfg.unlabeled_weight)
    teacher = task.teacher if cfg.alpha > 0 else None  # alpha 0: the teacher's outputs are not used, skip it
    best = train.fit(cfg, task, task.student, task.student_logits, teacher=teacher,
                     teacher_forward=task.teacher_logits, name="student")
    log.info("best validation %s: %.4f; student saved in %s", task.metric_name, best,
             os.path.join(cfg.output_dir, "student"))
    report_skipped(task)


def run_teacher(cfg, task):
    best = train.fit(cfg, task, task.teacher, task.teacher_logits, name="teacher")
    log.info("best validation %s of the teacher: %.4f; saved in %s (use it with --teacher %s)", task.metric_name,
             best, os.path.join(cfg.output_dir, "teacher"), os.path.join(cfg.output_dir, "teacher"))
    report_skipped(task)


def load_saved_student(task, path):
    """A student from a student_model.pth (weights + config) or a save_pretrained directory, checked to fit."""
    expected = task.student.config.model_type
    if os.path.isdir(path):
        found = models.load_pretrained_config(path).model_type
    else:
        saved = utils.safe_torch_load(path)
        if not isinstance(saved, dict) or not {"state_dict", "config"} <= set(saved):
            raise UserError(f"{path} is not a docdistill student (expected student_model.pth or a student/ "
                            f"directory written by --mode train)")
        found = json.loads(saved["config"]).get("model_type")
    if found != expected:
        raise UserError(f"{path} holds a {found} model, not a {expected} student: give the student_model.pth or "
                        f"student/ directory written by --mode train")
    if os.path.isdir(path):
        student = type(task.student).from_pretrained(path)
    else:
        config = type(task.student.config).from_dict(json.loads(saved["config"]))
        student = models.load_student_weights(type(task.student)(config), saved["state_dict"], path)
    names = models.label_names(student)
    if names != task.labels:
        differ = (f"only in the student: {sorted(set(names) - set(task.labels)) or '-'}; only in the dataset: "
                  f"{sorted(set(task.labels) - set(names)) or '-'}" if set(names) != set(task.labels)
                  else "the same names in another order")
        raise UserError(f"{path} was trained on {len(names)} classes and the dataset has {len(task.labels)} "
                        f"({differ}): evaluate it on data with the classes it was trained on")
    return student


def report_skipped(task):
    """--on-bad-sample skip: how many unusable documents were left out, per split."""
    skipped = {name: task.describe(name).get("skipped", 0) for name in task.documents}
    if any(skipped.values()):
        log.warning("left out %d unusable documents (%s); the log above names the first of each split",
                    sum(skipped.values()), ", ".join(f"{name}: {n}" for name, n in skipped.items() if n))


def run_eval(cfg, task):
    path = cfg.model or os.path.join(cfg.output_dir, "student_model.pth")
    student = load_saved_student(task, path)
    accelerator = train.make_accelerator(cfg)
    loader = accelerator.prepare(train.make_loader(task, cfg.eval_split, cfg, shuffle=False))
    student = accelerator.prepare(student)
    start = time.perf_counter()
    logits, labels = train.predict(accelerator, loader, task.student_logits, student, desc="student")
    seconds = {"student": time.perf_counter() - start}
    preds = logits.argmax(-1)
    result = {"model": path, "split": cfg.eval_split, "documents": len(task.splits[cfg.eval_split]),
              **task.metrics(preds.numpy(), labels.numpy())}
    teacher = models.freeze(task.teacher).to(accelerator.device)
    start = time.perf_counter()
    teacher_logits, _ = train.predict(accelerator, loader, task.teacher_logits, teacher, desc="teacher")
    seconds["teacher"] = time.perf_counter() - start
    teacher_preds = teacher_logits.argmax(-1)
    keep = labels != -100
    # Throughput of a whole evaluation pass (batching included), counted in what the task scores.
    for role, model in (("student", student), ("teacher", teacher)):
        result[f"{role}_parameters"] = models.count_parameters(model)
        result[f"{role}_{task.unit}_per_second"] = int(keep.sum()) / seconds[role]
    result["teacher_agreement"] = float((preds == teacher_preds)[keep].float().mean())
    result["teacher_" + task.metric_name] = task.metrics(teacher_preds.numpy(), labels.numpy())[task.metric_name]
    if accelerator.is_main_process:
        utils.atomic_json(result, os.path.join(cfg.output_dir, "eval.json"))
        table = utils.per_class_table(result["per_class"])
        utils.atomic_text(table + "\n", os.path.join(cfg.output_dir, "per_class.md"))
        log.info("student per class on %s:\n%s", cfg.eval_split, table)
        if "confusion_matrix" in result:
            utils.plot_confusion(result["confusion_matrix"], task.labels,
                                 os.path.join(cfg.output_dir, "confusion_matrix.png"),
                                 f"student on {cfg.eval_split}: accuracy {result['accuracy']:.3f}")
        log.info("%s on %s (%d documents): %s %.4f, teacher %s %.4f, agreement with teacher %.4f", path,
                 cfg.eval_split, result["documents"], task.metric_name, result[task.metric_name],
                 task.metric_name, result["teacher_" + task.metric_name], result["teacher_agreement"])
    report_skipped(task)
    return result


def run_info(cfg, task):
    print(f"dataset {cfg.dataset}: splits {', '.join(f'{k} ({len(v)})' for k, v in task.documents.items())}")
    print(f"columns: {', '.join(task.documents[cfg.train_split].column_names)}")
    for name in task.documents:
        print(f"\n[{name}]\n" + json.dumps(task.describe(name), indent=2))
    print(f"\nsample 0: {task.show(0)}")
    for role, model in (("teacher", task.teacher), ("student", task.student)):
        print(f"{role}: {type(model).__name__}, {models.count_parameters(model) / 1e6:.2f}M parameters, "
              f"{models.size_mb(model):.1f} MB float32")
    ratio = models.count_parameters(task.teacher) / models.count_parameters(task.student)
    print(f"teacher/student parameter ratio: {ratio:.1f}x")
    print("device: " + json.dumps(utils.device_info()))


def run_demo(cfg):
    """Teacher, students alone / distilled / distilled with unlabelled pages, test scores and the table."""
    import demo_run
    return demo_run.run(cfg)


def main(argv=None):
    cfg = None
    try:
        cfg = parse_config(argv)
        process = PartialState()  # one per process under `accelerate launch`, a single one otherwise
        utils.setup_logging(process.is_main_process)
        if not cfg.cache_dir:
            cfg.cache_dir = os.path.join(os.path.dirname(os.path.abspath(cfg.output_dir)), "cache")
        os.makedirs(cfg.output_dir, exist_ok=True)
        utils.seed_everything(cfg.seed)
        if cfg.mode == "demo":
            run_demo(cfg)
            return 0
        if cfg.mode == "bench":
            import bench
            return bench.run(cfg)
        from tasks import build_task
        # Where the teacher's outputs are not used (info, training with alpha 0), a teacher whose head has other
        # labels is accepted with a re-initialised head, as when it is about to be trained.
        teacher_unused = cfg.mode == "info" or (cfg.mode == "train" and cfg.alpha == 0)
        with process.main_process_first():  # the main process fills the caches; the others then read them
            task = build_task(cfg, train_teacher=cfg.mode == "teacher" or teacher_unused)
        {"train": run_train, "teacher": run_teacher, "eval": run_eval, "info": run_info}[cfg.mode](cfg, task)
        return 0
    except (UserError, OSError) as e:  # OSError: disk full, no permission... (writes are atomic, nothing is torn)
        if cfg.debug if cfg is not None else "--debug" in (sys.argv[1:] if argv is None else argv):  # bad flags
            raise
        hint = "" if isinstance(e, UserError) else " (--debug shows where)"
        print(f"error: {e if isinstance(e, UserError) else utils.first_line(e)}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    sys.exit(main())
