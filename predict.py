"""`--mode predict`: a saved student on new documents, without labels and without its teacher.

    python main.py --mode predict --model runs/demo/distilled/student --input scans/ report.pdf 'inbox/*.tif'

Inputs are image files (every page of a multi-page TIFF), PDFs (each page rendered with pypdfium2 at --pdf-dpi),
folders (searched recursively; hidden files are left out) and globs. Pages are OCR'd with Tesseract (cached
under CACHE_DIR/ocr, as in training), batched (--batch-size) and run through the student: the PyTorch weights
(a student/ directory or student_model.pth beside one) or the ONNX file written by --mode export. Writes
OUTPUT_DIR/predictions.jsonl, one line per page:

    page classification:  file, page, label, probability, top_k [{label, probability}], words, truncated
    word tagging:         file, page, words [{text, box, tag, probability}], entities [{type, text, box, words}]
    text recognition:     file, page, text, confidence   (each image is one crop; no OCR: see CropPredictor)

plus predictions.csv (page classification) and predict_summary.json (counts and where the time went). A file
that cannot be read is reported on one line ("failed: FILE: why") and counted; the others are still predicted.
Exit code: 0 every file predicted, 1 some failed, 2 bad usage (no --input, no usable model...).

A task plugs in its own page handling by giving its class in tasks.TASKS a `predictor` attribute: a class built
as predictor(directory, config, cfg) with encode(page, ocr) -> item, collate(items) -> model inputs (torch) and
rows(logits, items) -> one dict per page (see PagePredictor).
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
import torch
from PIL import Image, ImageSequence
from tqdm import tqdm

import dataset
import utils
from config import UserError
from evaluate import read_student_file
from wordtags import pad_ids

log = logging.getLogger("docdistill")
PDF_MAGIC = b"%PDF"


# ----------------------------------------------------------------------------- inputs

def expand_inputs(patterns):
    """Files to read, in order and without repeats, and the patterns that matched nothing."""
    files, missing = [], []
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
        files += [f for f in found if f not in files]
    return files, missing


def read_pages(path, dpi):
    """Yield the pages of a file as RGB images: every frame of an image file, every page of a PDF."""
    with open(path, "rb") as f:
        head = f.read(len(PDF_MAGIC))
    if not head:
        raise ValueError("empty file (0 bytes)")
    if head == PDF_MAGIC or path.lower().endswith(".pdf"):
        import pypdfium2 as pdfium
        try:
            pdf = pdfium.PdfDocument(path)
        except pdfium.PdfiumError as e:
            raise ValueError(f"not a readable PDF ({e})") from e
        try:
            for index in range(len(pdf)):
                yield pdf[index].render(scale=dpi / 72).to_pil().convert("RGB")
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
            yield frame.convert("RGB")


# ----------------------------------------------------------------------------- the student

def task_of(config, default):
    import crnn
    if getattr(config, "model_type", None) == crnn.CRNNConfig.model_type:
        return "text-recognition"
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch.endswith("ForTokenClassification"):
        return "token-classification"
    if arch.endswith("ForSequenceClassification"):
        return "sequence-classification"
    return default


def load_model(path):
    """(model, directory with the tokenizer and config, config): `model(**inputs).logits` for torch or ONNX."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification
    import models
    if path.endswith(".onnx"):
        directory = os.path.dirname(os.path.abspath(path))
    elif os.path.isdir(path):
        directory = path
    else:  # student_model.pth: the tokenizer and processor are in the student/ directory written beside it
        directory = os.path.join(os.path.dirname(os.path.abspath(path)), "student")
    if not os.path.exists(os.path.join(directory, "config.json")):
        raise UserError(f"{path}: no config.json in {directory}: give the student/ directory written by --mode "
                        f"train (or student_model.pth beside it), or the model.onnx written by --mode export")
    with open(os.path.join(directory, "config.json")) as f:
        raw = json.load(f)
    import crnn
    if raw.get("model_type") == crnn.CRNNConfig.model_type:
        return load_crnn(path, directory, crnn.CRNNConfig.from_dict(raw))
    if raw.get("model_type") == "vision-encoder-decoder":
        raise UserError(f"{path} is a TrOCR-style (VisionEncoderDecoder) text-recognition student: --mode predict and "
                        f"export do not take it yet; score it with --mode eval --task text-recognition")
    config = AutoConfig.from_pretrained(directory)
    auto = AutoModelForTokenClassification if task_of(config, "") == "token-classification" \
        else AutoModelForSequenceClassification
    if path.endswith(".onnx"):
        from export import OrtModel
        return OrtModel(path), directory, config
    if os.path.isdir(path):
        model = models.from_pretrained(auto, path)
    else:
        saved = read_student_file(path)
        import kd_terms
        model = auto.from_config(type(config).from_dict(json.loads(saved["config"])))
        model = models.load_student_weights(kd_terms.restore_head(model), saved["state_dict"], path)
    return model.eval(), directory, config


