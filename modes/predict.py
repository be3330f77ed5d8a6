"""`--mode predict`: a saved student on new documents, without labels and without its teacher.
This file is over 400 lines because it holds the page handling of all three tasks beside the inputs and the run.

    python main.py --mode predict --model runs/demo/distilled/student --input scans/ report.pdf 'inbox/*.tif'

Inputs are image files (every page of a multi-page TIFF), PDFs (each page rendered with pypdfium2 at --pdf-dpi),
folders (searched recursively; hidden files are left out) and globs. Pages are OCR'd by --ocr-engine (Tesseract
by default; cached under CACHE_DIR/ocr, as in training), batched (--batch-size) and run through the student: the
PyTorch weights (a student/ directory or student_model.pth beside one) or the ONNX file written by --mode export.
Writes OUTPUT_DIR/predictions.jsonl, one line per page:

    page classification:  file, page, label, probability, top_k [{label, probability}], words, truncated
    word tagging:         file, page, words [{text, box, tag, probability}], entities [{type, text, box, words}]
    text recognition:     a crop: file, page, text, confidence; a page: one line per text line, file, page, line,
                          box, points, text, confidence, text_file (see TextPredictor), and text/NAME.pPAGE.txt

plus predictions.csv (page classification) and predict_summary.json (counts and where the time went). A file
that cannot be read is reported on one line ("failed: FILE: why") and counted; the others are still predicted.
Exit code: 0 every file predicted, 1 some failed, 2 bad usage (no --input, no usable model...).

Each task's pages are handled by its entry in PREDICTORS: a class built as predictor(directory, config, cfg, model)
with encode(page, ocr) -> item, collate(items) -> model inputs (torch; None when no item needs the model) and
rows(logits, items) -> one dict per page (see PagePredictor). --ocr-engine chooses the OCR of the page and word
tasks (Tesseract, or PP-OCRv4's detector with PP-OCRv4's recogniser or a distilled one: textrec/pages.py). The
student is read by the one loader of saved students (registry.load_student).
"""
import csv
import glob
import json
import logging
import os
import sys
import time
import types

import numpy as np
import pypdfium2 as pdfium
import torch
from PIL import Image, ImageOps, ImageSequence
from tqdm import tqdm
from transformers import AutoTokenizer
from transformers.models.layoutlmv3.image_processing_pil_layoutlmv3 import LayoutLMv3ImageProcessorPil

import dataset
import models
import ocr
import registry
import saved
import utils
from config import UserError
from textrec import crnn, pages
from wordtags import first_subtokens, pad_ids

log = logging.getLogger("docdistill")
PDF_MAGIC = b"%PDF"
# The most pixels a page may have: PIL's own limit for images (above it PIL refuses the file as a decompression
# bomb); a PDF page that would render larger at --pdf-dpi is rendered at the resolution that fits it.
MAX_PAGE_PIXELS = Image.MAX_IMAGE_PIXELS


# ----------------------------------------------------------------------------- inputs

def expand_inputs(patterns):
    """Files to read, in order and without repeats, and the patterns that matched nothing."""
    files, seen, missing = [], set(), []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(d, f) for d, dirs, names in os.walk(pattern)
                           for f in names if not f.startswith(".") and not any(p.startswith(".") for p in
                                                                              os.path.relpath(d, pattern).split(os.sep)
                                                                              if p != "."))
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            missing.append(pattern)
        for name in found:
            if name not in seen:
                seen.add(name)
                files.append(name)
    return files, missing


def read_pages(path, dpi):
    """Yield the pages of a file: every frame of an image file as training's `datasets` decodes it (its own mode,
    EXIF orientation applied: Tesseract reads a grey page and its RGB copy differently, and the OCR cache is keyed
    by the decoded pixels, so a page OCR'd in training is not OCR'd again), every page of a PDF in RGB (rendered at
    `dpi`, or at the resolution that keeps it within MAX_PAGE_PIXELS)."""
    with open(path, "rb") as f:
        head = f.read(len(PDF_MAGIC))
    if not head:
        raise ValueError("empty file (0 bytes)")
    if head == PDF_MAGIC or path.lower().endswith(".pdf"):
        try:
            pdf = pdfium.PdfDocument(path)
        except pdfium.PdfiumError as e:
            raise ValueError("not a readable PDF (damaged, encrypted, or a PDF with no pages)") from e
        try:
            if len(pdf) == 0:
                raise ValueError("the PDF has no pages")
            for index in range(len(pdf)):
                yield pdf[index].render(scale=pdf_scale(pdf[index].get_size(), dpi, path, index)).to_pil() \
                    .convert("RGB")
        finally:
            pdf.close()
        return
    try:
        image = Image.open(path)
    except Image.UnidentifiedImageError as e:
        raise ValueError("not an image or PDF that can be read (corrupt, or a format PIL does not know)") from e
    with image:
        for frame in ImageSequence.Iterator(image):
            frame.load()  # decode all of it now: a truncated file fails here
            yield ImageOps.exif_transpose(frame)  # a copy, upright where the EXIF says so


