"""Whole pages: PP-OCRv4's text detector finds the lines, a recogniser reads them.

    LineDetector      PP-OCRv4's detector (ch_PP-OCRv4_det_infer.onnx) run by rapidocr-onnxruntime's own code, the
                      way RapidOCR runs it (its resizing, letterbox, DB post-processing, top-to-bottom order and its
                      perspective crop of each line, turned upright when taller than 1.5x its width); no angle
                      classifier.
    StudentReader     a CRNN student (PyTorch, or the model.onnx of --mode export) reads crops: each crop prepared as
                      the student's eval crops are (crop_item; a page's lines at their own width, up to LINE_WIDTH,
                      as PP-OCR reads them), crops sorted by width and read BATCH at a time.
    OnnxReader        any recogniser with PaddleOCR's contract (PP-OCRv4's own, the teacher, or a student's
                      rec_ppocr.onnx) read by rapidocr's TextRecognizer; texts folded onto ASCII (textrec.data.fold).
    PageReader        detector + reader: page -> lines {box, points, text, confidence} in reading order; page_text()
                      joins them row by row.
    OcrEngine         --ocr-engine for page classification and word tagging: a page -> the OCR columns the page tasks
                      read (ocr.py's format: words with pixel boxes, each line split into words whose boxes are
                      interpolated by character position).
"""
import hashlib
import os

import numpy as np
import torch
from PIL import Image

import saved
from config import UserError
from textrec import crnn, data

BATCH = 16  # crops read at once by a student
MIN_PAGE_SIDE = 256  # --read-as auto: an image whose sides are both at least this many pixels is a page
LINE_WIDTH = 4800  # a page's line is read at its own width up to this (at height 48): PP-OCR squeezes no line


def threads():
    return int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or -1  # -1: onnxruntime's default, as RapidOCR's


# ------------------------------------------------------------------------------------------ reading crops

def upright(crop):
    """A crop printed sideways (taller than 1.5x its width) turned upright, as PaddleOCR turns it (np.rot90)."""
    return crop.transpose(Image.Transpose.ROTATE_90) if crop.height > 1.5 * crop.width else crop


