"""Data: loading from any source, OCR when missing, preprocessing cached once.

A raw document has: image, width, height, ocr_words, word_boxes (pixels) and a label.
A preprocessed document has: input_ids, bbox (0-1000), the page resized once for the student and once for
the teacher (uint8, normalised per batch), the label, and bookkeeping (index, n_words, truncated).
Batches are made in collate.py. This file is over 400 lines because reading a source and preprocessing its
documents are the two halves of one format.
"""
import glob
import hashlib
import io
import json
import logging
import os
import random
import tempfile

import datasets
import numpy as np
import torch
from PIL import Image

import datacheck
import demo_corpus
import ocr
import utils
from config import UserError
from losses import IGNORE_INDEX  # also the label of a document without one (--unlabeled)

log = logging.getLogger("docdistill")
PREP_VERSION = "3"  # bump when the preprocessing output changes, so old caches are not reused


# ----------------------------------------------------------------------------- loading

def load_source(name, cache_dir):
    """DatasetDict from a hub id, save_to_disk directory, parquet/JSON file(s), image folder, or 'demo'."""
    if name in demo_corpus.CORPORA:  # the built-in generated corpora: demo, demo-teacher, demo-unlabeled
        return demo_corpus.load_corpus(name, cache_dir)
    if os.path.exists(name) or glob.glob(name):
        try:
            return _load_local(name)
        except UserError:
            raise
        except Exception as e:  # arrow, PIL and datasets raise many kinds of errors for a bad file
            raise UserError(f"cannot load dataset {name!r}: {utils.first_line(e)}: check its files are valid "
                            f"parquet, JSON (UTF-8) or images") from e
    if name.startswith((".", "/")) or os.sep in name and not _looks_like_hub_id(name):
        raise UserError(f"--dataset {name}: no such file or directory")
    try:
        return datasets.load_dataset(name)
    except Exception as e:  # hub errors come in many classes; the first line says what happened
        raise UserError(f"cannot load dataset {name!r}: {utils.first_line(e)} (offline? give a local directory or "
                        f"files instead of a hub id)") from e


def _load_local(name):
    """A save_to_disk directory, a folder of parquet/JSON files or of images by class, or files by glob."""
    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "dataset_dict.json")) or \
                os.path.exists(os.path.join(name, "dataset_info.json")):
            datacheck.check_saved_splits(name)
            loaded = datasets.load_from_disk(name)
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        files = {ext: sorted(glob.glob(os.path.join(name, f"*.{ext}"))) for ext in ("parquet", "json", "jsonl")}
        for ext, paths in files.items():
            if paths:
                return _load_files(paths, "json" if ext == "jsonl" else ext)
        return datasets.load_dataset("imagefolder", data_dir=name)
    paths = sorted(glob.glob(name))
    ext = os.path.splitext(paths[0])[1].lstrip(".")
    if ext not in ("parquet", "json", "jsonl"):
        raise UserError(f"--dataset {name}: files must be .parquet, .json or .jsonl, got .{ext}")
    return _load_files(paths, "json" if ext == "jsonl" else ext)


def _looks_like_hub_id(name):
    return name.count("/") == 1 and not os.path.exists(name.split("/")[0])


def _load_files(paths, builder):
    """One file per split when names say so (train.parquet, test-00000.parquet, ...), else one train split.
    An 'image' column of paths is read from those files, relative paths from the data files' folder."""
    if builder == "json":
        datacheck.check_text_files(paths)
    by_split = {}
    for path in paths:
        stem = os.path.basename(path).split(".")[0].split("-")[0]
        split = {"val": "validation", "valid": "validation", "dev": "validation"}.get(stem, stem)
        by_split.setdefault(split if split in ("train", "validation", "test") else "train", []).append(path)
    loaded = datasets.load_dataset(builder, data_files=by_split)
    folder = os.path.dirname(os.path.abspath(paths[0]))
    return datasets.DatasetDict({name: datacheck.resolve_image_paths(split, folder) for name, split in loaded.items()})


def label_names_of(split):
    """Class names of a split's label column, from its ClassLabel or its 'category' column."""
    if "label" not in split.column_names:
        raise UserError(f"dataset has no 'label' column (columns: {', '.join(split.column_names)}): "
                        f"add one with the class of each document")
    feature = split.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if "category" in split.column_names:
        pairs = dict(zip(split["label"], split["category"]))
        unnamed = [i for i in range(max(pairs) + 1) if i not in pairs]
        if unnamed or min(pairs) < 0:
            raise UserError(f"label ids {unnamed or [min(pairs)]} have no 'category' name in the training split: "
                            f"number the classes 0..N-1 or make 'label' a ClassLabel with the names")
        return [pairs[i] for i in range(len(pairs))]
    raise UserError("the 'label' column has no class names: make it a ClassLabel or add a 'category' column")


