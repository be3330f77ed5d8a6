"""docdistill entry point: `python main.py --mode train|eval|info|teacher|bench [flags]` (see --help).

train    distil the frozen teacher into the student       -> OUTPUT_DIR/student_model.pth, student/, metrics
teacher  train or fine-tune the teacher on the dataset    -> OUTPUT_DIR/teacher_model.pth, teacher/
eval     score a saved student (and its teacher agreement) -> OUTPUT_DIR/eval.json, confusion_matrix.png
info     describe the data and both models
demo     the whole job on the built-in corpus: teacher, baseline, distilled student, evaluation, table
bench    speed, size and memory of teacher and student    -> OUTPUT_DIR/bench.json, bench.md
"""
import dataclasses
import json
import logging
import os
import sys

import torch

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
    teacher = task.teacher if cfg.alpha > 0 else None  # alpha 0: the teacher's outputs are not used, skip it
    best = train.fit(cfg, task, task.student, task.student_logits, teacher=teacher,
                     teacher_forward=task.teacher_logits, name="student")
    log.info("best validation %s: %.4f; student saved in %s", task.metric_name, best,
             os.path.join(cfg.output_dir, "student"))


def run_teacher(cfg, task):
    best = train.fit(cfg, task, task.teacher, task.teacher_logits, name="teacher")
    log.info("best validation %s of the teacher: %.4f; saved in %s (use it with --teacher %s)", task.metric_name,
             best, os.path.join(cfg.output_dir, "teacher"), os.path.join(cfg.output_dir, "teacher"))


def load_saved_student(task, path):
    """A student from a student_model.pth (weights + config) or a save_pretrained directory."""
    if os.path.isdir(path):
        return type(task.student).from_pretrained(path)
    saved = utils.safe_torch_load(path)
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise UserError(f"{path} is not a docdistill student (expected student_model.pth or a directory)")
    config = type(task.student.config).from_dict(json.loads(saved["config"]))
    return models.load_student_weights(type(task.student)(config), saved["state_dict"], path)


def run_eval(cfg, task):
    path = cfg.model or os.path.join(cfg.output_dir, "student_model.pth")
    student = load_saved_student(task, path)
    accelerator = train.make_accelerator(cfg)
    loader = accelerator.prepare(train.make_loader(task, cfg.eval_split, cfg, shuffle=False))
    student = accelerator.prepare(student)
    logits, labels = train.predict(accelerator, loader, task.student_logits, student, desc="student")
    preds = logits.argmax(-1)
    result = {"model": path, "split": cfg.eval_split, "documents": len(task.splits[cfg.eval_split]),
              **task.metrics(preds.numpy(), labels.numpy())}
    teacher = models.freeze(task.teacher).to(accelerator.device)
    teacher_logits, _ = train.predict(accelerator, loader, task.teacher_logits, teacher, desc="teacher")
    teacher_preds = teacher_logits.argmax(-1)
    keep = labels != -100
    result["teacher_agreement"] = float((preds == teacher_preds)[keep].float().mean())
    result["teacher_" + task.metric_name] = task.metrics(teacher_preds.numpy(), labels.numpy())[task.metric_name]
    if accelerator.is_main_process:
        utils.atomic_json(result, os.path.join(cfg.output_dir, "eval.json"))
        if "confusion_matrix" in result:
            utils.plot_confusion(result["confusion_matrix"], task.labels,
                                 os.path.join(cfg.output_dir, "confusion_matrix.png"),
                                 f"student on {cfg.eval_split}: accuracy {result['accuracy']:.3f}")
        log.info("%s on %s (%d documents): %s %.4f, teacher %s %.4f, agreement with teacher %.4f", path,
                 cfg.eval_split, result["documents"], task.metric_name, result[task.metric_name],
                 task.metric_name, result["teacher_" + task.metric_name], result["teacher_agreement"])
    return result


def run_info(cfg, task):
    print(f"dataset {cfg.dataset}: splits {', '.join(f'{k} ({len(v)})' for k, v in task.documents.items())}")
    print(f"columns: {', '.join(task.documents[cfg.train_split].column_names)}")
    for name in task.documents:
        print(f"\n[{name}]\n" + json.dumps(task.describe(name), indent=2))
    sample = task.documents[cfg.train_split][0]
    print(f"\nsample 0: label {task.labels[sample['label']]!r}, {len(sample['ocr_words'])} words: "
          f"{' '.join(sample['ocr_words'][:20])} ...; first boxes {sample['word_boxes'][:2]}")
    for role, model in (("teacher", task.teacher), ("student", task.student)):
        print(f"{role}: {type(model).__name__}, {models.count_parameters(model) / 1e6:.2f}M parameters, "
              f"{models.size_mb(model):.1f} MB float32")
    ratio = models.count_parameters(task.teacher) / models.count_parameters(task.student)
    print(f"teacher/student parameter ratio: {ratio:.1f}x")
    print("device: " + json.dumps(utils.device_info()))


# The demo's teacher is trained from scratch on the generated corpus: more epochs and a higher rate than
# the students, which start from the same random initialisation in both runs.
DEMO_TEACHER = dict(epochs=12, lr=1e-3)


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
    with open(os.path.join(root, "demo_results.md"), "w") as f:
        f.write(table + "\n")
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


def main(argv=None):
    cfg = None
    try:
        cfg = parse_config(argv)
        utils.setup_logging()
        if not cfg.cache_dir:
            cfg.cache_dir = os.path.join(os.path.dirname(os.path.abspath(cfg.output_dir)), "cache")
        os.makedirs(cfg.output_dir, exist_ok=True)
        utils.seed_everything(cfg.seed)
        if cfg.mode == "demo":
            return run_demo(cfg) or 0
        if cfg.mode == "bench":
            import bench
            return bench.run(cfg)
        from tasks import build_task
        task = build_task(cfg, train_teacher=cfg.mode == "teacher")
        if cfg.mode in ("train", "teacher"):
            utils.atomic_json(cfg.to_dict(), os.path.join(cfg.output_dir, f"{cfg.mode}_config.json"))
        {"train": run_train, "teacher": run_teacher, "eval": run_eval, "info": run_info}[cfg.mode](cfg, task)
        return 0
    except UserError as e:
        if cfg is not None and cfg.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    sys.exit(main())
