"""--task text-recognition: a frozen OCR teacher (PP-OCRv4 in ONNX) -> a small CRNN student, CTC, CER/WER.

The teacher reads the clean crop at height 48; the student reads the same crop degraded (--degrade-*) at
--student-height, sized so both give the same number of CTC time steps (textrec/data.py's docstring). The task is a
tasks.Task; what it fills in differently from the classification tasks:
    make_loss(cfg)                ->  ctc_kd.CTCDistillationLoss (an nn.Module: its feature projections train
                                      with the student and are saved in the checkpoint)
    student_outputs, teacher_outputs  ->  what training feeds the loss: the logits, or with feature terms
                                      (--kd-terms feature_*, simkd) dicts of logits and features (the teacher cache
                                      then stores the features too, in float16: teacher_cache_extra)
    predictions(logits, batch)    ->  greedy-decoded ids and labels, [B, L] each, padded with IGNORE_INDEX
    evaluate(cfg, student, path)  ->  --mode eval: CER/WER, ms/crop, worst errors (textrec/evaluate.py)
"""
import copy
import hashlib
import io
import logging
import random

import datasets
import numpy as np
import torch
from PIL import Image

import dataset
import models
import tasks
from config import UserError
from textrec import conventions, crnn, ctc_kd, data, evaluate, simkd, teachers, trocr

log = logging.getLogger("docdistill")
FEATURES = datasets.Features({
    "index": datasets.Value("int64"), "image": datasets.Value("binary"), "text": datasets.Value("string"),
    "labels": datasets.Sequence(datasets.Value("int64")), "has_label": datasets.Value("bool"),
    "n_tokens": datasets.Value("int64"), "width": datasets.Value("int64"), "key": datasets.Value("string")})
PREP_VERSION = "1"


def key_hash(key):
    return int(hashlib.sha1(key.encode()).hexdigest()[:15], 16)


