"""`--mode eval`: score a saved student on a labelled split, next to its teacher; loading a saved student.

The data may hold only some of the classes the student knows (matched by name): the task then works in the
student's label space, scores are over the classes present and the confusion matrix covers all the student's
classes. A class the student does not know is refused by name.
"""
import json
import logging
import os
import time

import kd_terms
import model_card
import models
import train
import utils
from config import UserError
from training_modes import report_skipped

log = logging.getLogger("docdistill")


def default_model(cfg):
    return cfg.model or os.path.join(cfg.output_dir, "student_model.pth")


def saved_label_names(path):
    """The class names a saved student knows (student_model.pth or a save_pretrained directory), or None when
    the path holds no readable student (load_saved_student then says what is wrong)."""
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, "config.json")) as f:
                config = json.load(f)
        else:
            saved = utils.safe_torch_load(path)
            config = json.loads(saved["config"])
        id2label = config["id2label"]
        return [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label))]
    except Exception:  # noqa: BLE001 - anything unreadable is reported by load_saved_student
        return None


def read_student_file(path):
    """A student_model.pth's {"state_dict", "config"}, loaded safely and its checksum verified."""
    saved = utils.safe_torch_load(path)
    if not isinstance(saved, dict) or not {"state_dict", "config"} <= set(saved):
        raise UserError(f"{path} is not a docdistill student (expected student_model.pth or a student/ "
                        f"directory written by --mode train)")
    utils.verify_checksum(saved, path)
    return saved


def load_saved_student(task, path):
    """A student from a student_model.pth (weights + config) or a save_pretrained directory, checked to fit."""
    if hasattr(task, "load_student"):  # a task whose student is not a transformers model
        return task.load_student(path)
    expected = task.student.config.model_type
    if os.path.isdir(path):
        found = models.load_pretrained_config(path).model_type
    else:
        saved = read_student_file(path)
        found = json.loads(saved["config"]).get("model_type")
    if found != expected:
        raise UserError(f"{path} holds a {found} model, not a {expected} student: give the student_model.pth or "
                        f"student/ directory written by --mode train")
    if os.path.isdir(path):
        student = models.from_pretrained(type(task.student), path)
    else:
        config = type(task.student.config).from_dict(json.loads(saved["config"]))
        student = models.load_student_weights(kd_terms.restore_head(type(task.student)(config)), saved["state_dict"],
                                              path)
    names = models.label_names(student)
    if names != task.labels:
        differ = (f"only in the student: {sorted(set(names) - set(task.labels)) or '-'}; only in the dataset: "
                  f"{sorted(set(task.labels) - set(names)) or '-'}" if set(names) != set(task.labels)
                  else "the same names in another order")
        raise UserError(f"{path} was trained on {len(names)} classes and the dataset has {len(task.labels)} "
                        f"({differ}): evaluate it on data whose classes it knows (a subset of them is fine)")
    return student


def run_eval(cfg, task):
    path = default_model(cfg)
    student = load_saved_student(task, path)
    if hasattr(task, "evaluate"):  # a task with its own scores (text recognition: CER/WER, ms per crop)
        return task.evaluate(cfg, student, path)
    accelerator = train.make_accelerator(cfg)
    loader = accelerator.prepare(train.make_loader(task, cfg.eval_split, cfg, shuffle=False))
    student = accelerator.prepare(student)
    start = time.perf_counter()
    logits, labels = train.predict(accelerator, loader, task.student_logits, student, desc="student")
    seconds = {"student": time.perf_counter() - start}
    preds = logits.argmax(-1)
    result = {"model": path, "split": cfg.eval_split, "documents": len(task.splits[cfg.eval_split]),
              **task.metrics(preds.numpy(), labels.numpy())}
    data_labels = getattr(task, "data_labels", task.labels)
    result["classes"] = {"model": len(task.labels), "in_data": len(data_labels),
                         "not_in_data": [n for n in task.labels if n not in data_labels]}
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
        model_card.write(path if os.path.isdir(path) else os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                       "student"),
                         eval_path=os.path.join(cfg.output_dir, "eval.json"))  # the card gains the test scores
        if result["classes"]["not_in_data"]:
            log.info("the data holds %d of the student's %d classes: scores are over those %d (not in the data: "
                     "%s); the confusion matrix covers all %d", len(data_labels), len(task.labels),
                     len(data_labels), ", ".join(result["classes"]["not_in_data"]), len(task.labels))
        log.info("%s on %s (%d documents): %s %.4f, teacher %s %.4f, agreement with teacher %.4f", path,
                 cfg.eval_split, result["documents"], task.metric_name, result[task.metric_name],
                 task.metric_name, result["teacher_" + task.metric_name], result["teacher_agreement"])
    report_skipped(task)
    return result
