"""The task contract: what differs between distillation problems, written down as one base class.

A task is built from the run's Config (registry.build_task). It reads the data, builds the teacher and the
student, and knows how to run each on a batch, what the loss is and how predictions are scored. The training loop
(train.py), the scoring path (scoring.py), the saved-student loader (registry.load_student) and every mode talk to
a task through the attributes and hooks below, and nothing else: no code outside the task classes asks a task
whether it has a hook, because every hook has a default here or must be written by the subclass.

Adding a fourth task means writing one subclass of Task (the hooks marked "required") and adding it to
registry.TASKS. The three tasks: classification.DocumentClassification (one label per page),
classification.TokenClassification (one tag per word), textrec.task.TextRecognition (a transcript per crop; with a
VisionEncoderDecoder student, textrec.trocr_student.TrOCRRecognition).
"""
import logging

import datasets
import torch

import dataset
import models
from config import UserError

log = logging.getLogger("docdistill")


class Task:
    """One distillation problem. Attributes every task sets in __init__:

        cfg                  the run's Config
        labels               the class names the models predict, in the student's order
        data_labels          the dataset's class names (eval of a model that knows more classes: a subset of labels)
        documents            {split name: raw documents}; splits: {split name: preprocessed split}
        unlabeled            the preprocessed --unlabeled documents (they also joined the training split), or None
        collator             makes a batch from preprocessed documents (a dict of tensors with "labels", "index")
        teacher, student     the models (the teacher is frozen by the loop when it teaches)
    """
    metric_name = "accuracy"  # the validation metric in task.metrics(); higher is better (the best epoch is kept)
    unit = "documents"  # what the metric counts, in eval's throughput (documents, words, crops)
    item = "page"  # one input, as bench's table names it (page, form, crop)
    teacher_cache_extra = ()  # what else the teacher cache's key depends on (outputs stored besides the logits)
    teacher_top_k = None  # per-step teacher logits cached compactly (compact_logits.CompactLogits) unless None

    # ------------------------------------------------------------------ which task builds, which saved student
    @classmethod
    def accepts(cls, cfg):
        """Whether this class serves cfg among the classes of its --task (registry.TASKS lists them in order)."""
        return True

    @classmethod
    def owns_saved(cls, config):
        """Whether a saved student's config (a dict) is a student of this task (required)."""
        raise NotImplementedError

    @classmethod
    def student_from_saved(cls, config, weights, path):
        """The saved student at `path` as a model: `config` its config (a dict); `weights` its state dict (from a
        NAME_model.pth, checksum verified), or None for a save_pretrained directory, which this reads (its
        checksums verified). Required; registry.load_student is the one caller."""
        raise NotImplementedError

    def check_saved(self, config, path):
        """Refuse a saved student of another architecture than this task's, before its weights are read."""
        expected, found = self.student.config.model_type, config.get("model_type")
        if found != expected:
            raise UserError(f"{path} holds a {found} model, not a {expected} student: give the student_model.pth or "
                            f"student/ directory written by --mode train")

    def check_student(self, student, path):
        """Refuse a loaded student that does not fit this task's data (default: the same classes, by name)."""
        names = models.label_names(student)
        if names != self.labels:
            differ = (f"only in the student: {sorted(set(names) - set(self.labels)) or '-'}; only in the dataset: "
                      f"{sorted(set(self.labels) - set(names)) or '-'}" if set(names) != set(self.labels)
                      else "the same names in another order")
            raise UserError(f"{path} was trained on {len(names)} classes and the dataset has {len(self.labels)} "
                            f"({differ}): evaluate it on data whose classes it knows (a subset of them is fine)")

    # ------------------------------------------------------------------ models on a batch
    def student_logits(self, student, batch):
        """The student's logits on a batch, in the order of self.labels (required)."""
        raise NotImplementedError

    def teacher_logits(self, teacher, batch):
        """The teacher's logits on a batch, put in the order of self.labels (required)."""
        raise NotImplementedError

    def student_outputs(self, student, batch):
        """What training feeds the loss: the logits, or a dict of "logits" and what the loss's terms read."""
        return self.student_logits(student, batch)

    def teacher_outputs(self, teacher, batch):
        """The teacher's side of student_outputs (what the teacher cache stores)."""
        return self.teacher_logits(teacher, batch)

    def make_loss(self, cfg):
        """The run's criterion, a losses.DistillationLoss: alpha 0 and no terms unless cfg.uses_teacher
        (required)."""
        raise NotImplementedError

    def predictions(self, logits, batch):
        """(predictions, labels) to score, from the logits of a batch: argmax per position by default; [B] or
        [B, L] each, IGNORE_INDEX where nothing is scored."""
        return logits.argmax(-1), batch["labels"]

    def metrics(self, preds, labels):
        """Scores of predictions against labels (numpy arrays, or lists of rows): a dict holding metric_name
        (required)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ describing, saving, evaluating
    def describe(self, name):
        """Statistics of a split: documents, words per document, truncation, skipped documents (required)."""
        raise NotImplementedError

    def show(self, index):
        """One training document in words, for --mode info (required)."""
        raise NotImplementedError

    def save_pretrained(self, model, directory, role):
        """Write `model` (role "student" or "teacher") as a directory its own library loads."""
        model.save_pretrained(directory)

    def evaluate(self, cfg, student, path):
        """--mode eval: the scores of the saved `student` on cfg.eval_split and whatever the task adds (the
        teacher's scores, speed, tables and plots written to cfg.output_dir); the dict becomes eval.json (required)."""
        raise NotImplementedError

    def report_skipped(self):
        """--on-bad-sample skip: how many unusable documents were left out, per split."""
        skipped = {name: self.describe(name).get("skipped", 0) for name in self.documents}
        if any(skipped.values()):
            log.warning("left out %d unusable documents (%s); the log above names the first of each split",
                        sum(skipped.values()), ", ".join(f"{name}: {n}" for name, n in skipped.items() if n))


# ----------------------------------------------------------------------------- helpers the tasks share

def use_model_labels(task, model_labels):
    """Work in a saved model's label space (eval of a model on data holding some of its classes).

    Classes are matched by name; task.labels become the model's, task.data_labels keep the dataset's and the
    collator maps the dataset's label ids to the model's. Data with a class the model does not know is left as it
    is: the student's check (Task.check_student) refuses it, naming the classes.
    """
    task.data_labels, task.label_map = task.labels, None
    if model_labels is None or list(model_labels) == task.labels:
        return
    model_norm = [models.normalize_label(n) for n in model_labels]
    if any(models.normalize_label(n) not in model_norm for n in task.labels):
        return  # refused by name when the model is loaded, after the check that it is a model of this task
    ids = [model_norm.index(models.normalize_label(n)) for n in task.labels]
    task.data_labels = [model_labels[i] for i in ids]  # the model's spelling of the dataset's classes
    task.labels = list(model_labels)
    task.label_map = ids


def prepare_splits(task, load_unlabeled, preprocess, without_labels):
    """task.splits: every split of task.documents preprocessed, unusable documents handled by --on-bad-sample.

    With --labeled-fraction F < 1, the labels of a seeded 1 - F share of the training documents are hidden first
    (without_labels(split, hidden); without a teacher those documents are left out). With --unlabeled,
    load_unlabeled(cfg)'s documents (task.documents["unlabeled"], prepared: task.unlabeled) join the training split,
    numbered after its documents, so the teacher-logit cache holds a row for each.
    preprocess(split, desc=..., index_offset=..., num_proc=...) -> the split preprocessed (cached; --num-proc
    processes), every row kept.
    """
    cfg = task.cfg
    if cfg.mode == "train":
        task.documents[cfg.train_split] = dataset.keep_labeled_fraction(task.documents[cfg.train_split], cfg,
                                                                        without_labels)

    def prepare(split, name, index_offset=0):
        return dataset.drop_bad_documents(preprocess(split, desc=f"preprocess {name}", index_offset=index_offset,
                                                     num_proc=cfg.num_proc),
                                          name, cfg.on_bad_sample)

    task.splits = {name: prepare(split, name) for name, split in task.documents.items()}
    task.unlabeled = None
    if cfg.unlabeled:
        task.documents["unlabeled"] = load_unlabeled(cfg)
        task.unlabeled = prepare(task.documents["unlabeled"], "unlabeled", len(task.documents[cfg.train_split]))
        task.splits[cfg.train_split] = add_unlabeled(task.splits[cfg.train_split], task.unlabeled)


def add_unlabeled(labelled, unlabeled):
    """The training split with the unlabelled documents after its own (the sampler shuffles them together)."""
    return datasets.concatenate_datasets([labelled.with_format(None), unlabeled.with_format(None)]).with_format("torch")


def prepared_part(task, name):
    """The usable, preprocessed documents of task.documents[name]: the unlabelled ones for "unlabeled", and a
    split without the unlabelled documents that joined it (they come last)."""
    if name == "unlabeled":
        return task.unlabeled
    split = task.splits[name]
    if name == task.cfg.train_split and task.unlabeled is not None:
        return split.select(range(len(split) - len(task.unlabeled)))
    return split


class RelabelledCollator:
    """A collator whose batches carry label ids in the model's order (IGNORE_INDEX and padding kept)."""

    def __init__(self, collator, label_map):
        self.collator, self.label_map = collator, torch.tensor(label_map, dtype=torch.long)

    def __call__(self, docs):
        batch = self.collator(docs)
        labels = batch["labels"]
        keep = labels >= 0
        batch["labels"] = torch.where(keep, self.label_map[labels.clamp(min=0)], labels)
        return batch


def relabelled(task, collator):
    return collator if task.label_map is None else RelabelledCollator(collator, task.label_map)