def pdf_scale(points, dpi, path, index):
    """Pixels per PDF point: dpi / 72, or less for a page that would have more than MAX_PAGE_PIXELS (a page a few
    hundred bytes can declare 200 inches wide), said in the log."""
    width, height = points
    scale = dpi / 72
    if width * height * scale * scale > MAX_PAGE_PIXELS:
        scale = (MAX_PAGE_PIXELS / max(width * height, 1)) ** 0.5
        log.warning("%s page %d is %.0f x %.0f inches: rendered at %.0f dpi instead of --pdf-dpi %d, to stay within "
                    "%d pixels", path, index + 1, width / 72, height / 72, 72 * scale, dpi, MAX_PAGE_PIXELS)
    return scale


# ----------------------------------------------------------------------------- the student

class OrtModel:
    """An ONNX file behind the interface of a transformers model: `model(**inputs).logits` (torch, CPU)."""

    def __init__(self, path, threads=None):
        import onnxruntime as ort  # heavy: only for exported students
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.path = path
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, **inputs):
        feed = {name: inputs[name].detach().cpu().numpy() for name in self.input_names}
        return types.SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feed)[0]))

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self


class CTCModel(torch.nn.Module):
    """The CRNN text recogniser behind the interface of a transformers model: model(pixel_values=...).logits."""

    def __init__(self, model):
        super().__init__()
        self.crnn = model
        self.config = model.config

    def forward(self, pixel_values):
        return types.SimpleNamespace(logits=self.crnn(pixel_values))


def config_object(config):
    """A saved student's config (a dict) as the object its model reads."""
    if config.get("model_type") == crnn.CRNNConfig.model_type:
        return crnn.CRNNConfig.from_dict(config)
    return models.config_from_dict(config)


def load_model(path):
    """(model, the directory with its tokenizer and image processor, its config), for the PyTorch weights
    (registry.load_student) or an ONNX file written by --mode export; `model(**inputs).logits`."""
    directory = saved.student_directory(path)
    raw = saved.read_config(directory if path.endswith(".onnx") else path)
    task_name = registry.task_name_of(raw, path)
    if task_name == "text-recognition" and raw.get("model_type") != crnn.CRNNConfig.model_type:
        raise UserError(f"{path} is a TrOCR-style (VisionEncoderDecoder) text-recognition student: --mode predict and "
                        f"export do not take it yet; score it with --mode eval --task text-recognition")
    if path.endswith(".onnx"):
        return OrtModel(path), directory, config_object(raw)
    model = registry.load_student(path)
    if task_name == "text-recognition":
        model = CTCModel(model).eval()
    return model, directory, model.config


def load_tokenizer(directory):
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the student's tokenizer from {directory} ({utils.first_line(e)})") from e


