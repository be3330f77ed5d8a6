"""Word tagging data: forms -> one BIO tag per word, and every word's first sub-token in two tokenisations.

A raw form has: id, image, words, boxes (0-1000, one per word) and ner_tags (ids into the tag names).
A preprocessed form has the student's token ids (text only), the teacher's token ids, boxes and page, and for
every word the position of its first sub-token in each sequence (-1 where that model has no token for it:
beyond its token limit, or a word its tokenizer reduces to nothing). Both models are read at these
positions, so a RoBERTa-BPE teacher and a WordPiece student meet word by word.
"""
import glob
import json
import os

import datasets
import numpy as np
import torch
from seqeval.metrics import classification_report
from seqeval.scheme import IOB2

import datacheck
import dataset
from config import UserError
from losses import IGNORE_INDEX

# FUNSD's entity types as BIO tags, in the order of the hub's nielsr/funsd-layoutlmv3.
FUNSD_TAGS = ["O", "B-HEADER", "I-HEADER", "B-QUESTION", "I-QUESTION", "B-ANSWER", "I-ANSWER"]
FUNSD_SPLITS = {"training_data": "train", "testing_data": "test"}
PREP_VERSION = "2"  # bump when the preprocessed forms change, so old caches are not reused


def features(tags):
    """Raw forms; boxes are not cast to 4 numbers, so a form with a bad box is reported, not a cast error.
    tags None: unlabelled forms, whose ner_tags are all IGNORE_INDEX (untag)."""
    return datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(),
        "words": datasets.Sequence(datasets.Value("string")),
        "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=tags) if tags else datasets.Value("int64")),
        "problem": datasets.Value("string"),  # why the form cannot be used (found while loading), "" when it can
    })


class FormProblem(ValueError):
    """What is wrong with one form's annotation; the form is reported or skipped (--on-bad-sample)."""


# ----------------------------------------------------------------------------- loading

