"""Page classification and word tagging: the two tasks whose models are Hugging Face classifiers.

ClassificationTask holds what they share: several teachers averaged into one (kd_terms.TeacherEnsemble), what their
models feed the loss when --kd-terms compares features or attention maps (the logits, or the dict {"logits",
"features", "attention"} at the matched positions: task.matched(features, batch, role) and
task.matched_attention(maps, batch, role)), the loss (kd_terms.TermsLoss), saved students (transformers classes),
their metrics' evaluation (--mode eval: the teacher scored beside the student, agreement, throughput, per-class
table, confusion matrix). A subclass provides load_teacher(source, trainable) -> (teacher, ...),
teacher_input(loaded) (what its batches are made with) and one_teacher_logits(teacher, order, batch), and calls
add_teachers(cfg, trainable, first) and init_kd_terms(cfg) once its teacher, student and teacher_order are built.
This file is over 400 lines because both tasks, and what they share, live in it (one each would duplicate the rest).
"""
import contextlib
import functools
import logging
import os

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                          LayoutLMv3TokenizerFast)
from transformers.models.layoutlmv3.image_processing_pil_layoutlmv3 import LayoutLMv3ImageProcessorPil

import collate
import dataset
import demo_corpus
import heads
import kd_terms
import minilm
import models
import plots
import saved
import scoring
import tasks
import utils
import wordtags
from config import UserError
from losses import IGNORE_INDEX
from textrec import pages

log = logging.getLogger("docdistill")


def load_tokenizer(source, cache_dir, train_split=None):
    """Hub id or directory; 'demo' trains a byte-level BPE on the demo corpus (LayoutLMv3's tokenizer type),
    'minilm' is MiniLM-L6's WordPiece with word boxes (the tokenizer of the demo-minilm teacher)."""
    if source == "minilm":
        source = minilm.save_tokenizer(os.path.join(cache_dir, "minilm-tokenizer"))
    bare_bpe = source == "demo" or (os.path.isdir(source) and os.path.exists(os.path.join(source, "merges.txt"))
                                    and not os.path.exists(os.path.join(source, "tokenizer.json")))
    if source == "demo":
        # one directory per corpus: runs side by side (the demo's teacher and students) train on different ones
        source = demo_corpus.train_demo_tokenizer(train_split, os.path.join(cache_dir, "demo-tokenizer",
                                                                            train_split._fingerprint[:16]))
    try:  # a bare vocab.json + merges.txt folder does not say which tokenizer class it is for
        return LayoutLMv3TokenizerFast.from_pretrained(source) if bare_bpe else AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {source!r}: give a local directory with the tokenizer files "
                        f"or a reachable hub id ({str(e).splitlines()[0]})") from e


def verify_if_saved(source):
    """A teacher that docdistill saved (a --mode teacher run's teacher/, or a student/) is checked against its
    checksums before it is read: a corrupt one is refused in one line."""
    if os.path.isdir(source):
        saved.verify_directory(source)


