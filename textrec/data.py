"""Text recognition data: crops with transcripts, the student's charset and folding, CTC decoding, degradation,
metrics. This file is over 400 lines because every crop source has its reader and its checks here.

A crop is a piece of a page (a FUNSD word box, a SROIE text line) or an image of its own (a folder, CSV or JSONL
of crops). Its transcript may be missing: such a crop is unlabelled and only the teacher teaches on it.

Layout in time (shared by teacher and student, so their CTC time steps coincide):
    teacher: the clean crop resized to height 48, width W = ceil(48 w / h) (at most --max-text-width), padded on
             the right to P = max(320, W rounded up to 8): P / 8 time steps (PP-OCR's recogniser input);
    student: the same crop, degraded, grey, at height --student-height and width ceil(W / 2) (student_pixels:
             the same arithmetic as the exported PP-OCR-contract graph, textrec/dropin.py), padded to P / 2;
             its backbone halves the width twice: P / 8 time steps as well.
"""
import csv
import functools
import glob
import hashlib
import io
import json
import logging
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

log = logging.getLogger("docdistill")

TEACHER_HEIGHT = 48
MIN_TEACHER_WIDTH = 320  # PP-OCR pads every crop to at least 48 x 320
STEP = 8                 # teacher pixels per CTC time step
STUDENT_CHARS = "".join(chr(c) for c in range(32, 127))  # printable ASCII, space included
BLANK = 0                # class 0 is the CTC blank; character i of STUDENT_CHARS is class i + 1
IGNORE_INDEX = -100
HALF_WIDTH_KERNEL = (1 / 8, 3 / 8, 3 / 8, 1 / 8)  # PIL's bilinear filter at scale 2, per output pixel
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

def _record(image, text, box=None, key="", problem=""):
    """One crop: its page (or crop) image, transcript (None: unlabelled), box on the page ([] : the whole image), key,
    and why it cannot be used ("" when it can)."""
    return {"image": image, "box": list(map(float, box)) if box and not problem else [], "text": text,
            "has_text": text is not None, "key": key, "problem": problem}


def box_of(value):
    """(box [x0, y0, x1, y1] or None, what is wrong with it or ""): a list of at least 4 numbers, or a JSON text of
    one (CSV), or nothing."""
    if value in (None, "", []):
        return None, ""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, f"box {value!r} is not a JSON list of numbers"
    if not (isinstance(value, list) and len(value) >= 4 and all(isinstance(v, (int, float)) and
                                                                not isinstance(v, bool) and math.isfinite(v)
                                                                for v in value[:4])):
        return None, f"box {value!r} is not 4 numbers [x0, y0, x1, y1]"
    return value[:4], ""


def image_problem(path):
    """Why a page or crop image cannot be read (missing, not an image, over PIL's pixel limit), or ""."""
    if not os.path.isfile(path):
        return f"image {path} does not exist"
    limit = f"over the {Image.MAX_IMAGE_PIXELS} pixels images may have (PIL's limit)"
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        return f"image {path} is {limit}"
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        return f"image {path} cannot be read ({type(e).__name__})"
    if width * height > Image.MAX_IMAGE_PIXELS:
        return f"image {path} is {width} x {height} pixels, {limit}"
    return ""


def with_image_problems(rows):
    """Rows whose image cannot be read get that problem (each image is looked at once)."""
    problems = {image: image_problem(image) for image in {r["image"] for r in rows if not r["problem"]}}
    return [{**r, "problem": r["problem"] or problems[r["image"]]} for r in rows]


def usable(rows, on_bad_sample, source):
    """--on-bad-sample: stop at the first row that cannot be used, naming its file and row (fail), or leave them
    all out and say how many (skip)."""
    bad = [r for r in rows if r["problem"]]
    if not bad:
        return rows
    if on_bad_sample == "fail":
        raise UserError(f"{bad[0]['problem']} ({len(bad)} unusable crops in {source}): fix the data, or pass "
                        f"--on-bad-sample skip to leave such crops out")
    if len(bad) == len(rows):
        raise UserError(f"--dataset {source}: all {len(bad)} crops are unusable (first: {bad[0]['problem']})")
    log.warning("%s: skipping %d unusable crops of %d (first: %s)", source, len(bad), len(rows), bad[0]["problem"])
    return [r for r in rows if not r["problem"]]


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


