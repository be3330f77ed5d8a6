"""Tasks: what differs between distillation problems, kept out of the training loop.

A task builds the teacher and the student, prepares the splits and the collator, runs each model on a batch
to logits in the dataset's label order, and scores predictions. train.py only sees this interface:

    task.labels, task.splits[name], task.collator       # teacher_pixels=False: batches without the teacher's
                                                        # pixels (collate.without_teacher_pixels: cached teacher)
    task.teacher, task.teacher_logits(teacher, batch)   # frozen teacher, or the model trained in --mode teacher
    task.student, task.student_logits(student, batch)
    task.metrics(preds, labels)  ->  dict with task.metric_name in it
    task.make_loss(cfg, with_teacher)  ->  criterion(student_logits, teacher_logits, batch) -> {"total", terms...}
    task.student_outputs / task.teacher_outputs(model, batch)  # what training feeds the loss, when more than the
                                                               # logits (optional; kd_terms.FeatureOutputs)
    task.predictions(logits, batch)  ->  (preds, labels) to score, where argmax per position does not fit (optional)
    task.describe(name), task.show(index), task.unit   # statistics, one sample, what is counted (documents/words)
"""
import logging
import os

import inspect

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer
from transformers.models.layoutlmv3.image_processing_pil_layoutlmv3 import LayoutLMv3ImageProcessorPil

import collate
import dataset
import kd_terms
import models
import wordtags
from config import UserError

log = logging.getLogger("docdistill")


def load_tokenizer(source, cache_dir, train_split=None):
    """Hub id or directory; 'demo' trains a byte-level BPE on the demo corpus (LayoutLMv3's tokenizer type),
    'minilm' is MiniLM-L6's WordPiece with word boxes (the tokenizer of the demo-minilm teacher)."""
    from transformers import LayoutLMv3TokenizerFast
    if source == "minilm":
        import minilm
        source = minilm.save_tokenizer(os.path.join(cache_dir, "minilm-tokenizer"))
    bare_bpe = source == "demo" or (os.path.isdir(source) and os.path.exists(os.path.join(source, "merges.txt"))
                                    and not os.path.exists(os.path.join(source, "tokenizer.json")))
    if source == "demo":
        import demo
        # one directory per corpus: runs side by side (the demo's teacher and students) train on different ones
        source = demo.train_demo_tokenizer(train_split, os.path.join(cache_dir, "demo-tokenizer",
                                                                     train_split._fingerprint[:16]))
    try:  # a bare vocab.json + merges.txt folder does not say which tokenizer class it is for
        return LayoutLMv3TokenizerFast.from_pretrained(source) if bare_bpe else AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {source!r}: give a local directory with the tokenizer files "
                        f"or a reachable hub id ({str(e).splitlines()[0]})") from e