def read_entities(path):
    """The entities (form[]) of a FUNSD annotation file, checked to have what bio_tags reads."""
    try:
        with open(path, encoding="utf-8") as f:
            annotation = json.load(f)
    except UnicodeDecodeError as e:
        raise FormProblem(datacheck.not_utf8(path, e)) from e
    except json.JSONDecodeError as e:
        raise FormProblem(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    entities = annotation.get("form") if isinstance(annotation, dict) else None
    if not isinstance(entities, list):
        raise FormProblem(f"{path} has no 'form' (the list of entities): give FUNSD annotations")
    for k, entity in enumerate(entities):
        if problem := entity_problem(entity):
            raise FormProblem(f"{path}: entity {k}: {problem}")
    return entities


def entity_problem(entity):
    """Why a FUNSD entity cannot be read: its label, its words, their text and 4-number boxes; or ""."""
    if not isinstance(entity, dict) or not isinstance(entity.get("words"), list):
        return "not an entity with a 'words' list"
    kind = str(entity.get("label")).upper()
    if kind != "OTHER" and f"B-{kind}" not in FUNSD_TAGS:
        return f"unknown label {entity.get('label')!r} (expected question, answer, header or other)"
    for j, word in enumerate(entity["words"]):
        if not isinstance(word, dict) or not isinstance(word.get("text"), str):
            return f"word {j} has no text (null or missing 'text')"
        box = word.get("box")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            return f"word {j} {word['text']!r} has box {box!r}: give 4 numbers [x0, y0, x1, y1] in pixels"
    return ""


def bio_tags(entities):
    """FUNSD entities (form[]) -> words, pixel boxes, BIO tags: B- on an entity's first word, I- on the rest,
    O for 'other'. Words with empty text are dropped (as in the hub's version of FUNSD)."""
    words, boxes, tags = [], [], []
    for entity in entities:
        kind = entity["label"].upper()
        kept = [w for w in entity["words"] if w["text"].strip()]
        for k, word in enumerate(kept):
            words.append(word["text"])
            boxes.append(word["box"])
            tags.append("O" if kind == "OTHER" else f"{'I' if k else 'B'}-{kind}")
    return words, boxes, tags


def funsd_root(path):
    """The folder holding training_data/ and/or testing_data/ (the path itself or its dataset/), else None."""
    for root in (path, os.path.join(path, "dataset")):
        if any(os.path.isdir(os.path.join(root, folder, "annotations")) for folder in FUNSD_SPLITS):
            return root
    return None


def load_funsd_folder(root):
    """The original FUNSD layout: {training_data,testing_data}/{images/ID.png, annotations/ID.json}."""
    splits = {}
    for folder, split in FUNSD_SPLITS.items():
        paths = sorted(glob.glob(os.path.join(root, folder, "annotations", "*.json")))
        rows = [funsd_form(path, os.path.join(root, folder, "images", form_id(path) + ".png")) for path in paths]
        if rows:
            columns = {name: [row[name] for row in rows] for name in features(FUNSD_TAGS)}
            splits[split] = datasets.Dataset.from_dict(columns, features=features(FUNSD_TAGS))
    return datasets.DatasetDict(splits)


def form_id(path):
    return os.path.splitext(os.path.basename(path))[0]


def funsd_form(annotation_path, image_path):
    """One raw form; a form that cannot be used keeps an empty row that names its file and what is wrong."""
    page_bytes = None  # kept in the row, so the data's fingerprint covers the pages too
    if os.path.isfile(image_path):
        with open(image_path, "rb") as f:
            page_bytes = f.read()
    page, problem = dataset.open_page({"bytes": page_bytes, "path": image_path})  # a missing file: its error
    try:
        if problem:
            raise FormProblem(f"{annotation_path}: {problem}")
        words, boxes, tags = bio_tags(read_entities(annotation_path))
        if problem := datacheck.box_problem(boxes, *page.size, fix="pixels of the page image") if words else "":
            raise FormProblem(f"{annotation_path}: {problem}")
    except FormProblem as e:
        return {"id": form_id(annotation_path), "image": None, "words": [], "boxes": [], "ner_tags": [],
                "problem": str(e)}
    return {"id": form_id(annotation_path), "image": {"bytes": page_bytes, "path": None}, "words": words,
            "boxes": dataset.normalize_boxes(boxes, *page.size) if boxes else [],
            "ner_tags": [FUNSD_TAGS.index(t) for t in tags], "problem": ""}


def from_hub_layout(data, tagged=True):
    """The hub's token-classification layout (nielsr/funsd-layoutlmv3: tokens, bboxes 0-1000, ner_tags, image).

    tagged False (--unlabeled): ner_tags may be absent; whatever is there is replaced by IGNORE_INDEX."""
    first = next(iter(data.values()))
    required = ["tokens", "bboxes", "ner_tags", "image"] if tagged else ["tokens", "bboxes", "image"]
    missing = set(required) - set(first.column_names)
    if missing:
        raise UserError(f"token-classification data needs the columns {', '.join(required)} "
                        f"(missing {', '.join(sorted(missing))}), or the original FUNSD folder layout")
    tags = hub_tags(first) if tagged else None
    out = {}
    for name, split in data.items():
        if "id" not in split.column_names:
            split = split.add_column("id", [str(i) for i in range(len(split))])
        split = split.rename_columns({"tokens": "words", "bboxes": "boxes"})
        split = split.add_column("problem", [""] * len(split))  # forms are checked while preprocessing
        split = split if tagged else untag(split)
        out[name] = split.select_columns(list(features(tags))).cast(features(tags))
    return datasets.DatasetDict(out), tags


def hub_tags(first):
    """The BIO tag names of the hub layout's ner_tags (a sequence of ClassLabel)."""
    tag_feature = getattr(first.features["ner_tags"], "feature", None)
    if not isinstance(tag_feature, datasets.ClassLabel):
        raise UserError("ner_tags must be a sequence of ClassLabel with the BIO tag names (O, B-X, I-X): cast it "
                        "with datasets.ClassLabel(names=[...])")
    tags = list(tag_feature.names)
    bad = [t for t in tags if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2)]
    if bad:
        raise UserError(f"ner_tags must be BIO tags (O, B-X, I-X); got {bad}")
    return tags