class CTCModel(torch.nn.Module):
    """The CRNN text recogniser behind the interface of a transformers model: model(pixel_values=...).logits."""

    def __init__(self, model):
        super().__init__()
        self.crnn = model

    def forward(self, pixel_values):
        return types.SimpleNamespace(logits=self.crnn(pixel_values))


def load_crnn(path, directory, config):
    """A text-recognition student: student/ (safetensors + config), student_model.pth beside it, or its ONNX."""
    import crnn
    import models
    if path.endswith(".onnx"):
        from export import OrtModel
        return OrtModel(path), directory, config
    if os.path.isdir(path):
        return CTCModel(crnn.CRNN.from_pretrained(path)).eval(), directory, config
    saved = read_student_file(path)
    model = models.load_student_weights(crnn.CRNN(crnn.CRNNConfig.from_dict(json.loads(saved["config"]))),
                                        saved["state_dict"], path)
    return CTCModel(model).eval(), directory, config


def load_tokenizer(directory):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the student's tokenizer from {directory} ({utils.first_line(e)})") from e


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class PagePredictor:
    """Page classification (LayoutLMv3 student): OCR words with boxes and the page image -> one label."""
    needs_ocr = True

    def __init__(self, directory, config, cfg):
        from transformers.models.layoutlmv3.image_processing_pil_layoutlmv3 import LayoutLMv3ImageProcessorPil
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
        for probs, item in zip(softmax(logits), items):
            best = np.argsort(-probs)[:self.top_k]
            out.append({"label": self.labels[best[0]], "probability": float(probs[best[0]]),
                        "top_k": [{"label": self.labels[i], "probability": float(probs[i])} for i in best],
                        "words": item["words"], "truncated": item["truncated"]})
        return out