def check_labels(split, name, labels):
    """Every split must use the training split's classes: the same names and ids inside 0..N-1."""
    if "label" not in split.column_names:
        raise UserError(f"split {name!r} has no 'label' column: add one with the class of each document")
    if _is_classlabel(split) and list(split.features["label"].names) != labels:
        names = split.features["label"].names
        raise UserError(f"split {name!r} has other class names than the training split (only in {name}: "
                        f"{sorted(set(names) - set(labels)) or '-'}; only in training: "
                        f"{sorted(set(labels) - set(names)) or '-'}): give every split the same label names")
    ids = np.asarray(split["label"])
    outside = np.flatnonzero((ids < 0) | (ids >= len(labels)))
    if outside.size:
        raise UserError(f"split {name!r}: document {outside[0]} has label {ids[outside[0]]}, outside the "
                        f"{len(labels)} classes 0..{len(labels) - 1} ({outside.size} such documents): relabel "
                        f"or remove them")
    if "category" in split.column_names:
        for i, (label, category) in enumerate(zip(ids, split["category"])):
            if labels[label] != category:
                raise UserError(f"split {name!r}: document {i} has label {label} with category {category!r}, but "
                                f"label {label} is {labels[label]!r} in the training split: use one numbering")


def ensure_splits(data, cfg):
    """The training and evaluation splits, none empty. Training without a 'validation' split carves one from the
    training data; --mode eval on data of one split (a folder of class folders: its documents are all 'train')
    scores that split; any other split the data lacks is an error (--mode eval never scores a carved split)."""
    if cfg.mode == "eval" and cfg.eval_split not in data and len(data) == 1:
        (only,) = data
        log.info("--eval-split %s: the data has one split, %r: all of its %d documents are scored", cfg.eval_split,
                 only, len(data[only]))
        data = datasets.DatasetDict({**data, cfg.eval_split: data[only]})
    carve = cfg.eval_split == "validation" and cfg.mode != "eval"
    for name, flag in ((cfg.train_split, "--train-split"), (cfg.eval_split, "--eval-split")):
        if name not in data and not (carve and name == cfg.eval_split):
            raise UserError(f"dataset has no split {name!r} (splits: {', '.join(data)}): use {flag} with one of them")
    datacheck.check_not_empty(data)
    if cfg.eval_split not in data:
        data = carve_validation(data, cfg.train_split, cfg.eval_split, cfg.seed)
    return data


def carve_validation(data, train_split, eval_split, seed):
    """10% of the training documents (seeded; stratified by class where there are class names) as eval_split."""
    train = data[train_split]
    try:
        parts = train.train_test_split(test_size=0.1, seed=seed,
                                       stratify_by_column="label" if _is_classlabel(train) else None)
    except ValueError as e:  # too few documents, or too few of a class, to put 10% aside
        raise UserError(f"the data has no {eval_split!r} split and 10% of the {len(train)} documents of "
                        f"{train_split!r} cannot be set aside for it ({utils.first_line(e)}): add a {eval_split!r} "
                        f"split, or more documents of each class") from e
    log.info("no %r split: using 10%% of %r for it (%d documents)", eval_split, train_split, len(parts["test"]))
    return datasets.DatasetDict({**data, train_split: parts["train"], eval_split: parts["test"]})


def _is_classlabel(split):
    return isinstance(split.features.get("label"), datasets.ClassLabel)


def select_samples(split, max_samples, seed):
    """At most max_samples documents (0 = all), a seeded random subset for quick trials."""
    if max_samples and len(split) > max_samples:
        return split.shuffle(seed=seed).select(range(max_samples))
    return split


def hidden_labels(n, labeled_fraction, seed):
    """--labeled-fraction: the indices of the n training documents whose labels are hidden, a seeded share of
    1 - labeled_fraction of them (at least one document keeps its label, unless the fraction is 0: none)."""
    if labeled_fraction >= 1 or n == 0:
        return set()
    keep = max(1, round(n * labeled_fraction)) if labeled_fraction > 0 else 0
    return set(random.Random(seed).sample(range(n), n - keep))


