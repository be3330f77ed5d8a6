"""Text recognition data: crops with transcripts, the student's charset and folding, CTC decoding, degradation,
metrics.

A crop is a piece of a page (a FUNSD word box, a SROIE text line) or an image of its own (a folder, CSV or JSONL
of crops). Its transcript may be missing: such a crop is unlabelled and only the teacher teaches on it.

Layout in time (shared by teacher and student, so their CTC time steps coincide):
    teacher: the clean crop resized to height 48, width W = ceil(48 w / h) (at most --max-text-width), padded on
             the right to P = max(320, W rounded up to 8): P / 8 time steps (PP-OCR's recogniser input);
    student: the same crop, degraded, resized to height --student-height and width ceil(W / 2), padded to P / 2;
             its backbone halves the width twice: P / 8 time steps as well.
"""
import csv
import functools
import glob
import hashlib
import io
import json
import math
import os
import random
import unicodedata
import zlib

import jiwer
import numpy as np
from PIL import Image, ImageFilter

import wordtags
from config import UserError

TEACHER_HEIGHT = 48
MIN_TEACHER_WIDTH = 320  # PP-OCR pads every crop to at least 48 x 320
STEP = 8                 # teacher pixels per CTC time step
STUDENT_CHARS = "".join(chr(c) for c in range(32, 127))  # printable ASCII, space included
BLANK = 0                # class 0 is the CTC blank; character i of STUDENT_CHARS is class i + 1
IGNORE_INDEX = -100
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Beyond Unicode NFKC (which already maps full-width forms such as `，：（` onto `,:(`): typographic look-alikes.
FOLD = {"\u2018": "'", "\u2019": "'", "\u201a": ",", "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2013": "-",
        "\u2014": "-", "\u2212": "-", "\u2010": "-", "\u2011": "-", "\u00b7": ".", "\u3001": ",", "\u3002": ".",
        "\u00ab": '"', "\u00bb": '"', "\u00d7": "x", "\u2026": "...", "\u00b4": "'", "\u2032": "'", "\u3000": " "}


def fold(text):
    """Text on the student's ASCII charset: NFKC, look-alikes folded, accents stripped, anything else dropped."""
    text = "".join(FOLD.get(c, c) for c in unicodedata.normalize("NFKC", text))
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return "".join(c for c in text if c in STUDENT_CHARS)


def fold_char(char):
    """The student class of one teacher character: its fold when that is exactly one ASCII character, else blank."""
    folded = fold(char)
    return STUDENT_CHARS.index(folded) + 1 if len(folded) == 1 else BLANK


def student_labels():
    return ["<blank>"] + list(STUDENT_CHARS)


def encode(text):
    return [STUDENT_CHARS.index(c) + 1 for c in text]


def decode(ids):
    return "".join(STUDENT_CHARS[i - 1] for i in ids if 0 < i <= len(STUDENT_CHARS))


def ctc_greedy(best, length=None):
    """Best class per time step -> class ids: repeats merged, then blanks dropped (CTC's collapse)."""
    best = list(best[:length] if length is not None else best)
    return [c for k, c in enumerate(best) if c != BLANK and (k == 0 or c != best[k - 1])]


# ---------------------------------------------------------------------------------------------------- data

def _record(image, text, box=None, key=""):
    return {"image": image, "box": list(map(float, box)) if box is not None else [], "text": text,
            "has_text": text is not None, "key": key}


def funsd_records(root):
    """FUNSD words: every word with non-empty text, its box on its page."""
    found = wordtags.funsd_root(root)
    if found is None:
        return None
    splits = {}
    for folder, split in (("training_data", "train"), ("testing_data", "test")):
        rows = []
        for path in sorted(glob.glob(os.path.join(found, folder, "annotations", "*.json"))):
            form = os.path.splitext(os.path.basename(path))[0]
            with open(path) as f:
                words = [w for entity in json.load(f)["form"] for w in entity["words"] if w["text"].strip()]
            image = os.path.join(found, folder, "images", form + ".png")
            rows += [_record(image, w["text"], w["box"], f"{form}/{k}") for k, w in enumerate(words)]
        splits[split] = rows
    return splits