class DocumentClassification(kd_terms.FeatureOutputs):
    """One label per page: image-only teacher (DiT) -> words + boxes + image student (LayoutLMv3).

    The loss's terms (--kd-terms, kd_terms.py) match the models' features at the pooled representation."""
    metric_name = "accuracy"
    unit = "documents"
    without_labels = staticmethod(dataset.without_labels)

    def __init__(self, cfg, train_teacher=False, model_labels=None):
        self.cfg = cfg
        documents, self.labels = dataset.load_documents(cfg)
        use_model_labels(self, model_labels)
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.cache_dir, documents[cfg.train_split])
        first = self.load_teacher(cfg.teacher, train_teacher)
        self.teacher, teacher_processor = first
        # Teacher logits come in the teacher's label order; reorder them to the dataset's, by name.
        self.teacher_order = models.match_labels(models.label_names(self.teacher), self.labels)
        self.student_processor = LayoutLMv3ImageProcessorPil(
            apply_ocr=False, size={"height": cfg.student_image_size, "width": cfg.student_image_size})
        self.student = models.build_student(
            AutoModelForSequenceClassification, cfg.student_config, self.labels, size=cfg.student_size,
            vocab_size=len(self.tokenizer), input_size=cfg.student_image_size,
            pad_token_id=self.tokenizer.pad_token_id)
        models.check_max_length(cfg.max_length, self.student.config, "student")
        student_spec = dataset.image_spec(self.student_processor)
        # a teacher that reads no page (the demo's) gets none: no 128-px pages made, stored or collated
        teacher_spec = dataset.image_spec(teacher_processor) if models.reads_page(self.teacher) else None
        self.add_teachers(cfg, train_teacher, first)
        self.documents = documents
        prepare_splits(self, dataset.load_unlabeled, lambda split, **kw: dataset.preprocess_classification(
            split, self.tokenizer, student_spec, teacher_spec, cfg.max_length, cfg.cache_dir, **kw))
        self.collator = relabelled(self, collate.ClassificationCollator(self.tokenizer.pad_token_id, student_spec,
                                                                        teacher_spec))
        self.teacher_processor = teacher_processor
        if "attention" in kd_terms.chosen(cfg) and not models.reads_text(self.teacher):
            raise UserError(f"--kd-terms attention compares text-token attention maps, and the teacher {cfg.teacher!r} "
                            f"reads no words (its attention is over page patches, not the student's tokens): use a "
                            f"teacher that reads words with the student's tokenizer")
        self.init_kd_terms(cfg)

    @staticmethod
    def matched(features, batch, role):
        """Features of a page: what the head reads is already one vector per page (pooled or first token)."""
        return features

    @staticmethod
    def matched_attention(maps, batch, role):
        """Attention maps [B, S, S] -> text-token maps [B, L, L]: both models read the batch's L tokens first (a
        LayoutLMv3 appends its visual tokens after them)."""
        length = batch["input_ids"].shape[1]
        return maps[:, :length, :length]

    def load_teacher(self, source, trainable):
        """A teacher and its image processor; one that reads words must read them with the student's tokenizer."""
        teacher, processor = models.load_document_teacher(
            source, self.labels, trainable=trainable, vocab_size=len(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id)
        if models.reads_text(teacher) and teacher.config.vocab_size != len(self.tokenizer):
            raise UserError(f"the teacher {source!r} reads words with a {teacher.config.vocab_size}-token "
                            f"vocabulary and the student's tokenizer has {len(self.tokenizer)}: give the teacher's "
                            f"tokenizer (--tokenizer {source})")
        return teacher, processor

    @staticmethod
    def teacher_input(loaded):
        """What a loaded teacher's batches are made with: its page size and normalisation."""
        return dataset.image_spec(loaded[1])

    def one_teacher_logits(self, teacher, order, batch):
        if models.reads_text(teacher):  # words and boxes as the student reads them, the page at its own size
            page = {"pixel_values": batch["teacher_pixel_values"]} if models.reads_page(teacher) else {}
            return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], bbox=batch["bbox"],
                           **page).logits[:, order]
        return teacher(pixel_values=batch["teacher_pixel_values"]).logits[:, order]

    def student_logits(self, student, batch):
        return student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], bbox=batch["bbox"],
                       pixel_values=batch["pixel_values"]).logits

    def describe(self, name):
        return dataset.describe(self.documents[name], prepared_part(self, name), self.data_labels)

    def show(self, index):
        sample = self.documents[self.cfg.train_split][index]
        return (f"label {self.data_labels[sample['label']]!r}, {len(sample['ocr_words'])} words: "
                f"{' '.join(sample['ocr_words'][:20])} ...; first boxes {sample['word_boxes'][:2]}")

    def metrics(self, preds, labels):
        """Scores over the dataset's classes; the confusion matrix over all of self.labels (the model's, in eval)."""
        preds, labels = np.asarray(preds), np.asarray(labels)
        names = getattr(self, "data_labels", self.labels)
        ids = [self.labels.index(n) for n in names]
        report = classification_report(labels, preds, labels=ids, target_names=names, output_dict=True,
                                       zero_division=0)
        return {
            "accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, labels=ids, average="macro", zero_division=0)),
            "per_class": {name: {k: float(report[name][k]) for k in ("precision", "recall", "f1-score",
                                                                      "support")} for name in names},
            "confusion_matrix": confusion_matrix(labels, preds, labels=list(range(len(self.labels)))).tolist(),
        }

    def save_pretrained(self, model, directory, role):
        """A directory plain transformers can load: the model with its tokenizer and/or image processor."""
        model.save_pretrained(directory)
        if role == "teacher":
            self.teacher_processor.save_pretrained(directory)
            if models.reads_text(model):
                self.tokenizer.save_pretrained(directory)
        else:
            self.tokenizer.save_pretrained(directory)
            self.student_processor.save_pretrained(directory)