class ClassificationTask(tasks.Task):
    """What page classification and word tagging share (see the module's docstring)."""
    auto_class = None  # the transformers Auto class of the student (and of a teacher that reads words)
    architecture = ""  # the end of a saved student's architecture name: ForSequenceClassification...

    # ------------------------------------------------------------------ saved students
    @classmethod
    def owns_saved(cls, config):
        return (config.get("architectures") or [""])[0].endswith(cls.architecture)

    @classmethod
    def student_from_saved(cls, config, weights, path):
        if weights is None:  # a save_pretrained directory (its checksums verified by registry.load_student)
            return models.from_pretrained(cls.auto_class, path)
        model = heads.restore_head(cls.auto_class.from_config(models.config_from_dict(config)))
        return models.load_student_weights(model, weights, path)

    # ------------------------------------------------------------------ teachers and terms
    def add_teachers(self, cfg, trainable, first):
        """With --teacher given several times, self.teacher becomes their TeacherEnsemble. Each teacher must read
        the batches the first one's preprocessing makes (the same tokenizer and page)."""
        if not cfg.extra_teachers:
            return
        teachers, orders = [self.teacher], [self.teacher_order]
        for source in cfg.extra_teachers:
            loaded = self.load_teacher(source, trainable)
            if self.teacher_input(loaded) != self.teacher_input(first):
                raise UserError(f"--teacher {source} reads its input otherwise than --teacher {cfg.teacher} (tokenizer "
                                f"or page size and normalisation): several teachers must read the same inputs")
            teachers.append(loaded[0])
            orders.append(models.match_labels(models.label_names(loaded[0]), self.labels))
        weights = [float(w) for w in cfg.teacher_weights.split(",")] if cfg.teacher_weights else [1.0] * len(teachers)
        self.teacher = kd_terms.TeacherEnsemble(teachers, orders, weights, cfg.temperature, self.labels)

    def teacher_logits(self, teacher, batch):
        if isinstance(teacher, kd_terms.TeacherEnsemble):
            return teacher.combine([self.one_teacher_logits(t, order, batch)
                                    for t, order in zip(teacher.teachers, teacher.orders)])
        return self.one_teacher_logits(teacher, self.teacher_order, batch)

    def init_kd_terms(self, cfg):
        self.kd_terms = kd_terms.chosen(cfg)
        self.feature_terms = [t for t in self.kd_terms if t in kd_terms.FEATURE_TERMS]
        self.attention = "attention" in self.kd_terms
        # The cache's key covers what it stores: a cache of logits and features is another cache, and an ensemble's
        # targets depend on the temperature they are averaged at (its weights are in its weights' fingerprint).
        stored = ((["features (classification head input)"] if self.feature_terms else []) +
                  (["attention (last layer, mean over heads, matched positions)"] if self.attention else []))
        self.teacher_cache_extra = (([f"outputs: logits, {', '.join(stored)}"] if stored else []) +
                                    ([f"teachers averaged in probability at T={cfg.temperature}"]
                                     if isinstance(self.teacher, kd_terms.TeacherEnsemble) else []))
        if "simkd" in self.kd_terms:
            heads.attach_simkd_head(self.student, heads.head_of(self.teacher), self.teacher_order)
        if self.attention:  # sdpa attention returns no maps
            self.student.set_attn_implementation("eager")
            self.teacher.set_attn_implementation("eager")

    # ------------------------------------------------------------------ models on a batch, the loss
    def outputs(self, model, batch, role, forward, head=None, head_output=False):
        """forward(model, batch) -> logits; with the terms' captures (features: the input, or the output, of
        `head`), the dict {"logits", "features", "attention"}."""
        if not self.feature_terms and not self.attention:
            return forward(model, batch)
        with contextlib.ExitStack() as stack:
            features = stack.enter_context(kd_terms.captured(head, head_output)) if self.feature_terms else None
            maps = stack.enter_context(kd_terms.attention_maps(model)) if self.attention else None
            out = {"logits": forward(model, batch)}
        if features is not None:
            out["features"] = self.matched(features[0], batch, role)
        if maps is not None:
            out["attention"] = self.matched_attention(maps[0], batch, role)
        return out

    def student_outputs(self, student, batch):
        simkd = "simkd" in self.feature_terms  # simkd: the projected features, else what the head reads
        head = heads.head_of(student)
        return self.outputs(student, batch, "student", self.student_logits, head.projector if simkd else head, simkd)

    def teacher_outputs(self, teacher, batch):
        return self.outputs(teacher, batch, "teacher", self.teacher_logits,
                            heads.head_of(teacher) if self.feature_terms else None)

    def make_loss(self, cfg):
        """kd_terms.TermsLoss over --kd-terms; without a teacher (cfg.uses_teacher False), CE alone."""
        teacher = cfg.uses_teacher
        widths = (heads.feature_width(heads.head_of(self.student)), heads.feature_width(heads.head_of(self.teacher))) \
            if teacher and "feature" in self.kd_terms else None
        return kd_terms.TermsLoss(cfg.temperature, cfg.alpha if teacher else 0.0, cfg.unlabeled_weight,
                                  self.kd_terms if teacher else ["kd"], cfg.feature_weight, widths)

    # ------------------------------------------------------------------ --mode eval
    def evaluate(self, cfg, student, path):
        """The student and the teacher scored on cfg.eval_split (scoring.score), their agreement and speed; writes
        per_class.md and confusion_matrix.png beside eval.json."""
        scored = scoring.score(self, student, cfg.eval_split, cfg, desc="student")
        result = {"model": path, "split": cfg.eval_split, "documents": len(self.splits[cfg.eval_split]),
                  **scored.metrics}
        result["classes"] = {"model": len(self.labels), "in_data": len(self.data_labels),
                             "not_in_data": [n for n in self.labels if n not in self.data_labels]}
        teacher = models.freeze(self.teacher)
        by_teacher = scoring.score(self, teacher, cfg.eval_split, cfg, forward=self.teacher_logits, desc="teacher")
        keep = scored.labels != IGNORE_INDEX
        # Throughput of a whole evaluation pass (batching included), counted in what the task scores.
        for role, model, run in (("student", student, scored), ("teacher", teacher, by_teacher)):
            result[f"{role}_parameters"] = models.count_parameters(model)
            result[f"{role}_{self.unit}_per_second"] = int(keep.sum()) / run.seconds
        result["teacher_agreement"] = float((scored.preds == by_teacher.preds)[keep].float().mean())
        result["teacher_" + self.metric_name] = by_teacher.metrics[self.metric_name]
        if scored.main_process:
            table = plots.per_class_table(result["per_class"])
            utils.atomic_text(table + "\n", os.path.join(cfg.output_dir, "per_class.md"))
            log.info("student per class on %s:\n%s", cfg.eval_split, table)
            if "confusion_matrix" in result:
                plots.plot_confusion(result["confusion_matrix"], self.labels,
                                     os.path.join(cfg.output_dir, "confusion_matrix.png"),
                                     f"student on {cfg.eval_split}: accuracy {result['accuracy']:.3f}")
            if result["classes"]["not_in_data"]:
                log.info("the data holds %d of the student's %d classes: scores are over those %d (not in the data: "
                         "%s); the confusion matrix covers all %d", len(self.data_labels), len(self.labels),
                         len(self.data_labels), ", ".join(result["classes"]["not_in_data"]), len(self.labels))
            log.info("%s on %s (%d documents): %s %.4f, teacher %s %.4f, agreement with teacher %.4f", path,
                     cfg.eval_split, result["documents"], self.metric_name, result[self.metric_name],
                     self.metric_name, result["teacher_" + self.metric_name], result["teacher_agreement"])
        return result