def sroie_records(root):
    """SROIE receipts: one text line per CSV row (x1,y1,...,x4,y4,text); the box is the quad's bounding box."""
    if not os.path.isdir(os.path.join(root, "box")):
        return None
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "box", "*.csv")) + glob.glob(os.path.join(root, "box", "*.txt"))):
        name = os.path.splitext(os.path.basename(path))[0]
        image = os.path.join(root, "img", name + ".jpg")
        with open(path, encoding="utf-8", errors="replace") as f:
            for k, line in enumerate(f):
                parts = line.rstrip("\n").split(",", 8)
                if len(parts) < 9 or not parts[8].strip():
                    continue
                xs, ys = list(map(float, parts[0:8:2])), list(map(float, parts[1:8:2]))
                rows.append(_record(image, parts[8], [min(xs), min(ys), max(xs), max(ys)], f"{name}/{k}"))
    return {"all": rows}


def table_records(path):
    """JSONL or CSV rows {image, text (optional), box (optional x0,y0,x1,y1)}; images relative to the file."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else list(csv.DictReader(f))
    out = []
    for k, row in enumerate(rows):
        if "image" not in row:
            raise UserError(f"{path} row {k + 1} has no 'image' column: each row needs an image and may have text")
        box = row.get("box") or None
        box = json.loads(box) if isinstance(box, str) else box
        text = row.get("text")
        out.append(_record(os.path.join(base, row["image"]), text if text not in (None, "") else None, box,
                           f"{os.path.basename(path)}/{k}"))
    return out


def folder_records(path):
    """Crop images; a transcript in NAME.txt next to NAME.png when there is one (otherwise unlabelled)."""
    out = []
    for image in sorted(p for p in glob.glob(os.path.join(path, "*")) if p.lower().endswith(IMAGE_EXTENSIONS)):
        txt = os.path.splitext(image)[0] + ".txt"
        text = open(txt, encoding="utf-8").read().strip("\n") if os.path.exists(txt) else None
        out.append(_record(image, text, None, os.path.basename(image)))
    return out


def split_rows(rows, seed, fractions):
    """A seeded split of rows by page (crops of one page stay together) into named fractions."""
    pages = sorted({r["image"] for r in rows})
    random.Random(seed).shuffle(pages)
    out, start = {}, 0
    for k, (name, share) in enumerate(fractions):
        stop = len(pages) if k == len(fractions) - 1 else start + max(1, round(share * len(pages)))
        chosen = set(pages[start:stop])
        out[name], start = [r for r in rows if r["image"] in chosen], stop
    return out


def load_records(source, seed):
    """train / validation / test lists of crop records from any supported source."""
    if not os.path.exists(source):
        raise UserError(f"--dataset {source}: no such file or directory (text recognition reads a FUNSD folder, "
                        f"a SROIE folder, a folder of crops, or a CSV/JSONL file or a folder of "
                        f"train/validation/test .jsonl files)")
    funsd = funsd_records(source) if os.path.isdir(source) else None
    if funsd:  # validation: 10% of the training forms, so the best epoch is never picked on test forms
        return {**split_rows(funsd["train"], seed, [("train", 0.9), ("validation", 0.1)]), "test": funsd["test"]}
    sroie = sroie_records(source) if os.path.isdir(source) else None
    if sroie:
        return split_rows(sroie["all"], seed, [("train", 0.7), ("validation", 0.1), ("test", 0.2)])
    if os.path.isdir(source):
        files = {name: os.path.join(source, f"{name}{ext}") for name in ("train", "validation", "test")
                 for ext in (".jsonl", ".csv") if os.path.exists(os.path.join(source, f"{name}{ext}"))}
        if files:
            return {name: table_records(path) for name, path in files.items()}
        rows = folder_records(source)
    else:
        rows = table_records(source)
    if not rows:
        raise UserError(f"--dataset {source} holds no crops")
    return split_rows(rows, seed, [("train", 0.8), ("validation", 0.1), ("test", 0.1)])


def records_key(rows, **settings):
    """Content key of a split's records (paths, sizes and dates of the images, boxes, texts, whether each text is a
    label: --labeled-fraction hides some) and the settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for image in sorted({r["image"] for r in rows}):
        stat = os.stat(image)
        digest.update(f"{image}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    digest.update(json.dumps([[r["image"], r["box"], r["text"], r.get("has_text", True), r["key"]]
                              for r in rows]).encode())
    return digest.hexdigest()[:20]