class TokenClassification(kd_terms.FeatureOutputs):
    """One BIO tag per word: words + boxes + image teacher (LayoutLMv3) -> text-only student (DistilBERT).

    The teacher's tokenizer is the one saved with it (--teacher). The two tokenizers split words differently,
    so each model is read at every word's first sub-token of its own sequence: both give [B, words, tags], and
    the features of --kd-terms feature/simkd are matched there too ([B, words, width]), and the attention maps of
    --kd-terms attention between them ([B, words, words]).
    """
    metric_name = "f1"
    unit = "words"
    without_labels = staticmethod(wordtags.untag_some)

    def __init__(self, cfg, train_teacher=False, model_labels=None):
        self.cfg = cfg
        self.documents, self.labels = wordtags.load_word_documents(cfg)
        use_model_labels(self, model_labels)
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.cache_dir)
        first = self.load_teacher(cfg.teacher, train_teacher)
        self.teacher, self.teacher_tokenizer, self.teacher_processor = first
        self.teacher_order = models.match_labels(models.label_names(self.teacher), self.labels)
        self.student = models.build_student(
            AutoModelForTokenClassification, cfg.student_config, self.labels, size=cfg.student_size,
            vocab_size=len(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id)
        models.check_max_length(cfg.max_length, self.student.config, "student")
        spec = dataset.image_spec(self.teacher_processor)
        self.add_teachers(cfg, train_teacher, first)
        prepare_splits(self, wordtags.load_unlabeled_words, lambda split, **kw: wordtags.preprocess_words(
            split, self.tokenizer, self.teacher_tokenizer, spec, cfg.max_length, cfg.cache_dir, **kw))
        self.collator = relabelled(self, wordtags.WordCollator(self.tokenizer.pad_token_id,
                                                               self.teacher_tokenizer.pad_token_id, spec))
        self.init_kd_terms(cfg)

    @staticmethod
    def matched(features, batch, role):
        """Token features [B, L, width] -> word features [B, W, width], at each word's first sub-token."""
        return wordtags.at_words(features, batch["word_pos" if role == "student" else "teacher_word_pos"])

    @staticmethod
    def matched_attention(maps, batch, role):
        """Token attention maps [B, L, L] -> word-to-word maps [B, W, W], at each word's first sub-token."""
        return wordtags.at_word_pairs(maps, batch["word_pos" if role == "student" else "teacher_word_pos"])

    def load_teacher(self, source, trainable):
        """A LayoutLMv3 teacher, its tokenizer (saved with it) and its image processor."""
        config = models.load_pretrained_config(source)
        if config.model_type != "layoutlmv3":
            raise UserError(f"the token-classification teacher must be a LayoutLMv3 model (words, boxes and "
                            f"page), got a {config.model_type} model from {source!r}")
        models.check_max_length(self.cfg.max_length, config, "teacher")
        tokenizer = load_tokenizer(source, self.cfg.cache_dir)
        teacher = models.load_teacher(AutoModelForTokenClassification, source, config, self.labels, trainable=trainable)
        return teacher, tokenizer, LayoutLMv3ImageProcessorPil(
            apply_ocr=False, size={"height": config.input_size, "width": config.input_size})

    @staticmethod
    def teacher_input(loaded):
        """What a loaded teacher's batches are made with: its tokenizer, its page size and normalisation."""
        return dataset.tokenizer_fingerprint(loaded[1]), dataset.image_spec(loaded[2])

    def one_teacher_logits(self, teacher, order, batch):
        logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                         bbox=batch["bbox"], pixel_values=batch["teacher_pixel_values"]).logits
        return wordtags.at_words(logits[..., order], batch["teacher_word_pos"])

    def student_logits(self, student, batch):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return wordtags.at_words(logits, batch["word_pos"])

    def describe(self, name):
        return wordtags.describe(self.documents[name], prepared_part(self, name), self.data_labels)

    def show(self, index):
        sample = self.documents[self.cfg.train_split][index]
        tagged = [f"{w}/{self.data_labels[t]}" for w, t in zip(sample["words"], sample["ner_tags"])]
        return f"form {sample['id']!r}, {len(tagged)} words: {' '.join(tagged[:15])} ...; first boxes {sample['boxes'][:2]}"

    def metrics(self, preds, labels):
        return wordtags.tag_metrics(preds, labels, self.labels)

    def save_pretrained(self, model, directory, role):
        """A directory plain transformers can load: the model with its tokenizer (and the teacher's page size)."""
        model.save_pretrained(directory)
        if role == "teacher":
            self.teacher_tokenizer.save_pretrained(directory)
            self.teacher_processor.save_pretrained(directory)
        else:
            self.tokenizer.save_pretrained(directory)


def use_model_labels(task, model_labels):
    """Work in a saved model's label space (eval of a model on data holding some of its classes).

    Classes are matched by name; task.labels become the model's, task.data_labels keep the dataset's and the
    collator maps the dataset's label ids to the model's. Data with a class the model does not know is left as it
    is: evaluate.load_saved_student refuses it, naming the classes.
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


def prepare_splits(task, load_unlabeled, preprocess):
    """task.splits: every split of task.documents preprocessed, unusable documents handled by --on-bad-sample.

    With --labeled-fraction F < 1, the labels of a seeded 1 - F share of the training documents are hidden first
    (task.without_labels; with alpha 0 those documents are left out). With --unlabeled, load_unlabeled(cfg)'s documents (task.documents["unlabeled"], prepared: task.unlabeled)
    join the training split, numbered after its documents, so the teacher-logit cache holds a row for each.
    preprocess(split, desc=..., index_offset=..., num_proc=...) -> the split preprocessed (cached; --num-proc
    processes), every row kept.
    """
    cfg = task.cfg
    if cfg.mode == "train":
        task.documents[cfg.train_split] = dataset.keep_labeled_fraction(task.documents[cfg.train_split], cfg,
                                                                        task.without_labels)

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
    import datasets
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


def text_recognition(cfg, **kw):
    import textrec_task  # onnxruntime and jiwer are only needed for this task
    return textrec_task.build(cfg, **kw)


TASKS = {"sequence-classification": DocumentClassification, "token-classification": TokenClassification,
         "text-recognition": text_recognition}


def build_task(cfg, model_labels=None, **kw):
    """The task of cfg.task; model_labels (a saved model's classes) where the task can score in them."""
    cls = TASKS[cfg.task]
    if model_labels is not None and "model_labels" in inspect.signature(cls).parameters:
        kw["model_labels"] = model_labels
    return cls(cfg, **kw)