class DocumentClassification(ClassificationTask):
    """One label per page: image-only teacher (DiT) -> words + boxes + image student (LayoutLMv3).

    The loss's terms (--kd-terms, kd_terms.py) match the models' features at the pooled representation."""
    metric_name = "accuracy"
    unit = "documents"
    auto_class = AutoModelForSequenceClassification
    architecture = "ForSequenceClassification"

    def __init__(self, cfg, train_teacher=False, model_labels=None):
        self.cfg = cfg
        engine = pages.ocr_engine(cfg.ocr_engine)  # pages without OCR columns: --ocr-engine (None: Tesseract)
        documents, self.labels = dataset.load_documents(cfg, engine)
        tasks.use_model_labels(self, model_labels)
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
        tasks.prepare_splits(self, functools.partial(dataset.load_unlabeled, engine=engine),
                             lambda split, **kw: dataset.preprocess_classification(
            split, self.tokenizer, student_spec, teacher_spec, cfg.max_length, cfg.cache_dir, **kw),
            dataset.without_labels)
        self.collator = tasks.relabelled(self, collate.ClassificationCollator(self.tokenizer.pad_token_id, student_spec,
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
        verify_if_saved(source)
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
        return dataset.describe(self.documents[name], tasks.prepared_part(self, name), self.data_labels)

    def show(self, index):
        sample = self.documents[self.cfg.train_split][index]
        return (f"label {self.data_labels[sample['label']]!r}, {len(sample['ocr_words'])} words: "
                f"{' '.join(sample['ocr_words'][:20])} ...; first boxes {sample['word_boxes'][:2]}")

    def metrics(self, preds, labels):
        """Scores over the dataset's classes; the confusion matrix over all of self.labels (the model's, in eval)."""
        preds, labels = np.asarray(preds), np.asarray(labels)
        names = self.data_labels
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


class TokenClassification(ClassificationTask):
    """One BIO tag per word: words + boxes + image teacher (LayoutLMv3) -> text-only student (DistilBERT).

    The teacher's tokenizer is the one saved with it (--teacher). The two tokenizers split words differently,
    so each model is read at every word's first sub-token of its own sequence: both give [B, words, tags], and
    the features of --kd-terms feature/simkd are matched there too ([B, words, width]), and the attention maps of
    --kd-terms attention between them ([B, words, words]).
    """
    metric_name = "f1"
    unit = "words"
    item = "form"
    auto_class = AutoModelForTokenClassification
    architecture = "ForTokenClassification"

    def __init__(self, cfg, train_teacher=False, model_labels=None):
        self.cfg = cfg
        self.documents, self.labels = wordtags.load_word_documents(cfg)
        tasks.use_model_labels(self, model_labels)
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
        tasks.prepare_splits(self, wordtags.load_unlabeled_words, lambda split, **kw: wordtags.preprocess_words(
            split, self.tokenizer, self.teacher_tokenizer, spec, cfg.max_length, cfg.cache_dir, **kw),
            wordtags.untag_some)
        self.collator = tasks.relabelled(self, wordtags.WordCollator(self.tokenizer.pad_token_id,
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
        verify_if_saved(source)
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
        return wordtags.describe(self.documents[name], tasks.prepared_part(self, name), self.data_labels)

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