def keep_labeled_fraction(split, cfg, without_labels):
    """--labeled-fraction F < 1: a seeded 1 - F share of the training documents unlabelled (without_labels(split,
    hidden)), or, with alpha 0 (no teacher to teach them), left out; said in the log. `split`: a Dataset or a
    list of rows."""
    if cfg.labeled_fraction >= 1:
        return split
    hidden = hidden_labels(len(split), cfg.labeled_fraction, cfg.seed)
    log.info("--labeled-fraction %g: %d of %d training documents keep their labels; the other %d %s",
             cfg.labeled_fraction, len(split) - len(hidden), len(split), len(hidden),
             "are left out (alpha 0: no teacher)" if cfg.alpha == 0 else "are taught by the teacher alone")
    return hide_labels(split, hidden, without_labels, cfg.alpha)


def hide_labels(split, hidden, without_labels, alpha):
    """The documents at `hidden` unlabelled (without_labels(split, hidden)), or, with alpha 0, left out."""
    if alpha == 0:
        kept = [i for i in range(len(split)) if i not in hidden]
        return split.select(kept) if hasattr(split, "select") else [split[i] for i in kept]
    return without_labels(split, hidden)


def without_labels(split, hidden):
    """The documents with label IGNORE_INDEX at the indices `hidden`: unlabelled, taught by the teacher alone."""
    labels = [IGNORE_INDEX if i in hidden else label for i, label in enumerate(split["label"])]
    return split.remove_columns("label").add_column("label", labels)


def load_documents(cfg, engine=None):
    """The raw documents (DatasetDict) with OCR columns (read by `engine`, None: Tesseract, where the data has none),
    label names, and at most cfg.max_samples per split."""
    data = ensure_splits(load_source(cfg.dataset, cfg.cache_dir), cfg)
    data = datacheck.encode_string_labels(data, cfg.train_split)
    labels = label_names_of(data[cfg.train_split])
    out = {}
    for name, split in data.items():
        check_labels(split, name, labels)
        split = select_samples(split, cfg.max_samples, cfg.seed)
        if "ocr_words" not in split.column_names:
            split = ocr.add_ocr_columns(split, os.path.join(cfg.cache_dir, "ocr"), desc=f"OCR {name}",
                                        num_proc=cfg.num_proc, engine=engine)
        out[name] = split
    return datasets.DatasetDict(out), labels


def unlabeled_split(data, cfg):
    """The split of --unlabeled's source (DatasetDict) that joins training: 'train', or its only split; at most
    cfg.max_samples documents."""
    name = "train" if "train" in data else next(iter(data)) if len(data) == 1 else None
    if name is None:
        raise UserError(f"--unlabeled {cfg.unlabeled}: it has splits {', '.join(data)} and none is 'train': give "
                        f"a source whose documents are all meant for training")
    return select_samples(data[name], cfg.max_samples, cfg.seed)


def load_unlabeled(cfg, engine=None):
    """The documents of --unlabeled (its 'train' split, or its only one), with their labels, if any, removed; OCR
    by `engine` (None: Tesseract) where they have none.

    Each gets label IGNORE_INDEX: in training it adds only the distillation term (see losses.py).
    """
    split = unlabeled_split(load_source(cfg.unlabeled, cfg.cache_dir), cfg)
    split = split.remove_columns([c for c in ("label", "category") if c in split.column_names])
    if "ocr_words" not in split.column_names:
        split = ocr.add_ocr_columns(split, os.path.join(cfg.cache_dir, "ocr"), desc="OCR unlabeled",
                                    num_proc=cfg.num_proc, engine=engine)
    return split.add_column("label", [IGNORE_INDEX] * len(split))


# ----------------------------------------------------------------------------- preprocessing

def open_page(cell):
    """(page, "") from an image cell ({'bytes', 'path'} undecoded, or a PIL image), or (None, what is wrong)."""
    if isinstance(cell, Image.Image):
        return cell, ""
    if cell is None:
        return None, "document has no image"
    source = cell.get("path") or "(embedded bytes)"
    try:
        data = cell.get("bytes")
        if data is None:
            with open(cell["path"], "rb") as f:
                data = f.read()
        if not data:
            return None, f"image {source} is empty (0 bytes)"
        page = Image.open(io.BytesIO(data))
        page.load()  # decode it all now: a truncated file fails here, not halfway through training
        return page, ""
    except Image.UnidentifiedImageError:
        return None, f"image {source} is not a readable image (corrupt, or a format PIL does not know)"
    except Exception as e:  # PIL and the file system raise many kinds of errors for a bad file
        return None, f"image {source} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