def table_rows(path):
    """(row number, row or what is wrong with its line) of a JSONL or CSV file."""
    try:
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".jsonl"):
                return [(k + 1, row) for k, row in enumerate(csv.DictReader(f))]
            lines = [(k + 1, line) for k, line in enumerate(f) if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from e
    rows = []
    for number, line in lines:
        try:
            rows.append((number, json.loads(line)))
        except ValueError as e:
            rows.append((number, f"is not valid JSON ({str(e).splitlines()[0]})"))
    return rows


def table_records(path):
    """JSONL or CSV rows {image, text (optional), box (optional x0,y0,x1,y1)}. Image paths are read as given:
    relative ones from the file's folder (a path may lead outside it, as the file says), absolute ones as they are.
    A row that cannot be used is kept with its problem, named by file and row (usable())."""
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for number, row in table_rows(path):
        key, where = f"{os.path.basename(path)}/{number - 1}", f"{path} row {number}"
        if isinstance(row, str) or not isinstance(row, dict):
            out.append(_record(None, None, None, key, f"{where} {row if isinstance(row, str) else 'is not an object'}"))
            continue
        image, text = row.get("image"), row.get("text")
        box, box_problem = box_of(row.get("box"))
        problem = (f"{where} has no 'image': each row needs an image and may have text" if not
                   isinstance(image, str) or not image else
                   f"{where}: 'text' must be a string, got {type(text).__name__}" if not isinstance(text, (str, type(None)))
                   else f"{where}: {box_problem}" if box_problem else "")
        out.append(_record(os.path.join(base, image) if isinstance(image, str) and image else None,
                           text if text not in (None, "") else None, box, key, problem))
    return out


def folder_records(path):
    """Crop images; a transcript in NAME.txt next to NAME.png when there is one (otherwise unlabelled)."""
    out = []
    for image in sorted(p for p in glob.glob(os.path.join(path, "*")) if p.lower().endswith(IMAGE_EXTENSIONS)):
        txt, text, problem = os.path.splitext(image)[0] + ".txt", None, ""
        if os.path.exists(txt):
            try:
                with open(txt, encoding="utf-8") as f:
                    text = f.read().strip("\n")
            except UnicodeDecodeError as e:
                problem = f"{txt} is not UTF-8 text (byte {e.start}): save it as UTF-8"
        out.append(_record(image, text, None, os.path.basename(image), problem))
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


def load_records(source, seed, on_bad_sample="fail"):
    """train / validation / test lists of crop records from any supported source; unusable rows handled by
    --on-bad-sample (usable())."""
    splits = read_records(source, seed, lambda rows: usable(with_image_problems(rows), on_bad_sample, source))
    return splits


def unlabeled_records(source, on_bad_sample="fail"):
    """Every crop of --unlabeled's source (all its splits), transcripts dropped: taught by the teacher alone."""
    rows = [r for split in read_records(source, 0, lambda rows: usable(with_image_problems(rows), on_bad_sample,
                                                                        source)).values() for r in split]
    return [{**r, "text": None, "has_text": False, "key": f"unlabeled/{r['key']}"} for r in rows]


def read_records(source, seed, check):
    """train / validation / test lists of crop records from any supported source; check(rows) -> the usable rows,
    applied before they are split."""
    if not os.path.exists(source):
        raise UserError(f"--dataset {source}: no such file or directory (text recognition reads a FUNSD folder, "
                        f"a SROIE folder, a folder of crops, or a CSV/JSONL file or a folder of "
                        f"train/validation/test .jsonl files)")
    funsd = funsd_records(source) if os.path.isdir(source) else None
    if funsd:  # validation: 10% of the training forms, so the best epoch is never picked on test forms
        return {**split_rows(check(funsd["train"]), seed, [("train", 0.9), ("validation", 0.1)]),
                "test": check(funsd["test"])}
    sroie = sroie_records(source) if os.path.isdir(source) else None
    if sroie:
        return split_rows(check(sroie["all"]), seed, [("train", 0.7), ("validation", 0.1), ("test", 0.2)])
    if os.path.isdir(source):
        files = {name: os.path.join(source, f"{name}{ext}") for name in ("train", "validation", "test")
                 for ext in (".jsonl", ".csv") if os.path.exists(os.path.join(source, f"{name}{ext}"))}
        if files:
            return {name: check(table_records(path)) for name, path in files.items()}
        rows = folder_records(source)
    else:
        rows = table_records(source)
    if not rows:
        raise UserError(f"--dataset {source} holds no crops")
    return split_rows(check(rows), seed, [("train", 0.8), ("validation", 0.1), ("test", 0.1)])


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


def augment(image, seed, epoch, key):
    """--augment: the student's grey training crop (L) with photometric changes, a pure function of (seed, epoch, crop
    key): each with probability 0.5, contrast x U(0.5, 1.2) and brightness + U(-40, 40), Gaussian blur of radius
    U(0.3, 1.2), noise of std U(2, 12), down to U(12, 24) px high and back up, JPEG at quality U(25, 80), a vertical
    shift of up to 3 px (edge rows repeated). Nothing moves sideways: the time steps stay the teacher's."""
    rng = np.random.default_rng([seed, epoch, zlib.crc32(key.encode()), 1])
    draw = rng.random(6) < 0.5
    pixels = np.asarray(image, np.float32)
    if draw[0]:
        pixels = (pixels - 128.0) * rng.uniform(0.5, 1.2) + 128.0 + rng.uniform(-40, 40)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if draw[1]:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    if draw[2]:
        pixels = np.asarray(image, np.float32) + rng.normal(0.0, rng.uniform(2, 12), (image.height, image.width))
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if draw[3]:
        height = int(rng.integers(12, 25))
        image = image.resize((image.width, height), Image.BILINEAR).resize(image.size, Image.BILINEAR)
    if draw[4]:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(25, 81)))
        image = Image.open(buffer).convert("L")
    if draw[5]:
        shift = int(rng.integers(-3, 4))
        rows = np.clip(np.arange(image.height) - shift, 0, image.height - 1)
        image = Image.fromarray(np.asarray(image)[rows])
    return image