def prepare(rows, max_width, cache_dir, name):
    """Crops cut once and stored (PNG at the teacher's height) under cache_dir, keyed by their content."""
    key = "textrec-" + data.records_key(rows, max_width=max_width, version=PREP_VERSION)
    records = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(
        {"image": [], "box": [], "text": [], "has_text": [], "key": []})

    def crop(batch, indices):
        out = {k: [] for k in FEATURES}
        for i, image, box, text, has_text, crop_key in zip(indices, batch["image"], batch["box"], batch["text"],
                                                           batch["has_text"], batch["key"]):
            piece = data.cut({"image": image, "box": box})
            if piece is None:  # the box lies (almost) outside its page: a blank crop, left unlabelled
                piece, has_text = Image.new("RGB", (48, 48), "white"), False
            piece = data.resize_for_teacher(piece, max_width)
            folded = data.fold(text) if has_text else ""
            labelled = bool(has_text and folded)
            for k, v in (("index", i), ("image", data.png(piece)), ("text", folded),
                         ("labels", data.encode(folded) if labelled else []), ("has_label", labelled),
                         ("n_tokens", data.padded_width(piece.width) // data.STEP), ("width", piece.width),
                         ("key", crop_key)):
                out[k].append(v)
        return out

    prepared = dataset.cached_map(records, crop, FEATURES, cache_dir, key, desc=f"cut crops {name}")
    return records, prepared.with_format("torch", columns=["index", "labels", "has_label", "n_tokens", "width"],
                                         output_all_columns=True)


def untranscribed(rows, hidden):
    """The crop rows with the transcripts of those at `hidden` dropped (--labeled-fraction): unlabelled."""
    return [{**row, "has_text": False} if i in hidden else row for i, row in enumerate(rows)]


class Collator:
    """Teacher pixels (clean, 48 px, BGR) and student pixels (degraded, grey), one layout in time.

    teacher_image: for a teacher that reads crops of one fixed size (a VisionEncoderDecoder: trocr.ImageSpec.array),
    the clean crop -> [C, H, W] in place of the 48-px BGR crop; the time layout (step_mask) is kept either way.
    teacher_pixels False: no teacher_pixel_values (a cached teacher; collate.without_teacher_pixels).
    """

    def __init__(self, cfg, teacher_image=None, student_image=None, tokenize=None, teacher_pixels=True):
        self.height, self.seed, self.teacher_image = cfg.student_height, cfg.seed, teacher_image
        self.student_image, self.tokenize, self.teacher_pixels = student_image, tokenize, teacher_pixels
        self.degrade = dict(height=cfg.degrade_height, blur=cfg.degrade_blur, noise=cfg.degrade_noise,
                            jpeg=cfg.degrade_jpeg)
        self.augment, self.epochs = cfg.augment, None  # epochs: the training sampler, once bound (follow_epochs)

    def follow_epochs(self, sampler):
        """A copy for the training loader whose crops are augmented (--augment) by the sampler's epoch
        (recipe.EpochShuffle.epoch, set by the loop before each epoch); other loaders never augment."""
        bound = copy.copy(self)
        bound.epochs = sampler if self.augment else None
        return bound

    def student_view(self, image, key):
        """The student's grey crop: degraded (--degrade-*), and augmented in training (--augment)."""
        image = data.degrade(image, self.seed, key, **self.degrade)
        return data.augment(image, self.seed, self.epochs.epoch, key) if self.epochs is not None else image

    def student_array(self, image, key):
        """The student's crop at its height and half the teacher's width (the student steps every 4 px at half the
        width: the teacher's steps), as the exported graph computes it (data.student_pixels)."""
        return data.student_pixels(np.asarray(self.student_view(image, key)), self.height)

    def decoder_labels(self, items):
        """A sequence-to-sequence student's target token ids [B, L] (IGNORE_INDEX-padded; unlabelled: all)."""
        ids = [self.tokenize(item["text"]) if bool(item["has_label"]) else [] for item in items]
        labels = torch.full((len(items), max(1, max(map(len, ids)))), data.IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(ids):
            labels[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        return labels

    def teacher_array(self, images, padded):
        if self.teacher_image is not None:
            return np.stack([self.teacher_image(image) for image in images])
        teacher = np.zeros((len(images), 3, data.TEACHER_HEIGHT, padded), np.float32)
        for i, image in enumerate(images):
            array = data.teacher_array(image)
            teacher[i, :, :, :array.shape[2]] = array
        return teacher

    def __call__(self, items):
        images = [Image.open(io.BytesIO(item["image"])) for item in items]
        padded = max(data.padded_width(int(item["width"])) for item in items)
        if self.student_image is not None:  # a student reading crops of one fixed size (TrOCR-style)
            student = np.stack([self.student_image(self.student_view(image, item["key"]))
                                for image, item in zip(images, items)])
        else:
            student = np.zeros((len(items), 1, self.height, padded // 2), np.float32)
            for i, (item, image) in enumerate(zip(items, images)):
                array = self.student_array(image, item["key"])
                student[i, 0, :, :array.shape[1]] = array
        steps = torch.tensor([int(item["n_tokens"]) for item in items])
        longest = max(1, max(len(item["labels"]) for item in items))
        labels = torch.full((len(items), longest), data.IGNORE_INDEX, dtype=torch.long)
        for i, item in enumerate(items):
            labels[i, :len(item["labels"])] = torch.as_tensor(item["labels"], dtype=torch.long)
        batch = {"pixel_values": torch.from_numpy(student),
                 "teacher_width": torch.tensor([data.padded_width(int(item["width"])) for item in items]),
                 "step_mask": torch.arange(padded // data.STEP)[None, :] < steps[:, None],
                 "labels": labels, "has_label": torch.tensor([bool(item["has_label"]) for item in items]),
                 "index": torch.tensor([int(item["index"]) for item in items]),
                 "key_hash": torch.tensor([key_hash(item["key"]) for item in items])}
        if self.tokenize is not None:
            batch["decoder_labels"] = self.decoder_labels(items)
        if self.teacher_pixels:
            batch["teacher_pixel_values"] = torch.from_numpy(self.teacher_array(images, padded))
        return batch


def padded_predictions(paths, labels):
    """Predicted class ids (student charset) per crop and the labels, [B, L] each, padded with IGNORE_INDEX."""
    width = max(labels.shape[1], max(map(len, paths), default=0), 1)
    preds = torch.full((len(paths), width), data.IGNORE_INDEX, dtype=torch.long, device=labels.device)
    for i, path in enumerate(paths):
        preds[i, :len(path)] = torch.tensor(path, dtype=torch.long)
    return preds, torch.nn.functional.pad(labels, (0, width - labels.shape[1]), value=data.IGNORE_INDEX)


def build_teacher(cfg):
    """A transcripts .jsonl, a VisionEncoderDecoder directory or hub id (TrOCR), or an ONNX CTC recogniser."""
    if cfg.teacher.endswith(".jsonl"):
        return teachers.TranscriptTeacher(cfg.teacher)
    if trocr.is_vision_encoder_decoder(cfg.teacher):
        return trocr.TrOCRTeacher(cfg.teacher, cfg.max_new_tokens)
    return teachers.OnnxRecognizer(cfg.teacher)


def subset(rows, max_samples, seed):
    if max_samples and len(rows) > max_samples:
        return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), max_samples))]
    return rows


class TextRecognition(tasks.Task):
    metric_name = "char_accuracy"  # 1 - CER: higher is better, as the loop's "best" expects
    unit = "crops"
    item = "crop"

    def __init__(self, cfg, train_teacher=False, model_labels=None):
        if cfg.mode == "teacher":
            raise UserError("text recognition distils a pretrained recogniser (--teacher ppocrv4, an ONNX file or "
                            "a TrOCR directory): it has no --mode teacher; run --mode train")
        self.cfg = cfg
        records = data.load_records(cfg.dataset, cfg.seed, cfg.on_bad_sample)
        for split in (cfg.train_split, cfg.eval_split):
            if split not in records:
                raise UserError(f"--dataset {cfg.dataset} has no {split!r} split (it has {', '.join(records)})")
        self.documents, self.splits, self.unlabeled, rows_of = {}, {}, None, {}
        wanted = {"train": (cfg.train_split, cfg.eval_split), "eval": (cfg.eval_split,)}.get(cfg.mode, tuple(records))
        for name, rows in records.items():
            if name not in wanted:  # cutting crops is done once, but only for the splits this mode reads
                continue
            usable = [r for r in rows if not r["box"] or min(abs(r["box"][2] - r["box"][0]),
                                                            abs(r["box"][3] - r["box"][1])) >= 2]
            if len(usable) < len(rows):
                log.warning("%s: %d crops with a box under 2 px left out", name, len(rows) - len(usable))
            rows = subset(usable, cfg.max_samples, cfg.seed)
            unlabeled = []
            if name == cfg.train_split and cfg.mode == "train":
                rows = dataset.keep_labeled_fraction(rows, cfg, untranscribed)
                if cfg.unlabeled:  # after the labelled crops, so that their rows (and cache rows) come last
                    unlabeled = subset(data.unlabeled_records(cfg.unlabeled, cfg.on_bad_sample), cfg.max_samples,
                                       cfg.seed)
            rows_of[name] = rows + unlabeled
            self.documents[name], self.splits[name] = prepare(rows_of[name], cfg.max_text_width, cfg.cache_dir, name)
            if unlabeled:
                split = self.splits[name]
                self.documents["unlabeled"] = unlabeled
                self.unlabeled = split.select(range(len(split) - len(unlabeled), len(split)))
        self.labels = self.data_labels = data.student_labels()
        self.teacher = build_teacher(cfg)
        self.student = self.build_student(cfg)
        self.collator = self.make_collator(cfg)
        # Feature terms read the teacher's intermediate tensors as well as its log-probabilities: the teacher
        # cache stores them too (a cache of its own: 600 more values a step for PP-OCRv4, in float16).
        self.feature_terms = [t for t in cfg.kd_terms.split(",") if t.startswith("feature_") or t == "simkd"] \
            if cfg.uses_teacher else []
        self.teacher_cache_extra = ["outputs: logits, backbone, encoder"] if self.feature_terms else []
        self.teacher_top_k = cfg.teacher_top_k  # the cached per-step distributions: 8-bit, or top-k + the rest
        terms = [t for t in cfg.kd_terms.split(",") if t and t != "seq"]
        if cfg.uses_teacher and terms and isinstance(self.teacher, trocr.TrOCRTeacher):
            raise UserError(f"--kd-terms {','.join(terms)} needs per-time-step CTC distributions or features over the "
                            f"student's charset, which the TrOCR teacher {cfg.teacher} does not have (its tokens and "
                            f"decoding steps do not map onto them): use --kd-terms seq (sequence-level KD on its "
                            f"transcripts)")
        if self.feature_terms and not isinstance(self.teacher, teachers.OnnxRecognizer):
            raise UserError(f"--kd-terms {','.join(self.feature_terms)} needs the teacher's features: an ONNX "
                            f"recogniser (--teacher ppocrv4 or a .onnx), not transcripts ({cfg.teacher})")
        labelled = self.splits[cfg.train_split].with_format(None)["has_label"] if cfg.mode == "train" else [True]
        if not cfg.uses_teacher and not any(labelled):
            raise UserError(f"--dataset {cfg.dataset}: its {cfg.train_split!r} crops have no transcripts, and with "
                            f"--alpha 0 nothing teaches the student: give --alpha > 0 (the teacher alone teaches)")
        self.teacher_referenced = self.refer_to_teacher(cfg, rows_of) if cfg.mode in ("train", "eval") else None
        self.conventions = self.label_conventions(cfg)
        if "simkd" in self.feature_terms:  # the student's head becomes a projector + the teacher's frozen head
            simkd.attach(self.student, self.teacher)

    def refer_to_teacher(self, cfg, rows_of):
        """Scoring needs transcripts: when --eval-split has none at all (a folder of crops without .txt files), the
        teacher's readings of its crops are the reference instead (evaluate.teacher_transcripts, cached), said in
        the log, in every validation row (val_teacher_reference 1) and in eval.json ("reference"). Returns the
        split's name then, else None."""
        name = cfg.eval_split
        split = self.splits[name]
        if not len(split) or any(split.with_format(None)["has_label"]):
            return None
        read = evaluate.teacher_transcripts(self, cfg, split, torch.utils.data.DataLoader(
            split, batch_size=cfg.batch_size, collate_fn=self.collator))["texts"]
        log.warning("%s: none of its %d crops has a transcript: the teacher's readings of them are the reference "
                    "of every score on it (marked teacher_reference)", name, len(split))
        rows = [{**row, "text": text or None, "has_text": bool(text)} for row, text in zip(rows_of[name], read)]
        self.documents[name], self.splits[name] = prepare(rows, cfg.max_text_width, cfg.cache_dir, name)
        return name

    def label_conventions(self, cfg):
        """--label-conventions (distilling with labelled crops): how the labels write what the teacher reads
        (textrec/conventions.py), measured on a sample of the labelled training crops, logged, saved with the
        student (its config's label_conventions) and taught: the teacher's letters folded to the labels' case (its
        fold, or a transcript teacher's texts; part of the teacher cache's key), kl silent where a label keeps a
        space or trailing punctuation the teacher drops (the loss's label_gaps). None when not measured."""
        if not (cfg.mode == "train" and cfg.uses_teacher and cfg.label_conventions):
            return None
        split = self.splits[cfg.train_split]
        chosen = conventions.sample(split, cfg.seed)
        if not chosen:
            log.info("label conventions: no labelled training crops, nothing to measure")
            return None
        rows = split.with_format(None).select(chosen)
        if isinstance(self.teacher, teachers.TranscriptTeacher):
            readings = [self.teacher.texts.get(key, "") for key in rows["key"]]
        else:
            readings = []
            for start in range(0, len(chosen), cfg.batch_size):
                batch = self.collator([split[i] for i in chosen[start:start + cfg.batch_size]])
                readings += self.teacher.read(batch["teacher_pixel_values"], batch["teacher_width"])
        found = conventions.measure(rows["text"], readings)
        log.info("label conventions: %s", conventions.describe(found))
        case = found["case"] if found["case"] in ("upper", "lower") else None
        if case and isinstance(self.teacher, teachers.OnnxRecognizer):
            self.teacher.fold = self.teacher.fold @ torch.from_numpy(conventions.case_fold(case))
        elif case and isinstance(self.teacher, teachers.TranscriptTeacher):
            self.teacher.texts = {k: v.upper() if case == "upper" else v.lower() for k, v in self.teacher.texts.items()}
        elif case:
            log.warning("label conventions: letter case is not folded for a %s teacher", type(self.teacher).__name__)
        if case:
            self.teacher_cache_extra = [*self.teacher_cache_extra, f"label conventions: case {case}"]
        self.student.config.label_conventions = found
        return found

    def build_student(self, cfg):
        return crnn.build(data.STUDENT_CHARS, cfg.student_height, cfg.student_size)

    def make_collator(self, cfg, **kw):
        return Collator(cfg, teacher_image=self.teacher.spec.array if self.teacher.spec else None, **kw)

    # ------------------------------------------------------------------ forward passes, loss, predictions
    def teacher_logits(self, teacher, batch):
        mask = batch["step_mask"]
        if isinstance(teacher, teachers.TranscriptTeacher):
            hashes = {key_hash(k): k for k in teacher.texts}
            keys = [hashes.get(int(h), f"hash {int(h)}") for h in batch["key_hash"]]
            return teacher.forward_keys(keys, mask.shape[1], mask.sum(1)).to(batch["labels"].device)
        if isinstance(teacher, teachers.PathTeacher):  # a TrOCR teacher: transcripts generated from the crops
            return teacher(batch["teacher_pixel_values"], mask.sum(1), mask.shape[1]).to(batch["labels"].device)
        return teacher(batch["teacher_pixel_values"], batch["teacher_width"]).to(batch["labels"].device)

    def student_logits(self, student, batch):
        return student(batch["pixel_values"])

    def student_outputs(self, student, batch):
        """What training feeds the loss: the logits, or with feature terms {"logits", "backbone", "encoder"}."""
        return student(batch["pixel_values"], features=True) if self.feature_terms else student(batch["pixel_values"])

    def teacher_outputs(self, teacher, batch):
        if self.feature_terms:
            out = teacher.features(batch["teacher_pixel_values"], batch["teacher_width"])
            return {k: v.to(batch["labels"].device) for k, v in out.items()}
        return self.teacher_logits(teacher, batch)

    def make_loss(self, cfg):
        dims = None
        if self.feature_terms:
            student, teacher = self.student.feature_dims(), self.teacher.feature_dims()
            dims = {k: (student[k], teacher[k]) for k in student}
        return ctc_kd.CTCDistillationLoss(cfg.alpha, cfg.temperature, cfg.kd_terms.split(","), cfg.blank_weight,
                                          cfg.uses_teacher, cfg.feature_weight, dims,
                                          label_gaps=("all",) if cfg.mute_teacher_disagreements and cfg.uses_teacher
                                          else conventions.gap_kinds(self.conventions))

    def predictions(self, logits, batch):
        lengths = batch["step_mask"].sum(1).tolist()
        paths = [data.ctc_greedy(best, n) for best, n in zip(logits.argmax(-1).tolist(), lengths)]
        return padded_predictions(paths, batch["labels"])

    def metrics(self, preds, labels):
        texts = lambda rows: [data.decode([int(c) for c in row if c >= 0]) for row in rows]  # noqa: E731
        scores = data.text_metrics(texts(labels), texts(preds))
        marked = {"teacher_reference": 1.0} if self.teacher_referenced == self.cfg.eval_split else {}
        return {**scores, "char_accuracy": data.char_accuracy(scores["cer"]), **marked}

    # ------------------------------------------------------------------------------ describe, show, save
    def describe(self, name):
        """Statistics of a split ("unlabeled": the --unlabeled crops, which joined the training split)."""
        split = (self.unlabeled if name == "unlabeled" else self.splits[name]).with_format(None)
        chars = [len(t) for t, has in zip(split["text"], split["has_label"]) if has]
        steps = np.array(split["n_tokens"] or [0])
        widths = np.array(split["width"] or [0])
        too_long = sum(2 * len(t) + 1 > n for t, n in zip(split["text"], split["n_tokens"]))
        return {"documents": len(split), "labelled": len(chars), "unlabelled": len(split) - len(chars),
                "words_per_document": {"mean": float(np.mean(chars)) if chars else 0.0},
                "chars_per_crop": {"mean": float(np.mean(chars)) if chars else 0.0, "max": max(chars, default=0)},
                "time_steps": {"mean": float(steps.mean()), "max": int(steps.max())},
                "squeezed_at_max_width": int((widths >= self.cfg.max_text_width).sum()),
                "truncated_share": float((widths >= self.cfg.max_text_width).mean()) if len(split) else 0.0,
                "transcripts_longer_than_steps_allow": int(too_long)}

    def show(self, index):
        row = self.splits[self.cfg.train_split].with_format(None)[index]
        return (f"crop {row['key']!r}: {row['text']!r} ({'labelled' if row['has_label'] else 'unlabelled'}), "
                f"48 x {row['width']} px at the teacher, {row['n_tokens']} time steps")

    # ------------------------------------------------------------------------------ saved students, eval
    @classmethod
    def owns_saved(cls, config):
        return config.get("model_type") == crnn.CRNNConfig.model_type

    @classmethod
    def student_from_saved(cls, config, weights, path):
        """A CRNN student: its student/ directory (safetensors + JSON config) or student_model.pth."""
        return crnn.from_saved(config, weights, path)

    def check_saved(self, config, path):
        if not self.owns_saved(config):
            raise UserError(f"{path} holds a {config.get('model_type')} model, not a text-recognition student")

    def check_student(self, student, path):
        """Any CRNN reads crops: its charset is in its config, and the labels are folded onto it."""

    def evaluate(self, cfg, student, path):
        return evaluate.evaluate(self, cfg, student, path)