def untag(split):
    """The forms with every word's tag IGNORE_INDEX: unlabelled, so their tags (if any) are never read."""
    split = split.remove_columns([c for c in ("ner_tags",) if c in split.column_names])
    return split.add_column("ner_tags", [[IGNORE_INDEX] * len(words) for words in split["words"]],
                            feature=datasets.Sequence(datasets.Value("int64")))


def untag_some(split, hidden):
    """The forms with every tag IGNORE_INDEX at the indices `hidden` (--labeled-fraction), the others as they are."""
    tags = [[IGNORE_INDEX] * len(words) if i in hidden else tags
            for i, (words, tags) in enumerate(zip(split["words"], split["ner_tags"]))]
    return split.remove_columns("ner_tags").add_column("ner_tags", tags,
                                                       feature=datasets.Sequence(datasets.Value("int64")))


def load_word_source(source, cache_dir, tagged=True):
    """Raw forms (DatasetDict) and the tag names (None where not tagged) from a FUNSD folder or the hub layout."""
    root = funsd_root(source) if os.path.isdir(source) else None
    if root:
        return load_funsd_folder(root), FUNSD_TAGS if tagged else None
    return from_hub_layout(dataset.load_source(source, cache_dir), tagged)


def load_word_documents(cfg):
    """Raw forms (DatasetDict) and the tag names, with a validation split and at most cfg.max_samples each."""
    data, tags = load_word_source(cfg.dataset, cfg.cache_dir)
    data = dataset.ensure_splits(data, cfg)
    return datasets.DatasetDict({name: dataset.select_samples(split, cfg.max_samples, cfg.seed)
                                 for name, split in data.items()}), tags


def load_unlabeled_words(cfg):
    """The forms of --unlabeled (its 'train' split, or its only one), every tag IGNORE_INDEX: in training they
    add only the distillation term, over their words (see losses.py and WordCollator)."""
    return untag(dataset.unlabeled_split(load_word_source(cfg.unlabeled, cfg.cache_dir, tagged=False)[0], cfg))


# ----------------------------------------------------------------------------- alignment and preprocessing

def form_problem(words, boxes, tags):
    """Why a form's words, 0-1000 boxes and tags cannot be used together, or "" when they can."""
    if not len(words) == len(boxes) == len(tags):
        return f"{len(words)} words, {len(boxes)} boxes and {len(tags)} tags: give one box and one tag per word"
    if None in words:
        return f"word {words.index(None)} has no text (null)"
    return datacheck.box_problem(boxes, 1000, 1000, fix="LayoutLMv3's 0-1000 grid (x / page width * 1000), "
                                                        "not pixels")


def first_subtokens(word_ids, n_words):
    """Position of each word's first sub-token, from a tokenizer's word_ids(); -1 for words with no token."""
    positions = [-1] * n_words
    for i, word in enumerate(word_ids):
        if word is not None and positions[word] < 0:
            positions[word] = i
    return positions