def normalise(pixels):
    """uint8 -> PP-OCR's (x / 255 - 0.5) / 0.5, in [-1, 1]."""
    return (np.asarray(pixels, np.float32) / 255.0 - 0.5) / 0.5


@functools.lru_cache(maxsize=8)
def height_matrix(source, target):
    """[target, source]: PIL's bilinear resize of a column from `source` to `target` rows as a matrix (column k is
    PIL's float resize of a unit impulse at row k)."""
    matrix = np.zeros((target, source), np.float32)
    for k in range(source):
        impulse = np.zeros((source, 1), np.float32)
        impulse[k, 0] = 1.0
        matrix[:, k] = np.asarray(Image.fromarray(impulse, mode="F").resize((1, target), Image.BILINEAR))[:, 0]
    return matrix


def half_width(rows):
    """[..., W] -> [..., ceil(W / 2)]: PIL's bilinear filter at scale 2, (x[2i-1] + 3 x[2i] + 3 x[2i+1] + x[2i+2]) / 8,
    renormalised where it reaches past either edge."""
    width = rows.shape[-1]
    steps = 2 * ((width + 1) // 2)  # output i reads inputs 2i - 1 ... 2i + 2: one pad on the left, two on the right
    padded = np.pad(rows, [(0, 0)] * (rows.ndim - 1) + [(1, 2)])
    ones = np.pad(np.ones(width, np.float32), (1, 2))
    out = sum(k * padded[..., j:j + steps:2] for j, k in enumerate(HALF_WIDTH_KERNEL))
    norm = sum(k * ones[j:j + steps:2] for j, k in enumerate(HALF_WIDTH_KERNEL))
    return (out / norm).astype(np.float32)


def student_pixels(grey, height):
    """The student's input [height, ceil(W / 2)] of a grey crop at the teacher's height 48 (uint8 [48, W]):
    normalised, resized to `height` rows (height_matrix) and to half the width (half_width). The exported
    PP-OCR-contract graph (textrec/dropin.py) computes the same from PP-OCR's input."""
    pixels = normalise(grey)
    return half_width(height_matrix(pixels.shape[0], height) @ pixels)


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


def char_accuracy(cer):
    """1 - CER, clipped at 0: CER counts insertions too, so a reading much longer than its truth has a CER over 1."""
    return max(0.0, 1.0 - cer) if cer == cer else cer  # NaN (nothing scored) stays NaN


def char_errors(truth, pred):
    """Levenshtein distance between two strings (per-crop error ranking)."""
    prev = list(range(len(pred) + 1))
    for i, a in enumerate(truth, 1):
        cur = [i]
        for j, b in enumerate(pred, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != b)))
        prev = cur
    return prev[-1]