class PagePredictor:
    """Page classification (LayoutLMv3 student): OCR words with boxes and the page image -> one label."""
    needs_ocr = True

    def __init__(self, directory, config, cfg, model=None):
        self.tokenizer = load_tokenizer(directory)
        self.spec = dataset.image_spec(LayoutLMv3ImageProcessorPil.from_pretrained(directory))
        self.labels = [config.id2label[i] for i in range(len(config.id2label))]
        self.max_length, self.top_k = cfg.max_length, min(cfg.top_k, len(self.labels))

    def encode(self, page, ocr):
        words = ocr["ocr_words"]
        boxes = dataset.normalize_boxes(ocr["word_boxes"], page.width, page.height) if words else []
        enc = self.tokenizer([words], boxes=[boxes], truncation=True, max_length=self.max_length,
                             return_overflowing_tokens=True)
        return {"input_ids": enc["input_ids"][0], "bbox": enc["bbox"][0], "pixels": dataset.resize_page(page, self.spec),
                "words": len(words), "truncated": len(enc["input_ids"]) > 1}

    def collate(self, items):
        input_ids, attention_mask = pad_ids([i["input_ids"] for i in items], self.tokenizer.pad_token_id)
        bbox = torch.zeros((*input_ids.shape, 4), dtype=torch.long)
        for row, item in enumerate(items):
            bbox[row, :len(item["bbox"])] = torch.as_tensor(item["bbox"])
        pixels = torch.stack([torch.as_tensor(i["pixels"]) for i in items])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "bbox": bbox,
                "pixel_values": dataset.normalize_pixels(pixels, self.spec)}

    def rows(self, logits, items):
        out = []
        for probs, item in zip(pages.softmax(logits), items):
            best = np.argsort(-probs)[:self.top_k]
            out.append({"label": self.labels[best[0]], "probability": float(probs[best[0]]),
                        "top_k": [{"label": self.labels[i], "probability": float(probs[i])} for i in best],
                        "words": item["words"], "truncated": item["truncated"]})
        return out


class WordPredictor:
    """Word tagging (text-only student): OCR words -> one BIO tag per word, grouped into entities."""
    needs_ocr = True

    def __init__(self, directory, config, cfg, model=None):
        self.tokenizer = load_tokenizer(directory)
        self.labels = [config.id2label[i] for i in range(len(config.id2label))]
        self.max_length = cfg.max_length

    def encode(self, page, ocr):
        words = ocr["ocr_words"]
        enc = self.tokenizer([words], is_split_into_words=True, truncation=True, max_length=self.max_length)
        return {"input_ids": enc["input_ids"][0], "word_pos": first_subtokens(enc.word_ids(0), len(words)),
                "text": words, "boxes": ocr["word_boxes"]}

    def collate(self, items):
        input_ids, attention_mask = pad_ids([i["input_ids"] for i in items], self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def rows(self, logits, items):
        out = []
        for token_logits, item in zip(logits, items):
            probs = pages.softmax(token_logits)
            words = []
            for k, (text, box, pos) in enumerate(zip(item["text"], item["boxes"], item["word_pos"])):
                tag = int(probs[pos].argmax()) if pos >= 0 else None  # beyond the token limit: not tagged
                words.append({"text": text, "box": box, "tag": None if tag is None else self.labels[tag],
                              "probability": None if tag is None else float(probs[pos, tag])})
            out.append({"words": words, "entities": group_entities(words),
                        "untagged_words": sum(w["tag"] is None for w in words)})
        return out


def group_entities(words):
    """BIO-tagged words -> entities: B-X starts one, I-X continues an X (or starts one after anything else)."""
    entities, current = [], None
    for k, word in enumerate(words):
        tag = word["tag"] or "O"
        kind = tag[2:] if tag[:2] in ("B-", "I-") else None
        if kind is None:
            current = None
            continue
        if tag.startswith("B-") or current is None or current["type"] != kind:
            current = {"type": kind, "words": []}
            entities.append(current)
        current["words"].append(k)
    for entity in entities:
        members = [words[k] for k in entity["words"]]
        entity["text"] = " ".join(w["text"] for w in members)
        boxes = np.asarray([w["box"] for w in members])
        entity["box"] = [int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max())]
    return entities


