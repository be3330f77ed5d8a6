"""
OCR for document-image datasets that ship without OCR columns: Tesseract, or another engine (--ocr-engine).
Each page is OCR'd once; results are cached on disk keyed by a hash of the image content (and, for an engine other
than Tesseract, its `key`: Tesseract's entries keep the key they always had, so existing caches are reused).

An engine is any object with `key` (bytes naming it and its models) and `read(image) -> dict` of ocr_page()'s
format; textrec/pages.py builds them (PP-OCRv4's detector with PP-OCRv4's recogniser or a distilled one). None
means Tesseract.
"""

import hashlib
import json
import os
import tempfile

import datasets
import pytesseract
from PIL import Image

import utils
from config import UserError


class OCRUnavailable(UserError):
    pass


INSTALL_HINT = (
    "Tesseract is not installed, and the data has no OCR columns (ocr_words, word_boxes): install it with "
    "`apt-get install tesseract-ocr` (Debian/Ubuntu) or `brew install tesseract` (macOS), or give data that has "
    "OCR columns"
)

OCR_FEATURES = {
    "ocr_words": datasets.Sequence(datasets.Value("string")),
    "word_boxes": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
    "ocr_paragraphs": datasets.Sequence(datasets.Value("string")),
    "paragraph_boxes": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
    "width": datasets.Value("int32"),
    "height": datasets.Value("int32"),
}

CACHE_VERSION = b"ocr-v1"  # bump when the cached format or OCR settings change, so old entries are not reused


def ocr_page(image: Image.Image) -> dict:
    """OCR one page: words and paragraphs with [x0, y0, x1, y1] pixel boxes, in Tesseract's reading order."""
    if image.mode not in ("RGB", "L"):
        image = utils.to_rgb(image)
    try:
        data = pytesseract.image_to_data(image, output_type=pytesseract.Output.DICT)
    except pytesseract.TesseractNotFoundError as e:
        raise OCRUnavailable(INSTALL_HINT) from e

    words, boxes, paragraphs = [], [], {}
    for i, text in enumerate(data["text"]):
        text = text.strip()
        if not text or float(data["conf"][i]) < 0:  # conf -1 marks page/block/line rows, not words
            continue
        x0, y0 = int(data["left"][i]), int(data["top"][i])
        words.append(text)
        boxes.append([x0, y0, x0 + int(data["width"][i]), y0 + int(data["height"][i])])
        key = (data["page_num"][i], data["block_num"][i], data["par_num"][i])
        paragraphs.setdefault(key, []).append(len(words) - 1)

    par_texts, par_boxes = [], []
    for idx in paragraphs.values():
        par_texts.append(" ".join(words[j] for j in idx))
        par_boxes.append([
            min(boxes[j][0] for j in idx), min(boxes[j][1] for j in idx),
            max(boxes[j][2] for j in idx), max(boxes[j][3] for j in idx),
        ])
    return {"ocr_words": words, "word_boxes": boxes, "ocr_paragraphs": par_texts, "paragraph_boxes": par_boxes}


def _image_column(dataset: datasets.Dataset) -> str:
    image_cols = [name for name, f in dataset.features.items() if isinstance(f, datasets.Image)]
    if not image_cols:
        raise ValueError(f"no Image column to OCR in dataset with columns {dataset.column_names}")
    return "image" if "image" in image_cols else image_cols[0]


def page_key(engine):
    """The start of a page's cache key: Tesseract's as it always was; another engine's adds its key."""
    h = hashlib.sha256(CACHE_VERSION)
    if engine is not None:
        h.update(b"engine|" + engine.key + b"|")
    return h


def _cached_ocr(cell: dict, decoder: datasets.Image, cache_dir: str, engine=None) -> dict:
    h = page_key(engine)
    image = None
    if cell["bytes"] is not None:
        h.update(cell["bytes"])
    else:
        # path-only images (local or remote): hash the decoded pixels rather than fetch bytes ourselves
        image = _decode(decoder, cell)
        h.update(f"{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    return _ocr_stored_at(os.path.join(cache_dir, h.hexdigest() + ".json"), lambda: image or _decode(decoder, cell),
                          engine)


def _ocr_stored_at(path, get_image, engine=None):
    """The OCR result stored at `path`, or OCR of get_image() written there (only decoded when needed)."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    image = get_image()
    read = ocr_page(image) if engine is None else engine.read(image.convert("RGB"))
    result = {**read, "width": image.width, "height": image.height}
    # write to a temp file and rename so a crash or a concurrent run never leaves a half-written entry
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)
    return result


def cached_page_ocr(image: Image.Image, cache_dir: str, engine=None) -> dict:
    """OCR of a decoded page (--mode predict), cached under the same key as a path-only page in training."""
    os.makedirs(cache_dir, exist_ok=True)
    h = page_key(engine)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return _ocr_stored_at(os.path.join(cache_dir, h.hexdigest() + ".json"), lambda: image, engine)


class BadImage(Exception):
    pass


def _decode(decoder: datasets.Image, cell: dict) -> Image.Image:
    try:
        image = decoder.decode_example(cell)
        image.load()  # all of it now: a truncated file fails here
        return image
    except Exception as e:  # PIL raises many kinds of errors for a corrupt or empty file
        raise BadImage(str(e)) from e


def _ocr_or_blank(cell: dict, decoder: datasets.Image, cache_dir: str, engine=None) -> dict:
    """A page that cannot be decoded gets no words (not cached); preprocessing reports it (--on-bad-sample)."""
    try:
        return _cached_ocr(cell, decoder, cache_dir, engine)
    except BadImage:
        return {"ocr_words": [], "word_boxes": [], "ocr_paragraphs": [], "paragraph_boxes": [], "width": 0,
                "height": 0}


def add_ocr_columns(dataset: datasets.Dataset, cache_dir: str, desc: str = "OCR", num_proc: int = 1,
                    engine=None) -> datasets.Dataset:
    """Add ocr_words, word_boxes, ocr_paragraphs, paragraph_boxes (and width/height if missing), read by Tesseract
    (engine None) or by `engine`.

    num_proc > 1: pages are read in that many processes (datasets' map over contiguous shards, in order); each
    page's result is its own cache entry, so the columns are the same for any number."""
    if "ocr_words" in dataset.column_names:
        return dataset
    os.makedirs(cache_dir, exist_ok=True)
    col = _image_column(dataset)
    decoder = datasets.Image(mode=dataset.features[col].mode)
    # decode=False yields {"bytes", "path"}, so cache hits cost a hash instead of an image decode
    raw = dataset.select_columns([col]).cast_column(col, datasets.Image(decode=False))
    results = raw.map(lambda page: _ocr_or_blank(page[col], decoder, cache_dir, engine), remove_columns=[col],
                      features=datasets.Features(OCR_FEATURES), keep_in_memory=True, desc=desc,
                      num_proc=num_proc if num_proc > 1 else None,
                      new_fingerprint=hashlib.sha256(CACHE_VERSION + (b"" if engine is None else engine.key)
                                                     + raw._fingerprint.encode()).hexdigest()[:16])
    missing = [name for name in OCR_FEATURES if name not in dataset.column_names]  # keep the data's width/height
    return datasets.concatenate_datasets([dataset, results.select_columns(missing)], axis=1)