def crop_item(crop, height, max_width):
    """A crop as the student reads it: upright, at the teacher's height 48 (width capped at max_width), then grey at
    the student's height and half the width (data.student_pixels); no synthetic degradation."""
    crop = data.resize_for_teacher(upright(crop), max_width)
    return {"pixels": data.student_pixels(np.asarray(crop.convert("L")), height),
            "steps": data.padded_width(crop.width) // data.STEP}


def crop_batch(items, height):
    """The student's input [N, 1, height, P / 2] of crop_item()s, right-padded with 0 to the widest."""
    padded = max(i["steps"] for i in items) * data.STEP // 2
    pixels = np.zeros((len(items), 1, height, padded), np.float32)
    for k, item in enumerate(items):
        pixels[k, 0, :, :item["pixels"].shape[1]] = item["pixels"]
    return torch.from_numpy(pixels)


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def crop_readings(logits, items, chars):
    """Greedy CTC texts of per-step logits [N, T, C] (numpy) of crop_item()s, with a confidence each: the mean over
    the non-blank time steps of the best class's probability (over all steps when the text is empty)."""
    out = []
    for step_logits, item in zip(logits, items):
        probs = softmax(step_logits[:item["steps"]])
        best = probs.argmax(-1)
        ids = data.ctc_greedy(best.tolist())
        chosen = probs.max(-1)[best != data.BLANK] if ids else probs.max(-1)
        out.append({"text": "".join(chars[i - 1] for i in ids if 0 < i <= len(chars)),
                    "confidence": float(chosen.mean()) if len(chosen) else 0.0})
    return out


class StudentReader:
    """A CRNN student reading RGB crops: logits_of(pixel_values [N, 1, h, W]) -> logits [N, T, C] (torch)."""

    def __init__(self, logits_of, chars, height, max_width=LINE_WIDTH):
        self.logits_of, self.chars, self.height, self.max_width = logits_of, chars, height, max_width

    @torch.no_grad()
    def __call__(self, crops):
        items = [crop_item(c, self.height, self.max_width) for c in crops]
        order = sorted(range(len(items)), key=lambda i: items[i]["steps"])  # less padding, as RapidOCR sorts
        out = [None] * len(items)
        for start in range(0, len(order), BATCH):
            chunk = [items[i] for i in order[start:start + BATCH]]
            logits = self.logits_of(crop_batch(chunk, self.height)).float().cpu().numpy()
            for i, reading in zip(order[start:start + BATCH], crop_readings(logits, chunk, self.chars)):
                out[i] = reading
        return out


def saved_student(path):
    """The CRNN text-recognition student saved at `path` (student/ or student_model.pth), checksums verified
    (saved.read_student, as registry.load_student reads it), in eval mode."""
    config, weights = saved.read_student(path)
    if config.get("model_type") != crnn.CRNNConfig.model_type:
        raise UserError(f"{path} holds a {config.get('model_type')} model, not a CRNN text-recognition student: "
                        f"--ocr-engine takes tesseract, ppocrv4, a CRNN student (student/ or student_model.pth) or a "
                        f"recogniser .onnx with PaddleOCR's contract (rec_ppocr.onnx)")
    return crnn.from_saved(config, weights, path).eval()


class OnnxReader:
    """A recogniser with PaddleOCR's contract (an .onnx with `character` metadata: PP-OCRv4's, or the rec_ppocr.onnx
    of a student) read by rapidocr's TextRecognizer (its batching of 6, its preprocessing and decoding)."""

    def __init__(self, path):
        from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer  # heavy: page OCR only
        self.path = path
        self.recognizer = TextRecognizer({"model_path": path, "rec_img_shape": [3, 48, 320], "rec_batch_num": 6,
                                          "intra_op_num_threads": threads(), "inter_op_num_threads": 1})

    def __call__(self, crops):
        bgr = [np.ascontiguousarray(np.asarray(upright(c).convert("RGB"))[:, :, ::-1]) for c in crops]
        readings, _ = self.recognizer(bgr) if bgr else ([], 0.0)
        return [{"text": data.fold(text), "confidence": float(score)} for text, score in readings]


# ------------------------------------------------------------------------------------------- pages

class LineDetector:
    """PP-OCRv4's text detector as RapidOCR runs it: page (PIL) -> [(quad [4, 2] in page pixels, line crop RGB)]."""

    def __init__(self):
        from rapidocr_onnxruntime import RapidOCR  # heavy: page OCR only
        self.engine = RapidOCR(use_cls=False, intra_op_num_threads=threads(), inter_op_num_threads=1)

    def __call__(self, page):
        engine = self.engine
        image = np.ascontiguousarray(np.asarray(page.convert("RGB"))[:, :, ::-1])  # BGR, as RapidOCR reads files
        height, width = image.shape[:2]
        resized, ratio_h, ratio_w = engine.preprocess(image)
        steps = {"preprocess": {"ratio_h": ratio_h, "ratio_w": ratio_w}}
        resized, steps = engine.maybe_add_letterbox(resized, steps)
        boxes, _ = engine.auto_text_det(resized)
        if boxes is None or not len(boxes):
            return []
        quads = engine._get_origin_points(boxes, steps, height, width)  # RapidOCR's own mapping back to the page
        crops = engine.get_crop_img_list(image, quads)
        return [(quad, Image.fromarray(np.ascontiguousarray(crop[:, :, ::-1]))) for quad, crop in zip(quads, crops)]


def box_of(quad):
    quad = np.asarray(quad, np.float32)
    return [int(round(quad[:, 0].min())), int(round(quad[:, 1].min())), int(round(quad[:, 0].max())),
            int(round(quad[:, 1].max()))]


def reading_order(boxes):
    """Indices of [x0, y0, x1, y1] boxes grouped into rows and read row by row, left to right: a box joins the
    current row when its vertical centre lies within the row's first box's span; rows from the top. [[index]]."""
    rows = []
    for i in sorted(range(len(boxes)), key=lambda k: ((boxes[k][1] + boxes[k][3]) / 2, boxes[k][0])):
        centre = (boxes[i][1] + boxes[i][3]) / 2
        if rows and boxes[rows[-1][0]][1] <= centre <= boxes[rows[-1][0]][3]:
            rows[-1].append(i)
        else:
            rows.append([i])
    return [sorted(row, key=lambda k: boxes[k][0]) for row in rows]


def page_text(boxes, texts):
    """The page's text: rows (reading_order) joined by newlines, the texts of a row by spaces."""
    return "\n".join(" ".join(texts[i] for i in row if texts[i]) for row in reading_order(boxes)).strip("\n")


class PageReader:
    """detector + reader: a page -> its lines in reading order, {"box" [x0, y0, x1, y1], "points" (the detector's
    quad), "text", "confidence"}."""

    def __init__(self, reader, detector=None):
        self.reader, self.detector = reader, detector or LineDetector()

    def __call__(self, page):
        found = self.detector(page)
        readings = self.reader([crop for _, crop in found]) if found else []
        lines = [{"box": box_of(quad), "points": np.asarray(quad).round(1).tolist(), **reading}
                 for (quad, _), reading in zip(found, readings)]
        order = [i for row in reading_order([line["box"] for line in lines]) for i in row]
        return [lines[i] for i in order]


def words_of(lines):
    """Lines -> (words, pixel boxes): each line's text split on spaces, a word's box spanning its characters'
    share of the line's width (interpolated by character position), the line's top and bottom."""
    words, boxes = [], []
    for line in lines:
        text, (x0, y0, x1, y1) = line["text"], line["box"]
        start = 0
        for word in text.split(" "):
            if word:
                a, b = start / len(text), (start + len(word)) / len(text)
                words.append(word)
                boxes.append([int(round(x0 + a * (x1 - x0))), y0, int(round(x0 + b * (x1 - x0))), y1])
            start += len(word) + 1
    return words, boxes


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class OcrEngine:
    """--ocr-engine other than tesseract: PP-OCRv4's detector + a recogniser, for the page tasks' OCR step.

    spec: ppocrv4 (PP-OCRv4's recogniser), a recogniser .onnx with PaddleOCR's contract (a student's rec_ppocr.onnx),
    or a saved CRNN student (student/ or student_model.pth). read(page) -> ocr.ocr_page()'s dict: ocr_words,
    word_boxes (pixels), ocr_paragraphs and paragraph_boxes (here: the detected lines). `key` names the engine and
    its models' bytes, for the OCR cache. The models are loaded on first use in each process (the engine is
    pickled to --num-proc workers without them)."""

    def __init__(self, spec):
        self.spec, self.reader = spec, None
        from rapidocr_onnxruntime import __file__ as package  # heavy: page OCR only
        models = os.path.join(os.path.dirname(package), "models")
        self.detector_path = os.path.join(models, "ch_PP-OCRv4_det_infer.onnx")
        if spec == "ppocrv4":
            self.recogniser = os.path.join(models, "ch_PP-OCRv4_rec_infer.onnx")
        elif os.path.exists(spec):
            self.recogniser = spec
        else:
            raise UserError(f"--ocr-engine {spec}: no such file or directory (tesseract, ppocrv4, a CRNN student's "
                            f"student/ or student_model.pth, or a recogniser .onnx with PaddleOCR's contract)")
        if os.path.isdir(self.recogniser):
            parts = sorted(os.path.join(self.recogniser, f) for f in os.listdir(self.recogniser)
                           if f.endswith((".json", ".safetensors")))
        else:
            parts = [self.recogniser]
        self.key = "|".join(["det", file_sha256(self.detector_path)[:16], "rec", os.path.basename(spec.rstrip("/")),
                             *(file_sha256(p)[:16] for p in parts)]).encode()

    def __getstate__(self):
        return {**self.__dict__, "reader": None}

    def page_reader(self):
        if self.reader is None:
            if self.recogniser.endswith(".onnx"):
                self.reader = PageReader(OnnxReader(self.recogniser))
            else:
                student = saved_student(self.recogniser)
                self.reader = PageReader(StudentReader(student, student.config.chars, student.config.height))
        return self.reader

    def read(self, page):
        lines = self.page_reader()(page)
        words, boxes = words_of(lines)
        return {"ocr_words": words, "word_boxes": boxes, "ocr_paragraphs": [line["text"] for line in lines],
                "paragraph_boxes": [line["box"] for line in lines]}


def ocr_engine(spec):
    """--ocr-engine: None for tesseract (ocr.py's own), else an OcrEngine."""
    return None if spec == "tesseract" else OcrEngine(spec)