def preprocess_words(split, tokenizer, teacher_tokenizer, teacher_spec, max_length, cache_dir, desc, index_offset=0,
                     num_proc=1):
    """Tokenise every form for the student (words) and the teacher (words, boxes, page); cached on disk.

    index_offset shifts the `index` column (unlabelled forms are numbered after the labelled ones)."""
    height, width = teacher_spec["size"]
    features = datasets.Features({
        "index": datasets.Value("int64"), "ner_tags": datasets.Sequence(datasets.Value("int16")),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "word_pos": datasets.Sequence(datasets.Value("int32")),
        "teacher_input_ids": datasets.Sequence(datasets.Value("int32")),
        "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("int16"), length=4)),
        "teacher_word_pos": datasets.Sequence(datasets.Value("int32")),
        "teacher_pixels": datasets.Array3D((3, height, width), "uint8"),
        "n_words": datasets.Value("int32"), "n_tokens": datasets.Value("int32"),
        "dropped_words": datasets.Value("int32"),
        "problem": datasets.Value("string"),  # why the form is unusable, "" when it is fine
    })

    def encode(batch, indices):
        pages, problems = [], []
        for cell, words, boxes, tags, problem in zip(batch["image"], batch["words"], batch["boxes"],
                                                     batch["ner_tags"], batch["problem"]):
            page, page_problem = (None, "") if problem else dataset.open_page(cell)
            pages.append(page)
            problems.append(problem or page_problem or form_problem(words, boxes, tags))
        # An unusable form keeps its row (flagged in "problem") with no words; see dataset.drop_bad_documents.
        words, boxes, tags = ([[] if p else row for row, p in zip(batch[column], problems)]
                              for column in ("words", "boxes", "ner_tags"))
        student = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        teacher = teacher_tokenizer(words, boxes=boxes, truncation=True, max_length=max_length)
        pos = [first_subtokens(student.word_ids(i), len(w)) for i, w in enumerate(words)]
        teacher_pos = [first_subtokens(teacher.word_ids(i), len(w)) for i, w in enumerate(words)]
        return {
            "index": [i + index_offset for i in indices], "ner_tags": tags, "input_ids": student["input_ids"], "word_pos": pos,
            "teacher_input_ids": teacher["input_ids"], "bbox": teacher["bbox"], "teacher_word_pos": teacher_pos,
            "teacher_pixels": [dataset.resize_page(page, teacher_spec) for page in pages],
            "n_words": [len(w) for w in words],
            "n_tokens": [max(len(a), len(b)) for a, b in zip(student["input_ids"], teacher["input_ids"])],
            "dropped_words": [sum(min(a, b) < 0 for a, b in zip(p, q)) for p, q in zip(pos, teacher_pos)],
            "problem": problems,
        }

    key = dataset.preprocess_key(split, task="words", words_version=PREP_VERSION,
                                 tokenizer=dataset.tokenizer_fingerprint(tokenizer),
                                 teacher_tokenizer=dataset.tokenizer_fingerprint(teacher_tokenizer),
                                 max_length=max_length, teacher=teacher_spec,
                                 **({"index_offset": index_offset} if index_offset else {}))
    split = split.cast_column("image", datasets.Image(decode=False))  # opened one by one, so a bad file is caught
    return dataset.cached_map(split, encode, features, os.path.join(cache_dir, "preprocessed"), key, desc,
                              num_proc)


# ----------------------------------------------------------------------------- batching and reading out

def pad_ids(sequences, pad_id):
    """Token id lists -> ids [B, L] padded to the longest, and the attention mask."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.as_tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


class WordCollator:
    """Pads both token sequences and the word axis to the batch's longest.

    labels [B, W] are IGNORE_INDEX at padding words and at words either model has no token for, so those
    words are in neither the loss nor the metrics. positions [B, W] are the other words, the ones both models
    read; labeled [B] is False for an unlabelled form (--unlabeled: every tag IGNORE_INDEX), which the loss
    then teaches at its positions by the KD term alone. The page, which only the teacher reads, is
    teacher_pixel_values; teacher_pixels False leaves it out (a cached teacher; collate.without_teacher_pixels).
    """

    def __init__(self, pad_token_id, teacher_pad_token_id, teacher_spec, teacher_pixels=True):
        self.pad_token_id, self.teacher_pad_token_id, self.teacher_spec = pad_token_id, teacher_pad_token_id, teacher_spec
        self.teacher_pixels = teacher_pixels

    def __call__(self, docs):
        input_ids, attention_mask = pad_ids([d["input_ids"] for d in docs], self.pad_token_id)
        teacher_ids, teacher_mask = pad_ids([d["teacher_input_ids"] for d in docs], self.teacher_pad_token_id)
        bbox = torch.zeros((*teacher_ids.shape, 4), dtype=torch.long)
        n_words = max(len(d["ner_tags"]) for d in docs)
        labels = torch.full((len(docs), n_words), IGNORE_INDEX, dtype=torch.long)
        word_pos = torch.zeros((len(docs), n_words), dtype=torch.long)
        teacher_word_pos = torch.zeros((len(docs), n_words), dtype=torch.long)
        positions = torch.zeros((len(docs), n_words), dtype=torch.bool)
        for i, d in enumerate(docs):
            bbox[i, :len(d["bbox"])] = torch.as_tensor(d["bbox"])
            pos, teacher_pos = torch.as_tensor(d["word_pos"]).long(), torch.as_tensor(d["teacher_word_pos"]).long()
            n = len(pos)
            positions[i, :n] = (pos >= 0) & (teacher_pos >= 0)
            labels[i, :n] = torch.where(positions[i, :n], torch.as_tensor(d["ner_tags"]).long(), IGNORE_INDEX)
            word_pos[i, :n] = pos.clamp(min=0)  # dropped words read position 0; their label masks them
            teacher_word_pos[i, :n] = teacher_pos.clamp(min=0)
        batch = {
            "input_ids": input_ids, "attention_mask": attention_mask, "word_pos": word_pos,
            "teacher_input_ids": teacher_ids, "teacher_attention_mask": teacher_mask, "bbox": bbox,
            "teacher_word_pos": teacher_word_pos,
            "labels": labels, "positions": positions,
            "labeled": torch.tensor([not bool((torch.as_tensor(d["ner_tags"]) == IGNORE_INDEX).any()) for d in docs]),
            "index": torch.tensor([int(d["index"]) for d in docs]),
        }
        if self.teacher_pixels:
            batch["teacher_pixel_values"] = dataset.normalize_pixels(
                torch.stack([torch.as_tensor(d["teacher_pixels"]) for d in docs]), self.teacher_spec)
        return batch


def at_words(token_logits, word_pos):
    """Token logits [B, L, C] -> word logits [B, W, C], read at each word's first sub-token."""
    return token_logits.gather(1, word_pos.unsqueeze(-1).expand(-1, -1, token_logits.shape[-1]))