def document_problem(words, boxes, width, height):
    """Why OCR words and pixel boxes [x0, y0, x1, y1] cannot be used, or "" when they can. A page without words (a
    file folder, a photo, handwriting OCR cannot read) is a document of its class: the student reads its image."""
    if not (width and height and width > 0 and height > 0):
        return f"page size {width}x{height} is not positive: fix its width and height columns"
    if len(boxes) != len(words):
        return f"{len(words)} OCR words but {len(boxes)} word boxes: give one box per word"
    return datacheck.box_problem(boxes, width, height, fix="pixels of this page (not 0-1000 or another scan's size)")


def normalize_boxes(boxes, width, height):
    """Pixel boxes -> LayoutLMv3's 0-1000 grid, corners ordered and clamped into the page."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, x1 = np.minimum(b[:, 0], b[:, 2]), np.maximum(b[:, 0], b[:, 2])
    y0, y1 = np.minimum(b[:, 1], b[:, 3]), np.maximum(b[:, 1], b[:, 3])
    scaled = np.stack([x0 / width, y0 / height, x1 / width, y1 / height], axis=1) * 1000
    return np.clip(np.round(scaled), 0, 1000).astype(np.int64).tolist()


def image_spec(processor):
    """What an image processor does to a page, as plain numbers: resize once, normalise per batch."""
    size = processor.size
    height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    return {"size": [int(height), int(width)], "resample": int(processor.resample),
            "scale": float(processor.rescale_factor) if processor.do_rescale else 1.0,
            "mean": [float(m) for m in processor.image_mean] if processor.do_normalize else [0.0] * 3,
            "std": [float(s) for s in processor.image_std] if processor.do_normalize else [1.0] * 3}


def resize_page(image, spec):
    """Page -> uint8 [3, H, W], resized the way the model's processor resizes (None -> a blank placeholder)."""
    height, width = spec["size"]
    if image is None:
        return np.zeros((3, height, width), dtype=np.uint8)
    page = utils.to_rgb(image).resize((width, height), resample=Image.Resampling(spec["resample"]))
    return np.asarray(page, dtype=np.uint8).transpose(2, 0, 1)


def normalize_pixels(pixels, spec):
    """uint8 [B, 3, H, W] -> float [B, 3, H, W] exactly as the processor would have produced them."""
    mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"]).view(1, 3, 1, 1)
    return (pixels.float() * spec["scale"] - mean) / std


def tokenizer_fingerprint(tokenizer):
    """What the tokenizer encodes with, not the truncation and padding its last call left set (a tokenizer that
    has encoded a split would otherwise key the next split differently from a fresh one)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def preprocess_key(split, **settings):
    blob = json.dumps({"data": split._fingerprint, "version": PREP_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_map(split, fn, features, cache_dir, key, desc, num_proc=1):
    """split.map(fn) computed once: the result lives in cache_dir/key.arrow and is reused by later runs.

    num_proc > 1: the split is cut into that many contiguous shards, mapped in parallel (datasets' map; `fn` gets
    the same global indices) and their files joined into the one file, in order: the same file as with one."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{key}.arrow")
    if not os.path.exists(path):
        # beside the cache and swapped in whole: a killed run never leaves a half-written cache behind
        with tempfile.TemporaryDirectory(prefix=f".{key}.tmp", dir=cache_dir) as tmp:
            mapped = split.map(fn, batched=True, batch_size=32, remove_columns=split.column_names,
                               features=features, with_indices=True, cache_file_name=os.path.join(tmp, "map.arrow"),
                               load_from_cache_file=False, desc=desc, num_proc=num_proc if num_proc > 1 else None)
            if len(mapped.cache_files) > 1:  # one file per process
                mapped = mapped.flatten_indices(cache_file_name=os.path.join(tmp, "joined.arrow"))
            os.replace(mapped.cache_files[0]["filename"], path)
    return datasets.Dataset.from_file(path).with_format("torch")  # arrays, not nested Python lists