class TextPredictor:
    """Text recognition (CRNN student): a crop -> its text; a page -> its lines (PP-OCRv4's detector finds them, the
    student reads them: textrec/pages.py) and the page's text in reading order.

    Which an image is (--read-as auto): a page when both its sides are at least pages.MIN_PAGE_SIDE (256) pixels
    (every PDF page at --pdf-dpi is one), else a crop; --read-as crop or page decides for every image. A crop is
    prepared as the student's eval crops are (pages.crop_item: upright, height 48 then the saved height, half the
    width, --max-text-width cap; no --degrade-*) and CTC-greedy decoded; confidence: the mean over the non-blank time
    steps of the best class's probability (over all steps when the text is empty). A page's lines are read the same
    way, sorted by width, pages.BATCH at a time, inside encode().
    """
    needs_ocr = False

    def __init__(self, directory, config, cfg, model=None):
        self.chars, self.height, self.max_width, self.read_as = config.chars, config.height, cfg.max_text_width, \
            cfg.read_as
        self.model, self.page_reader = model, None

    def is_page(self, image):
        return self.read_as == "page" or (self.read_as == "auto" and min(image.size) >= pages.MIN_PAGE_SIDE)

    def encode(self, page, ocr):
        if not self.is_page(page):
            return pages.crop_item(page, self.height, self.max_width)
        if self.page_reader is None:
            reader = pages.StudentReader(lambda pixels: self.model(pixel_values=pixels).logits, self.chars,
                                         self.height)  # a line at its own width, as PP-OCR reads it
            self.page_reader = pages.PageReader(reader)
        return {"lines": self.page_reader(page)}

    def collate(self, items):
        crops = [i for i in items if "lines" not in i]
        return {"pixel_values": pages.crop_batch(crops, self.height)} if crops else None

    def rows(self, logits, items):
        readings = iter(pages.crop_readings(logits, [i for i in items if "lines" not in i], self.chars)
                        if logits is not None else [])
        return [next(readings) if "lines" not in item else
                {"lines": item["lines"], "page_text": pages.page_text([line["box"] for line in item["lines"]],
                                                                      [line["text"] for line in item["lines"]])}
                for item in items]


PREDICTORS = {"sequence-classification": PagePredictor, "token-classification": WordPredictor,
              "text-recognition": TextPredictor}




# ----------------------------------------------------------------------------- the run

class Writer:
    """predictions.jsonl (and .csv for page classification) written as pages come, renamed into place at the end.

    A text-recognition page (a row with "lines") is one JSONL row per line (file, page, line, box, points, text,
    confidence, text_file) and a plain-text file of the page in reading order, OUTPUT_DIR/text/NAME.pPAGE.txt (NAME:
    the file's name; a second file of that name gets a number in front), moved into place at the end too."""

    def __init__(self, out_dir, with_csv):
        self.out_dir = out_dir
        self.paths = [os.path.join(out_dir, "predictions.jsonl")] + ([os.path.join(out_dir, "predictions.csv")]
                                                                     if with_csv else [])
        os.makedirs(out_dir, exist_ok=True)  # main.py creates no --output-dir up front (bad input leaves none)
        self.jsonl = open(self.paths[0] + ".tmp", "w")
        self.csv_file = open(self.paths[1] + ".tmp", "w", newline="") if with_csv else None
        if self.csv_file:
            self.csv = csv.writer(self.csv_file)
            self.csv.writerow(["file", "page", "label", "probability", "top_k"])
        self.texts, self.names = {}, {}  # page text files: name -> text; file -> its name

    def text_file(self, where):
        """text/NAME.pPAGE.txt for a page (NAME unique in this run)."""
        if where["file"] not in self.names:
            name = os.path.basename(where["file"])
            taken = set(self.names.values())
            self.names[where["file"]] = name if name not in taken else next(
                f"{k}-{name}" for k in range(2, len(taken) + 3) if f"{k}-{name}" not in taken)
        return os.path.join("text", f"{self.names[where['file']]}.p{where['page']}.txt")

    def write(self, where, row):
        if "lines" in row:  # a page read by a text-recognition student: a row per line and the page's text
            name = self.text_file(where)
            self.texts[name] = row["page_text"] + "\n"
            for k, line in enumerate(row["lines"]):
                self.jsonl.write(json.dumps({**where, "line": k + 1, **line, "text_file": name}, ensure_ascii=False)
                                 + "\n")
            return
        row = {**where, **row}
        self.jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.csv_file:
            self.csv.writerow([row["file"], row["page"], row["label"], f"{row['probability']:.4f}",
                               " ".join(f"{t['label']}:{t['probability']:.4f}" for t in row["top_k"])])

    def close(self, keep=True):
        """Rename the files into place (keep) or remove them (a run stopped by bad usage or an interrupt)."""
        for f in (self.jsonl, self.csv_file):
            if f:
                f.close()
        for path in self.paths:
            if keep:
                os.replace(path + ".tmp", path)
            else:
                os.remove(path + ".tmp")
        if keep and self.texts:
            texts = self.texts
            utils.atomic_files(os.path.join(self.out_dir, "text"), lambda tmp: [
                open(os.path.join(tmp, os.path.basename(name)), "w").write(text) for name, text in texts.items()])