@functools.lru_cache(maxsize=4)
def open_page(path):
    with Image.open(path) as image:
        return image.convert("RGB")


def cut(row):
    """The crop as an RGB image: box cut from the page (or the whole image), vertical text turned upright."""
    page = open_page(row["image"])
    crop = page
    if row["box"]:
        x0, y0, x1, y1 = row["box"][:4]
        x0, x1 = sorted((max(0, int(round(x0))), min(page.width, int(round(x1)))))
        y0, y1 = sorted((max(0, int(round(y0))), min(page.height, int(round(y1)))))
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None
        crop = page.crop((x0, y0, x1, y1))
    if crop.height > 1.5 * crop.width:  # printed sideways: turn it as PaddleOCR does (np.rot90)
        crop = crop.transpose(Image.Transpose.ROTATE_90)
    return crop


def teacher_width(width, height, max_width):
    return max(1, min(max_width, math.ceil(TEACHER_HEIGHT * width / height)))


def padded_width(width):
    return max(MIN_TEACHER_WIDTH, -(-width // STEP) * STEP)


def resize_for_teacher(crop, max_width):
    """The clean crop at the teacher's height 48 and width ceil(48 w / h), resized by cv2 as PaddleOCR does."""
    import cv2  # heavy, text recognition only; from rapidocr-onnxruntime: PIL's bilinear differs from cv2's by up to a few grey levels
    size = (teacher_width(crop.width, crop.height, max_width), TEACHER_HEIGHT)
    return Image.fromarray(cv2.resize(np.asarray(crop.convert("RGB")), size))


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def degrade(image, seed, key, height=0, blur=0.0, noise=0.0, jpeg=0):
    """The student's view: downscaled to `height` px and back up, blurred, noised, JPEG-compressed; grey.

    Deterministic per (seed, crop key): the same crop always degrades the same way, on any machine.
    """
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    image = image.convert("L")
    if height and height < image.height:
        small = (max(1, round(image.width * height / image.height)), height)
        image = image.resize(small, Image.BILINEAR).resize(image.size, Image.BILINEAR)
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    if noise:
        pixels = np.asarray(image, np.float32) + rng.normal(0.0, noise, (image.height, image.width))
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if jpeg:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(jpeg))
        image = Image.open(buffer).convert("L")
    return image


def normalise(pixels):
    """uint8 -> PP-OCR's (x / 255 - 0.5) / 0.5, in [-1, 1]."""
    return (np.asarray(pixels, np.float32) / 255.0 - 0.5) / 0.5


def teacher_array(image):
    """[3, 48, W] float32, BGR channel order, normalised: PP-OCR's recogniser input before padding."""
    return normalise(np.asarray(image.convert("RGB"))[:, :, ::-1]).transpose(2, 0, 1)


# ------------------------------------------------------------------------------------------------- metrics

def text_metrics(truths, preds):
    """CER and WER over the whole split (edits / reference characters or words), exact-match word accuracy."""
    pairs = [(t, p) for t, p in zip(truths, preds) if t]
    if not pairs:
        return {"cer": float("nan"), "wer": float("nan"), "exact": float("nan"), "exact_nocase": float("nan"),
                "crops": 0}
    truths, preds = [t for t, _ in pairs], [p for _, p in pairs]
    # jiwer splits on whitespace and refuses empty hypotheses in some versions: score them as all-deleted.
    cer = jiwer.cer(truths, [p or "\x00" for p in preds]) if any(preds) else 1.0
    words = [(t, p) for t, p in pairs if t.split()]
    wer = jiwer.wer([t for t, _ in words], [p if p.split() else "\x00" for _, p in words])
    return {"cer": float(cer), "wer": float(wer),
            "exact": float(np.mean([t == p for t, p in pairs])),
            "exact_nocase": float(np.mean([t.lower() == p.lower() for t, p in pairs])), "crops": len(pairs)}


def char_errors(truth, pred):
    """Levenshtein distance between two strings (per-crop error ranking)."""
    prev = list(range(len(pred) + 1))
    for i, a in enumerate(truth, 1):
        cur = [i]
        for j, b in enumerate(pred, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != b)))
        prev = cur
    return prev[-1]