def at_word_pairs(token_maps, word_pos):
    """Token-to-token maps [B, L, L] -> word-to-word maps [B, W, W], read at each word's first sub-token (rows and
    columns)."""
    rows = at_words(token_maps, word_pos)  # [B, W, L]
    return rows.gather(2, word_pos.unsqueeze(1).expand(-1, word_pos.shape[1], -1))


def tag_metrics(preds, labels, tags):
    """seqeval in strict IOB2 mode over the real words (label != IGNORE_INDEX), plus word accuracy."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    keep = labels != IGNORE_INDEX
    truth = [[tags[t] for t in row[k]] for row, k in zip(labels, keep)]
    guess = [[tags[t] for t in row[k]] for row, k in zip(preds, keep)]
    report = classification_report(truth, guess, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    empty = {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    overall = report.get("micro avg", empty)
    entities = sorted({t[2:] for t in tags if t != "O"})
    return {
        "f1": float(overall["f1-score"]), "precision": float(overall["precision"]),
        "recall": float(overall["recall"]), "macro_f1": float(report.get("macro avg", empty)["f1-score"]),
        "accuracy": float((preds == labels)[keep].mean()) if keep.any() else 0.0, "words": int(keep.sum()),
        "per_class": {e: {k: float(report.get(e, empty)[k]) for k in empty} for e in entities},
    }


def describe(split, prepared, tags):
    """Statistics `info` prints and training logs: forms, tags, words, and the words no model can score."""
    usable = prepared.with_format(None)
    ids = np.concatenate([np.asarray(t, dtype=np.int64) for t in usable["ner_tags"]])
    counts = np.bincount(ids[ids != IGNORE_INDEX], minlength=len(tags))  # unlabelled forms: no tags
    words = np.asarray(usable["n_words"])
    dropped = np.asarray(usable["dropped_words"])
    return {
        "documents": len(prepared),
        "skipped": len(split) - len(prepared),  # unusable, left out by --on-bad-sample skip
        "tag_counts": {name: int(c) for name, c in zip(tags, counts)},
        "words_per_document": {"mean": float(words.mean()), "median": float(np.median(words)),
                               "max": int(words.max()), "zero": int((words == 0).sum())},
        "truncated_share": float((dropped > 0).mean()),
        "truncated_word_share": float(dropped.sum() / max(words.sum(), 1)),
    }
