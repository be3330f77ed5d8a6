"""Every task docdistill knows, by --task name, and the one loader of saved students.

build_task(cfg) builds the task of a run; load_student(path) reads any saved student (a NAME_model.pth or a
save_pretrained directory, checksums verified: saved.read_student) and builds it with its task's
student_from_saved; eval, bench, predict and export read students through it. A new task is one tasks.Task
subclass, added to TASKS.
"""
import os

import saved
from classification import DocumentClassification, TokenClassification
from config import UserError
from textrec.task import TextRecognition
from textrec.trocr_student import TrOCRRecognition

# --task name -> its classes, the first whose accepts(cfg) is True is built (text recognition: a VisionEncoderDecoder
# student when --student-config, or the saved --model, is one; the CRNN otherwise).
TASKS = {"sequence-classification": (DocumentClassification,), "token-classification": (TokenClassification,),
         "text-recognition": (TrOCRRecognition, TextRecognition)}


def build_task(cfg, model_labels=None, train_teacher=None):
    """The task of cfg.task. model_labels: a saved model's classes, for eval in its label space (the data may hold
    a subset of them). train_teacher: whether a teacher whose head has other labels may have it re-initialised (it
    is about to be trained, or its outputs are not read); by default unless the run distils from it or scores it."""
    if train_teacher is None:
        train_teacher = not (cfg.uses_teacher or cfg.mode == "eval")
    cls = next(c for c in TASKS[cfg.task] if c.accepts(cfg))
    return cls(cfg, train_teacher=train_teacher, model_labels=model_labels)


def task_name_of(config, path):
    """The --task of a saved student whose config (a dict) is `config`."""
    return next(name for name, classes in TASKS.items() if task_class_of(config, path) in classes)


def task_class_of(config, path):
    """The task class whose students look like `config` (a saved student's config dict)."""
    for classes in TASKS.values():
        for cls in classes:
            if cls.owns_saved(config):
                return cls
    beside = saved.student_directory(path)
    if not os.path.isdir(path) and os.path.exists(os.path.join(beside, "config.json")):
        return task_class_of(saved.read_config(beside), path)  # a .pth whose config does not name its architecture
    raise UserError(f"{path} holds a {config.get('model_type')} model that is not a docdistill student (expected "
                    f"the student_model.pth or student/ directory written by --mode train)")


def load_student(path, task=None):
    """The saved student at `path` (NAME_model.pth or a save_pretrained directory), in eval mode.

    With the run's task (eval, bench): refused in one line unless it is a student of that task whose classes fit the
    data. Without (predict, export): built by the task its config names."""
    config, weights = saved.read_student(path)
    if task is not None:
        task.check_saved(config, path)
    model = (type(task) if task is not None else task_class_of(config, path)).student_from_saved(config, weights, path)
    if task is not None:
        task.check_student(model, path)
    return model.eval()