def preprocess_classification(split, tokenizer, student_spec, teacher_spec, max_length, cache_dir, desc,
                              index_offset=0, num_proc=1):
    """Tokenise words with boxes, resize pages for student and teacher; cached on disk by content key.

    index_offset shifts the `index` column (unlabelled documents are numbered after the labelled ones).
    teacher_spec None: a teacher that reads no page (the demo's): no teacher pages are made or stored.
    """
    st_h, st_w = student_spec["size"]
    features = datasets.Features({
        "index": datasets.Value("int64"), "label": datasets.Value("int64"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("int16"), length=4)),
        "n_words": datasets.Value("int32"), "n_tokens": datasets.Value("int32"), "truncated": datasets.Value("bool"),
        "student_pixels": datasets.Array3D((3, st_h, st_w), "uint8"),
        "problem": datasets.Value("string"),  # why the document is unusable, "" when it is fine
    })
    if teacher_spec is not None:
        features["teacher_pixels"] = datasets.Array3D((3, *teacher_spec["size"]), "uint8")

    def encode(batch, indices):
        pages, problems = [], []
        for cell, words, boxes, w, h in zip(batch["image"], batch["ocr_words"], batch["word_boxes"], batch["width"],
                                            batch["height"]):
            page, problem = open_page(cell)
            pages.append(page)
            problems.append(problem or document_problem(words, boxes, w, h))
        # An unusable document keeps its row (flagged in "problem") with empty placeholders; see drop_bad_documents.
        words = [[] if p else w for w, p in zip(batch["ocr_words"], problems)]
        boxes = [[] if p else normalize_boxes(b, w, h) for b, w, h, p in
                 zip(batch["word_boxes"], batch["width"], batch["height"], problems)]
        enc = tokenizer(words, boxes=boxes, truncation=True, max_length=max_length,
                        return_overflowing_tokens=True)
        first = {}  # keep the first window of every document; later windows mean it was truncated
        for row, doc in enumerate(enc["overflow_to_sample_mapping"]):
            first.setdefault(doc, row)
        mapping = enc["overflow_to_sample_mapping"]
        input_ids = [enc["input_ids"][first[d]] for d in range(len(indices))]
        encoded = {
            "index": [i + index_offset for i in indices], "label": batch["label"], "input_ids": input_ids,
            "n_tokens": [len(ids) for ids in input_ids],
            "bbox": [enc["bbox"][first[d]] for d in range(len(indices))],
            "n_words": [len(w) for w in words],
            "truncated": [mapping.count(d) > 1 for d in range(len(indices))],
            "student_pixels": [resize_page(page, student_spec) for page in pages],
            "problem": problems,
        }
        if teacher_spec is not None:
            encoded["teacher_pixels"] = [resize_page(page, teacher_spec) for page in pages]
        return encoded

    key = preprocess_key(split, tokenizer=tokenizer_fingerprint(tokenizer), max_length=max_length,
                         student=student_spec, teacher=teacher_spec,
                         **({"index_offset": index_offset} if index_offset else {}))
    if isinstance(split.features.get("image"), datasets.Image):  # decoded one by one, so a bad file is caught
        split = split.cast_column("image", datasets.Image(decode=False))
    return cached_map(split, encode, features, os.path.join(cache_dir, "preprocessed"), key, desc, num_proc)


def drop_bad_documents(prepared, name, on_bad_sample):
    """--on-bad-sample: stop at the first document preprocessing flagged (fail), or leave them all out (skip).

    The usable documents are selected through an indices file next to the cached split (`<key>.usable.arrow`),
    so a large split is never loaded into memory, and the selection is part of the split's cache_files (the
    teacher-logit cache key)."""
    plain = prepared.with_format(None)
    problems = plain["problem"]
    bad = [i for i, p in enumerate(problems) if p]
    if not bad:
        return prepared
    first = f"document {plain[bad[0]]['index']}: {problems[bad[0]]}"
    if on_bad_sample == "fail":
        raise UserError(f"split {name!r}, {first} ({len(bad)} unusable documents in {name}): fix the data, or "
                        f"pass --on-bad-sample skip to leave such documents out")
    if len(bad) == len(problems):
        raise UserError(f"split {name!r}: all {len(bad)} documents are unusable (first, {first}): fix the data")
    log.warning("%s: skipping %d unusable documents of %d (first, %s)", name, len(bad), len(problems), first)
    usable = [i for i, p in enumerate(problems) if not p]
    source = os.path.splitext(prepared.cache_files[0]["filename"])[0]
    return prepared.select(usable, indices_cache_file_name=source + ".usable.arrow")


def describe(split, prepared, labels):
    """Statistics `info` prints and training logs: sizes, class balance, words, truncation (usable documents)."""
    ids = np.asarray(prepared["label"])
    counts = np.bincount(ids[ids != IGNORE_INDEX], minlength=len(labels))
    words = np.asarray(prepared["n_words"])
    return {
        "documents": len(prepared),
        "skipped": len(split) - len(prepared),  # unusable, left out by --on-bad-sample skip
        "class_counts": {name: int(c) for name, c in zip(labels, counts)},
        "words_per_document": {"mean": float(words.mean()), "median": float(np.median(words)),
                               "max": int(words.max()), "zero": int((words == 0).sum())},
        "truncated_share": float(np.mean(prepared["truncated"])),
    }