class WordPredictor:
    """Word tagging (text-only student): OCR words -> one BIO tag per word, grouped into entities."""
    needs_ocr = True

    def __init__(self, directory, config, cfg):
        self.tokenizer = load_tokenizer(directory)
        self.labels = [config.id2label[i] for i in range(len(config.id2label))]
        self.max_length = cfg.max_length

    def encode(self, page, ocr):
        import wordtags
        words = ocr["ocr_words"]
        enc = self.tokenizer([words], is_split_into_words=True, truncation=True, max_length=self.max_length)
        return {"input_ids": enc["input_ids"][0], "word_pos": wordtags.first_subtokens(enc.word_ids(0), len(words)),
                "text": words, "boxes": ocr["word_boxes"]}

    def collate(self, items):
        input_ids, attention_mask = pad_ids([i["input_ids"] for i in items], self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def rows(self, logits, items):
        out = []
        for token_logits, item in zip(logits, items):
            probs = softmax(token_logits)
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


class CropPredictor:
    """Text recognition (CRNN student): each image is one crop -> its text, CTC-greedy decoded.

    The crop is prepared as the student's eval crops are (textrec): turned upright when printed sideways, resized
    to the teacher's height 48 (width capped at --max-text-width), grey, resized to the saved height and half that
    width, normalised and padded on the right; no synthetic degradation (--degrade-*) is applied. confidence: the
    mean over the non-blank time steps of the best class's probability (over all steps when the text is empty).
    """
    needs_ocr = False

    def __init__(self, directory, config, cfg):
        self.chars, self.height, self.max_width = config.chars, config.height, cfg.max_text_width

    def encode(self, page, ocr):
        import textrec
        crop = page.transpose(Image.Transpose.ROTATE_90) if page.height > 1.5 * page.width else page
        crop = textrec.resize_for_teacher(crop, self.max_width)
        grey = crop.convert("L").resize((-(-crop.width // 2), self.height), Image.BILINEAR)
        return {"pixels": textrec.normalise(grey), "steps": textrec.padded_width(crop.width) // textrec.STEP}

    def collate(self, items):
        import textrec
        padded = max(i["steps"] for i in items) * textrec.STEP // 2
        pixels = np.zeros((len(items), 1, self.height, padded), np.float32)
        for k, item in enumerate(items):
            pixels[k, 0, :, :item["pixels"].shape[1]] = item["pixels"]
        return {"pixel_values": torch.from_numpy(pixels)}

    def rows(self, logits, items):
        import textrec
        out = []
        for step_logits, item in zip(logits, items):
            probs = softmax(step_logits[:item["steps"]])
            best = probs.argmax(-1)
            ids = textrec.ctc_greedy(best.tolist())
            chosen = probs.max(-1)[best != textrec.BLANK] if ids else probs.max(-1)
            out.append({"text": "".join(self.chars[i - 1] for i in ids if 0 < i <= len(self.chars)),
                        "confidence": float(chosen.mean()) if len(chosen) else 0.0})
        return out


PREDICTORS = {"sequence-classification": PagePredictor, "token-classification": WordPredictor,
              "text-recognition": CropPredictor}


def predictor_for(task_name):
    import tasks
    return getattr(tasks.TASKS.get(task_name), "predictor", None) or PREDICTORS[task_name]


# ----------------------------------------------------------------------------- the run

class Writer:
    """predictions.jsonl (and .csv for page classification) written as pages come, renamed into place at the end."""

    def __init__(self, out_dir, with_csv):
        self.paths = [os.path.join(out_dir, "predictions.jsonl")] + ([os.path.join(out_dir, "predictions.csv")]
                                                                     if with_csv else [])
        os.makedirs(out_dir, exist_ok=True)  # main.py creates no --output-dir up front (bad input leaves none)
        self.jsonl = open(self.paths[0] + ".tmp", "w")
        self.csv_file = open(self.paths[1] + ".tmp", "w", newline="") if with_csv else None
        if self.csv_file:
            self.csv = csv.writer(self.csv_file)
            self.csv.writerow(["file", "page", "label", "probability", "top_k"])

    def write(self, row):
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


def run(cfg):
    """Predict every page of every input; 0 when all files were read, 1 when some failed (2: UserError)."""
    import ocr
    if not cfg.input:
        raise UserError("--mode predict needs --input: image files, PDFs, folders or globs")
    if cfg.top_k < 1 or cfg.pdf_dpi < 1:
        raise UserError(f"--top-k and --pdf-dpi must be >= 1, got {cfg.top_k} and {cfg.pdf_dpi}")
    files, missing = expand_inputs(cfg.input)
    if not files:
        raise UserError(f"--input {' '.join(cfg.input)}: no such file, folder or matching glob")
    model, directory, config = load_model(cfg.model or os.path.join(cfg.output_dir, "student"))
    task_name = task_of(config, cfg.task)
    predictor = predictor_for(task_name)(directory, config, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() and isinstance(model, torch.nn.Module) else "cpu")
    if isinstance(model, torch.nn.Module):
        model.to(device)
    writer = Writer(cfg.output_dir, with_csv=task_name == "sequence-classification")
    failures = [(pattern, "no such file, folder or matching glob") for pattern in missing]
    seconds = {"read": 0.0, "ocr": 0.0, "model": 0.0}
    pending, pages = [], 0

    def flush():
        nonlocal pending
        if not pending:
            return
        start = time.perf_counter()
        with torch.no_grad():
            inputs = {k: v.to(device) for k, v in predictor.collate([item for _, item in pending]).items()}
            logits = model(**inputs).logits.float().cpu().numpy()
        seconds["model"] += time.perf_counter() - start
        for (where, _), row in zip(pending, predictor.rows(logits, [item for _, item in pending])):
            writer.write({**where, **row})
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
                    words = ocr.cached_page_ocr(page, cache) if predictor.needs_ocr else None
                    seconds["ocr"] += time.perf_counter() - start
                    pending.append(({"file": path, "page": page_number}, predictor.encode(page, words)))
                    pages += 1
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
               "files": len(files), "pages": pages, "failed": len(failures),
               "failures": [{"input": w, "error": e} for w, e in failures], "seconds": seconds,
               "pages_per_second": pages / total if total else None}
    utils.atomic_json(summary, os.path.join(cfg.output_dir, "predict_summary.json"))
    log.info("predicted %d pages of %d files in %.1f s (read %.1f s, OCR %.1f s, model %.1f s); %d failed; "
             "written to %s", pages, len(files), total, seconds["read"], seconds["ocr"], seconds["model"],
             len(failures), writer.paths[0])
    return 1 if failures else 0
