"""`--mode train`, `--mode teacher` and `--mode info`: the modes that train a model or describe the data."""
import json
import logging
import os

from accelerate import PartialState

import models
import recipe
import train
import utils
from modes import model_card

log = logging.getLogger("docdistill")


def run_train(cfg, task):
    """Distil the student; returns its best validation score (task.metric_name)."""
    for name in (cfg.train_split, cfg.eval_split):
        stats = task.describe(name)
        without_words = stats["words_per_document"].get("zero", 0)
        log.info("%s: %d documents, %.1f words/document, %.1f%% truncated at %d tokens%s", name,
                 stats["documents"], stats["words_per_document"]["mean"], 100 * stats["truncated_share"],
                 cfg.max_length, f"; {without_words} without OCR words (read from the page alone)" if without_words
                 else "")
    if cfg.unlabeled:
        log.info("unlabeled (%s): %d documents join %s, taught by the teacher only (KD weight %g)", cfg.unlabeled,
                 task.describe("unlabeled")["documents"], cfg.train_split, cfg.unlabeled_weight)
    student = recipe.with_lora(cfg, task.student)  # --lora-r: adapters on a pretrained student (config.py)
    # What the loss reads: the logits, or (with feature terms) the logits and features; the teacher teaches when
    # cfg.uses_teacher (alpha > 0).
    best = train.fit(cfg, task, student, task.student_outputs, name="student")
    log.info("best validation %s: %.4f; student saved in %s", task.metric_name, best,
             os.path.join(cfg.output_dir, "student"))
    if PartialState().is_main_process:
        model_card.write(os.path.join(cfg.output_dir, "student"))
    task.report_skipped()
    return best


def run_teacher(cfg, task):
    best = train.fit(cfg, task, recipe.with_lora(cfg, task.teacher), task.teacher_logits, name="teacher")
    log.info("best validation %s of the teacher: %.4f; saved in %s (use it with --teacher %s)", task.metric_name,
             best, os.path.join(cfg.output_dir, "teacher"), os.path.join(cfg.output_dir, "teacher"))
    task.report_skipped()


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
    cache = os.path.join(cfg.cache_dir, "teacher")
    stored = [f for f in os.scandir(cache) if f.name.endswith(".safetensors")] if os.path.isdir(cache) else []
    print(f"teacher cache {cache}: {len(stored)} caches (teacher outputs per split, teacher and --kd-terms features), "
          f"{sum(f.stat().st_size for f in stored) / 1e6:.2f} MB on disk")
    print("device: " + json.dumps(utils.device_info()))
