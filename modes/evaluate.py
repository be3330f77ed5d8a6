"""`--mode eval`: score a saved student on a labelled split, next to its teacher.

The student is read by the one loader (registry.load_student: checksums verified, refused in one line when it is
not a student of this task or does not know the data's classes); the task scores it (Task.evaluate: the scoring path
of scoring.py, plus what the task adds) and the result is written to OUTPUT_DIR/eval.json; the student's model card
gains the scores. For page and word classification the data may hold only some of the classes the student knows
(matched by name): the task then works in the student's label space (main.py builds it so), scores are over the
classes present and the confusion matrix covers all the student's classes.
"""
import os

from accelerate import PartialState

import registry
import saved
import utils
from modes import model_card


def default_model(cfg):
    return cfg.model or os.path.join(cfg.output_dir, "student_model.pth")


def run_eval(cfg, task):
    path = default_model(cfg)
    student = registry.load_student(path, task)
    result = task.evaluate(cfg, student, path)
    if PartialState().is_main_process:  # the other processes (accelerate launch) hold the same results
        eval_path = os.path.join(cfg.output_dir, "eval.json")
        utils.atomic_json(result, eval_path)
        model_card.write(saved.student_directory(path), eval_path=eval_path)  # the card gains the test scores
    task.report_skipped()
    return result