def run(cfg):
    """Predict every page of every input; 0 when all files were read, 1 when some failed (2: UserError)."""
    if not cfg.input:
        raise UserError("--mode predict needs --input: image files, PDFs, folders or globs")
    outputs = [os.path.join(cfg.output_dir, name) for name in ("predictions.jsonl", "predictions.csv")]
    if any(os.path.exists(p) for p in outputs) and not cfg.overwrite:  # before any slow work
        found = ", ".join(os.path.basename(p) for p in outputs if os.path.exists(p))
        raise UserError(f"{cfg.output_dir} already holds predictions ({found}): replace them with --overwrite, or "
                        f"choose another --output-dir")
    files, missing = expand_inputs(cfg.input)
    if not files:
        raise UserError(f"--input {' '.join(cfg.input)}: no such file, folder or matching glob")
    path = cfg.model or os.path.join(cfg.output_dir, "student")
    model, directory, config = load_model(path)
    task_name = registry.task_name_of(config.to_dict(), path)
    predictor = PREDICTORS[task_name](directory, config, cfg, model)
    engine = pages.ocr_engine(cfg.ocr_engine) if predictor.needs_ocr else None
    device = torch.device("cuda" if torch.cuda.is_available() and isinstance(model, torch.nn.Module) else "cpu")
    if isinstance(model, torch.nn.Module):
        model.to(device)
    writer = Writer(cfg.output_dir, with_csv=task_name == "sequence-classification")
    failures = [(pattern, "no such file, folder or matching glob") for pattern in missing]
    seconds = {"read": 0.0, "ocr": 0.0, "prepare": 0.0, "model": 0.0}
    pending, count = [], 0

    def flush():
        nonlocal pending
        if not pending:
            return
        start = time.perf_counter()
        inputs, logits = predictor.collate([item for _, item in pending]), None
        if inputs is not None:  # None: nothing left for the model (text recognition pages read in encode)
            with torch.no_grad():
                logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu().numpy()
        seconds["model"] += time.perf_counter() - start
        for (where, _), row in zip(pending, predictor.rows(logits, [item for _, item in pending])):
            writer.write(where, row)
        pending = []

    cache = os.path.join(cfg.cache_dir, "ocr")
    try:
        for path in tqdm(files, desc="predict", unit="file"):
            page_number = 0
            try:
                start = time.perf_counter()
                for page in read_pages(path, cfg.pdf_dpi):
                    page_number += 1
                    seconds["read"] += time.perf_counter() - start
                    start = time.perf_counter()
                    words = ocr.cached_page_ocr(page, cache, engine) if predictor.needs_ocr else None
                    seconds["ocr"] += time.perf_counter() - start
                    start = time.perf_counter()
                    pending.append(({"file": path, "page": page_number}, predictor.encode(page, words)))
                    seconds["prepare"] += time.perf_counter() - start
                    count += 1
                    if len(pending) >= cfg.batch_size:
                        flush()
                    start = time.perf_counter()
            except ocr.OCRUnavailable as e:
                raise UserError(str(e)) from e
            except Exception as e:  # noqa: BLE001 - PIL, pdfium and the file system raise many kinds
                where = f"{path} page {page_number + 1}" if page_number else path
                failures.append((where, utils.first_line(e) or type(e).__name__))
                tqdm.write(f"failed: {where}: {failures[-1][1]}", file=sys.stderr)
        flush()
    except BaseException:
        writer.close(keep=False)
        raise
    writer.close()
    for where, why in failures[:len(missing)]:
        print(f"failed: {where}: {why}", file=sys.stderr)
    total = sum(seconds.values())
    summary = {"model": cfg.model or os.path.join(cfg.output_dir, "student"), "task": task_name,
               "files": len(files), "pages": count, "failed": len(failures),
               "failures": [{"input": w, "error": e} for w, e in failures], "seconds": seconds,
               "pages_per_second": count / total if total else None}
    utils.atomic_json(summary, os.path.join(cfg.output_dir, "predict_summary.json"))
    log.info("predicted %d pages of %d files in %.1f s (read %.1f s, OCR %.1f s, prepare %.1f s, model %.1f s); %d "
             "failed; written to %s", count, len(files), total, seconds["read"], seconds["ocr"], seconds["prepare"],
             seconds["model"], len(failures), writer.paths[0])
    return 1 if failures else 0
