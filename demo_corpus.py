"""
Offline demo corpus: deterministic RVL-CDIP-style pages (page image + OCR words/boxes) for all 16
classes, small and quick enough to run the whole teacher -> student distillation on a laptop CPU.
Sibling classes share layouts and vocabulary on purpose so that no model reaches 100%.
This file is over 400 lines because it draws one layout for each of the 16 classes.
"""
import io
import json
import multiprocessing
import os
import random
import shutil
import tempfile
from functools import lru_cache

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tokenizers import ByteLevelBPETokenizer
from tqdm import tqdm

RVLCDIP_LABELS = ["letter", "form", "email", "handwritten", "advertisement", "scientific report",
    "scientific publication", "specification", "file folder", "news article", "budget", "invoice",
    "presentation", "questionnaire", "resume", "memo"]  # this order = the DiT teacher's id2label order
W, H = 320, 416  # letter aspect, small enough for fast CPU training
SPLITS = ("train", "validation", "test")
# Independent streams of pages: a page is a pure function of (seed, stream, index). "teacher" is the large
# labelled pool only the teacher trains on; "unlabeled" the student's pool of documents without labels.
STREAMS = SPLITS + ("teacher", "unlabeled")
# The three generated sources the demo uses (pages per class per split, and the stream each split draws from).
# demo: the student's few labelled pages, validation and the test pages every model is scored on.
# demo-teacher: what the teacher has seen, ~13x more labelled pages (DiT-large saw 320,000 RVL-CDIP pages).
# demo-unlabeled: the student's unlabelled pool, same distribution; its labels are never read by training.
CORPORA = {
    "demo": {"train": ("train", 10), "validation": ("validation", 10), "test": ("test", 50)},
    "demo-teacher": {"train": ("teacher", 64), "validation": ("validation", 10)},
    "demo-unlabeled": {"train": ("unlabeled", 64)},
}
FORMAT_VERSION = 1  # bump whenever generation changes, so corpora already on disk get rebuilt
AMBIGUOUS = 0.2  # share of pages that borrow the layout and/or the vocabulary of their sibling class
BOX = datasets.List(datasets.List(datasets.Value("int32")))  # [x0, y0, x1, y1] in pixels, as in ocr.py
FEATURES = datasets.Features({
    "image": datasets.Image(), "width": datasets.Value("int32"), "height": datasets.Value("int32"),
    "category": datasets.Value("string"), "ocr_words": datasets.List(datasets.Value("string")), "word_boxes": BOX,
    "ocr_paragraphs": datasets.List(datasets.Value("string")), "paragraph_boxes": BOX,
    "label": datasets.ClassLabel(names=RVLCDIP_LABELS)})

VOCAB = {k: v.split() for k, v in {
    "letter": "dear sincerely yours truly regards enclosed kindly grateful reply pleased inform hearing cordially",
    "form": "name address signature telephone zip state city code applicant authorization account social print",
    "email": "sent cc bcc subject re fw original message email mailto com attachment thanks inbox server online",
    "handwritten": "call tomorrow bob jim note ok see me pls thx asap monday friday ask cig mtg todo nite ph fyi",
    "advertisement": "taste free offer save flavor smooth rich enjoy now lights menthol pack buy fresh mild coupon",
    "scientific report": "laboratory test samples procedure experiment measured observed findings technical",
    "scientific publication": "abstract journal et al fig references cited hypothesis significant vitro vivo",
    "specification": "specification tolerance minimum maximum material dimension mm weight grade porosity",
    "file folder": "file folder confidential records correspondence archive box drawer index vol misc contents",
    "news article": "said yesterday reported according officials spokesman times news told interview court press",
    "budget": "budget fiscal actual projected variance expenses allocation quarter forecast salaries overhead funds",
    "invoice": "invoice bill due payment terms net remit qty unit price amount shipped customer tax balance paid",
    "presentation": "objectives strategy overview key goals agenda issues next steps opportunities challenges growth",
    "questionnaire": "questionnaire check answer question agree disagree neutral strongly often never sometimes rate",
    "resume": "resume education experience employment degree skills born married bachelor master phd objective",
    "memo": "memorandum to from subject cc re memo attached review meeting discuss concerning distribution staff",
}.items()}
FILLER = ("the of and to in for is on that by with as at be this from are was will have it not or which an our "
    "all has been their were would can more we also its these should other such may company tobacco research "
    "product smoking cigarette brand sales marketing program information development data new per one two time "
    "year report study results period group level use based current high low first following proposed").split()
NAMES = "Smith Johnson Brown Miller Davis Wilson Moore Taylor Clark Lewis Walker Hall Young King Green Baker".split()
SIBLING = {"letter": "memo", "form": "questionnaire", "email": "memo", "handwritten": "letter",
    "advertisement": "news article", "scientific report": "scientific publication",
    "scientific publication": "scientific report", "specification": "form", "file folder": "handwritten",
    "news article": "advertisement", "budget": "invoice", "invoice": "budget", "presentation": "advertisement",
    "questionnaire": "form", "resume": "letter", "memo": "letter"}
OCR_SUBS = [("l", "1"), ("o", "0"), ("rn", "m"), ("e", "c"), ("I", "l"), ("S", "5"), ("a", "o"), ("i", "l"),
    ("h", "b"), ("B", "8"), ("m", "rn"), ("t", "f")]  # (printed, what OCR read)


@lru_cache(maxsize=None)
def font(size):
    return ImageFont.load_default(size=size)


class Page:
    """A blank page, drawing helpers, and the words drawn on it (the OCR ground truth before OCR noise)."""

    def __init__(self, r, cls, mix):
        self.r, self.cls, self.mix = r, cls, mix
        self.im = Image.new("L", (W, H), 255)
        self.d = ImageDraw.Draw(self.im)
        self.ink, self.m = r.randint(0, 70), r.randint(10, 24)  # ink darkness, margin
        self.jitter = r.choice([0, 0, 1])  # per-word position noise of a poor print or scan
        self.words, self.boxes, self.pids, self.n_paras = [], [], [], 0

    def j(self, k):  # position jitter, as on imperfectly aligned pages
        return self.r.randint(-k, k)

    def w(self, n, cls=None, upper=False):
        """n words of running text: mostly filler, some class-typical words, a few of the sibling's."""
        cls, out, start = cls or self.cls, [], True
        for _ in range(n):
            u = self.r.random()
            pool = VOCAB[cls] if u < 0.18 * (1 - self.mix) else VOCAB[SIBLING[cls]] if u < 0.18 else FILLER
            word = self.r.choice(pool)
            word = word.upper() if upper else word.capitalize() if start else word
            start = self.r.random() < 0.1
            out.append(word + "." if start else word + "," if self.r.random() < 0.04 else word)
        return out

    def num(self):
        r = self.r
        return [r.choice([f"{r.randint(10, 99999):,}", f"{r.uniform(0, 999):.2f}", f"${r.randint(1, 9999)},000"])]

    def date(self):
        r = self.r
        return [r.choice(["January", "March", "July", "October"]), f"{r.randint(1, 28)},", str(r.randint(1975, 1999))]

    def name(self):
        return [self.r.choice(["Mr.", "Dr.", "Ms."]), self.r.choice("ABCDEFGHJKLMRST") + ".", self.r.choice(NAMES)]

    def text(self, x, y, words, size=7, width=None, gap=2, fill=None, bold=False, wobble=0):
        """Draw words wrapped into a block (one OCR paragraph); returns the y below it."""
        stroke = int(bold and size >= 10)  # stroked small text is unreadable
        f, fill = font(size), self.ink if fill is None else fill
        width, space, lh, pid = width or W - self.m - x, f.getlength(" "), size + gap, self.n_paras
        cx, cy, self.n_paras, wobble = x, y, self.n_paras + 1, wobble or self.jitter
        for word in words:
            wl = f.getlength(word)
            if cx > x and cx + wl > x + width:
                cx, cy = x, cy + lh
            if cy + lh > H - 4:
                break
            pos = (cx + self.j(wobble), cy + self.j(wobble))
            self.d.text(pos, word, font=f, fill=fill, stroke_width=stroke, stroke_fill=fill)
            x0, y0, x1, y1 = self.d.textbbox(pos, word, font=f, stroke_width=stroke)
            box = [max(0, int(x0)), max(0, int(y0)), min(W - 1, int(x1)), min(H - 1, int(y1))]
            if box[0] < box[2] and box[1] < box[3]:  # partly off-page words keep their visible part
                self.words.append(word), self.boxes.append(box), self.pids.append(pid)
            cx += wl + space * (1 + self.r.random() * wobble / 2)
        return cy + lh

    def paras(self, y, n, lo, hi, size=7, x=None, width=None):
        for _ in range(n):
            y = self.text(x or self.m, y + 4, self.w(self.r.randint(lo, hi)), size=size, width=width)
        return y

    def fields(self, y, pairs, size, dx):
        """Header rows of key: value (memo, email, specification), keys at pairs[0::2], values at pairs[1::2]."""
        for key, val in zip(pairs[::2], pairs[1::2]):
            self.text(self.m, y + 4, key, size=size)
            y = self.text(self.m + dx, y + 4, val, size=size)
        return y

    def line(self, x0, y0, x1, y1, w=1, fill=None):
        self.d.line([(x0, y0), (x1, y1)], fill=self.ink if fill is None else fill, width=w)

    def rect(self, x0, y0, x1, y1, fill=None, w=1):
        self.d.rectangle([x0, y0, x1, y1], fill=fill, outline=self.ink, width=w)

    def scribble(self, x, y, w, h, width=1):  # signatures, handwriting strokes, plotted curves
        pts = [(x + w * i / 12, y + self.r.uniform(0, h)) for i in range(13)]
        self.d.line(pts, fill=self.ink, width=width, joint="curve")

    def table(self, x, y, colws, rows, size=7, rh=12, grid=True):
        for row in rows:
            if y > H - 20:
                break
            cx = x
            for cw, cell in zip(colws, row):
                if grid:
                    self.rect(cx, y, cx + cw, y + rh)
                self.text(cx + 2, y + (rh - size) // 2 - 1, cell, size=size, width=cw - 4)
                cx += cw
            y += rh
        return y

    def columns(self, y, ncol, size, n, lo, hi, headings=(), figure=0.0):
        cw = (W - 2 * self.m - 8 * (ncol - 1)) // ncol
        for c in range(ncol):
            x, yy = self.m + c * (cw + 8), y
            for _ in range(n):
                if headings and self.r.random() < 0.5:
                    yy = self.text(x, yy + 4, [f"{self.r.randint(1, 5)}.", self.r.choice(headings)], size=size + 1)
                if self.r.random() < figure:  # a plot or a photo
                    self.rect(x, yy + 4, x + cw, yy + 64, fill=self.r.choice([None, self.r.randint(80, 200)]))
                    self.scribble(x + 5, yy + 10, cw - 10, 50)
                    yy += 68
                yy = self.paras(yy, 1, lo, hi, size=size, x=x, width=cw)


def letter(p):
    y = p.text(W // 2 - 70 + p.j(30), p.m, [p.r.choice(NAMES).upper(), "TOBACCO", "COMPANY"], size=12, bold=True)
    p.line(p.m, y + 2, W - p.m, y + 2)
    y = p.text(p.m, p.text(W - p.m - 80, y + 10, p.date()) + 6, p.name() + p.w(6), width=110)
    title, _, last = p.name()
    y = p.paras(p.text(p.m, y + 8, ["Dear", title, last + ":"]), p.r.randint(2, 5), 20, 50)
    p.text(W // 2 + p.j(20), y + 8, p.r.choice([["Sincerely,"], ["Very", "truly", "yours,"], ["Cordially,"]]))
    p.scribble(W // 2, y + 20, 70, 10)
    p.text(W // 2, y + 34, p.name()[1:])


def memo(p):
    head = p.r.choice([["MEMORANDUM"], ["INTER-OFFICE", "MEMORANDUM"]])
    y = p.text(p.m + p.j(6), p.m, head, size=14, bold=True)
    y = p.fields(y, [["TO:"], p.name(), ["FROM:"], p.name(), ["DATE:"], p.date(), ["SUBJECT:"], p.w(5)], 8, 55)
    p.line(p.m, y + 4, W - p.m, y + 4, w=2)
    p.text(p.m, p.paras(y + 6, p.r.randint(1, 4), 20, 50) + 10, ["cc:"] + p.name()[1:])


def email(p):
    sender = [f"<{p.r.choice(NAMES).lower()}@rjrt.com>"]
    y = p.fields(p.m - 4, [["From:"], p.name()[1:] + sender, ["Sent:"], p.date(), ["To:"], p.name()[1:],
                           ["Cc:"], p.name()[1:], ["Subject:"], p.w(5)], 7, 45)
    p.line(p.m, y + 2, W - p.m, y + 2)
    y = p.paras(y + 4, p.r.randint(1, 3), 10, 40)
    if p.r.random() < 0.5:  # quoted reply
        y = p.text(p.m, y + 8, ["-----Original", "Message-----", "From:"] + p.name()[1:] + ["Subject:", "RE:"])
        p.paras(y, p.r.randint(1, 2), 10, 30)


def form(p):
    y, rh = p.text(p.m + p.j(20), p.m, p.w(4, "form", upper=True), size=11, bold=True) + 4, p.r.randint(18, 26)
    cols = [int(c * (W - 2 * p.m)) for c in p.r.choice([[1], [0.5, 0.5], [0.4, 0.3, 0.3]])]
    while y < H - 40 and len(p.words) < p.r.randint(60, 150):
        for k, cw in enumerate(cols):  # labelled cells, some filled in, some with a tick box
            x = p.m + sum(cols[:k])
            p.rect(x, y, x + cw, y + rh)
            p.text(x + 2, y + 1, [s.upper() for s in p.r.sample(VOCAB["form"], 2)], size=6)
            if p.r.random() < 0.2:
                p.rect(x + 4, y + 10, x + 10, y + 16)
            elif p.r.random() < 0.7:
                p.text(x + 6, y + 10, p.w(3) if p.r.random() < 0.6 else p.num())
        y += rh
    p.text(p.m, y + 10, ["Signature", "_____", "Date"])


def questionnaire(p):
    y = p.text(p.m, p.m, p.w(3, "questionnaire", upper=True), size=12, bold=True)
    y = p.text(p.m, y + 4, p.w(p.r.randint(10, 30)))
    opts = p.r.choice([["Yes", "No"], ["Agree", "Neutral", "Disagree"], ["1", "2", "3", "4", "5"], ["Often", "Never"]])
    for q in range(p.r.randint(5, 14)):
        y, x = p.text(p.m, y + 6, [f"{q + 1}."] + p.w(p.r.randint(5, 14))), p.m + 14
        for o in opts:  # a row of tick boxes
            p.rect(x, y + 1, x + 6, y + 7)
            p.text(x + 9, y, [o])
            x += 20 + 5 * len(o)
        y += 10


def handwritten(p):
    if p.r.random() < 0.5:  # ruled notepad paper
        for ly in range(p.m + 20, H, 18):
            p.line(0, ly, W, ly, fill=190)
    y, size = p.m + p.r.randint(0, 30), p.r.randint(10, 13)
    for _ in range(p.r.randint(3, 9)):
        x = p.m + p.r.randint(0, 40)
        y = p.text(x, y, p.w(p.r.randint(3, 9)), size=size + p.j(1), wobble=3, gap=8)
        if p.r.random() < 0.4:
            p.scribble(x, y, p.r.randint(60, 200), 8, width=2)
            y += 14


def advertisement(p):
    for _ in range(p.r.randint(1, 3)):
        x, y, s = p.r.randint(-40, W - 60), p.r.randint(-40, H - 100), p.r.randint(80, 220)
        box = [x, y, x + s, y + s * p.r.uniform(0.5, 1.2)]
        (p.d.ellipse if p.r.random() < 0.5 else p.d.rectangle)(box, fill=p.r.randint(40, 210))
    y, size, dark = p.r.randint(20, 160), p.r.randint(20, 30), p.r.random() < 0.4
    if dark:  # white headline on a black band
        p.rect(0, y - 8, W, y + 2 * size + 16, fill=p.r.randint(0, 60))
    for _ in range(p.r.randint(1, 2)):
        words = p.w(p.r.randint(1, 3), "advertisement", upper=True)
        y = p.text(p.m + p.j(10), y, words, size=size, fill=255 if dark else None, bold=True)
    p.text(p.m, y + 10, p.w(p.r.randint(3, 8)), size=12)
    p.text(p.m, H - p.r.randint(40, 70), p.w(p.r.randint(8, 20)), size=6)  # small print


def presentation(p):
    p.rect(6, 6, W - 6, H - 6, w=3)
    if p.r.random() < 0.5:
        p.rect(6, 6, W - 6, 56, fill=p.r.randint(60, 160))
    y = max(66, p.text(p.m + 8, 20, p.w(p.r.randint(2, 4), "presentation", upper=True), size=16, bold=True))
    for _ in range(p.r.randint(3, 6)):
        p.d.ellipse([p.m + 8, y + 8, p.m + 14, y + 14], fill=p.ink)
        y = p.text(p.m + 22, y + 6, p.w(p.r.randint(3, 8)), size=11, width=W - 2 * p.m - 30) + 8
    p.text(p.m + 8, H - 24, p.w(3), size=6)


def news_article(p):
    head = [p.r.choice(["The", "Daily", "Evening"]), p.r.choice(NAMES), "Times"]
    y = p.text(W // 2 - 80 + p.j(10), p.m, head, size=16, bold=True)
    p.line(p.m, y + 2, W - p.m, y + 2, w=2)
    y = p.text(p.m, y + 4, p.date() + ["Page", str(p.r.randint(1, 40))], size=6)
    y = p.text(p.m, y + 4, p.w(p.r.randint(5, 10), "news article"), size=p.r.randint(11, 14), bold=True)
    if p.r.random() < 0.3:  # dense page: tokenised length exceeds 512
        p.columns(y, 3, 6, 6, 30, 80)
    else:
        p.columns(y, p.r.choice([2, 3]), 7, p.r.randint(2, 3), 20, 50, figure=0.2)


def scientific_publication(p):
    y = p.text(p.m + 10, p.m, p.w(p.r.randint(6, 12), "scientific publication"), size=10, bold=True)
    y = p.text(p.m + 10, y + 2, p.name()[1:] + p.name()[1:] + ["University"])
    y = p.text(p.m + 20, y + 4, ["Abstract"] + p.w(p.r.randint(30, 70)), size=6, width=W - 2 * p.m - 40)
    k = 1 + (p.r.random() < 0.3)  # dense pages in small print
    p.columns(y + 4, 2, 8 - k, 3, 30 * k, 70 * k, ["Introduction", "Methods", "Results", "Discussion"], 0.15)


def scientific_report(p):
    y = p.text(p.m, p.m, ["Report", "No.", str(p.r.randint(100, 9999))] + p.date())
    y = p.text(p.m + p.j(10), y + 4, p.w(p.r.randint(3, 7), "scientific report", upper=True), size=11, bold=True)
    p.line(p.m, y + 2, W - p.m, y + 2)
    p.columns(y + 4, 1, 7, 3, 20, 60, ["INTRODUCTION", "PROCEDURE", "RESULTS", "CONCLUSIONS", "SUMMARY"], 0.15)
    if p.r.random() < 0.4:
        rows = [[p.w(2), p.num(), p.num(), p.num()] for _ in range(5)]
        p.table(p.m, H - 90, [80, 60, 60, 60], [[[w] for w in p.w(4, "scientific report")]] + rows)


def specification(p):
    y = p.text(p.m, p.m, ["SPECIFICATION", "No.", str(p.r.randint(1000, 99999))], size=12, bold=True)
    y = p.fields(y + 4, [["Product:"], p.w(3, "specification"), ["Date:"], p.date(), ["Revision:"], p.num()], 7, 60)
    rows = [[p.w(p.r.randint(1, 3), "specification"), p.num(), ["+/-"] + p.num(), p.w(1, "specification")]
            for _ in range(p.r.randint(8, 22))]
    rows = [[["Parameter"], ["Value"], ["Tolerance"], ["Method"]]] + rows
    p.paras(p.table(p.m, y + 10, [100, 60, 60, W - 2 * p.m - 220], rows, size=6, rh=p.r.randint(11, 15)), 1, 10, 30)


def budget(p):
    y = p.text(p.m + p.j(10), p.m, ["BUDGET", str(p.r.randint(1980, 1999))] + p.w(3, "budget"), size=12, bold=True)
    y = p.text(p.m, y, p.w(p.r.randint(5, 20)))
    rows = [[p.w(p.r.randint(1, 3), "budget"), p.num(), p.num(), p.num()] for _ in range(p.r.randint(10, 24))]
    rows = [[[], ["Actual"], ["Budget"], ["Variance"]]] + rows + [[["TOTAL"], p.num(), p.num(), p.num()]]
    y = p.table(p.m, y + 8, [110, 60, 60, 60], rows, grid=p.r.random() < 0.3)
    p.line(p.m, y, W - p.m, y)


def invoice(p):
    p.text(p.m, p.m, [p.r.choice(NAMES).upper(), "SUPPLY", "CO."], size=10, bold=True)
    y = p.text(W - p.m - 90, p.m, ["INVOICE"], size=16, bold=True)
    y = p.text(W - p.m - 90, y, ["No.", str(p.r.randint(1000, 99999))] + p.date(), width=90)
    y = p.text(p.m, y + 6, ["Bill", "To:"] + p.name() + p.w(5), width=130)
    rows = [[p.w(p.r.randint(1, 4), "invoice"), [str(p.r.randint(1, 99))], p.num(), p.num()]
            for _ in range(p.r.randint(3, 12))]
    rows = [[["Description"], ["Qty"], ["Unit", "Price"], ["Amount"]]] + rows
    y = p.table(p.m, y + 10, [130, 40, 60, 60], rows, rh=13, grid=p.r.random() < 0.7)
    y = p.text(W - p.m - 120, y + 6, ["TOTAL", "DUE"] + p.num(), size=9, bold=True)
    p.text(p.m, y + 10, ["Terms:"] + p.w(p.r.randint(5, 15)), size=6)


def file_folder(p):
    x = p.r.choice([p.m, W // 2 - 50, W - p.m - 110])
    p.d.polygon([(x, 50), (x + 10, 20), (x + 100, 20), (x + 110, 50)], fill=p.r.randint(170, 230), outline=p.ink)
    p.rect(p.m - 6, 50, W - p.m + 6, H - p.m, fill=p.r.randint(170, 235))
    p.rect(x + 12, 26, x + 98, 46, fill=250)  # the tab's label
    label = [p.r.choice(NAMES)] + p.r.sample(VOCAB["file folder"], 2) + [str(p.r.randint(1, 99))]
    p.text(x + 14, 30, [s.upper() for s in label], size=8, width=84)
    if p.r.random() < 0.6:  # stamps and hand notes on the cover
        words = p.w(p.r.randint(4, 14))
        p.text(p.m + p.r.randint(10, 120), p.r.randint(80, 300), words, size=p.r.randint(8, 12), wobble=2, width=160)


def resume(p):
    y = p.text(W // 2 - 60 + p.j(30), p.m, p.name()[1:], size=14, bold=True)
    y = p.text(p.m, y + 2, p.w(4) + ["Tel.", f"{p.r.randint(200, 999)}-{p.r.randint(1000, 9999)}"])
    sections = ["EDUCATION", "EXPERIENCE", "EMPLOYMENT", "PUBLICATIONS", "SKILLS", "REFERENCES"]
    for sec in p.r.sample(sections, p.r.randint(3, 5)):
        y = p.text(p.m, y + 6, [sec], size=9)
        p.line(p.m, y, W - p.m, y)
        for _ in range(p.r.randint(1, 4)):
            p.text(p.m, y + 3, [f"{p.r.randint(1960, 1995)}-{p.r.randint(60, 99)}"])
            y = p.text(p.m + 60, y + 3, p.w(p.r.randint(5, 20)))


LAYOUTS = {name: globals()[name.replace(" ", "_")] for name in RVLCDIP_LABELS}  # one layout function per class


def union(boxes):
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def ocr_noise(r, words, boxes, pids, rate):
    """Drop, merge and misread words the way an OCR engine does; a merged word gets the union box."""
    out, i = [], 0
    while i < len(words):
        word, box, pid = words[i], boxes[i], pids[i]
        i += 1
        if r.random() < rate / 2:
            continue
        if i < len(words) and pids[i] == pid and abs(boxes[i][1] - box[1]) < 4 and r.random() < rate / 3:
            word, box, i = word + words[i], union([box, boxes[i]]), i + 1
        if r.random() < rate:
            word = word.replace(*r.choice(OCR_SUBS), 1)
        out.append((word, box, pid))
    return out or list(zip(words, boxes, pids))


def scan_noise(im, r, g):
    """Blur, brightness, dark margin strips, gaussian and salt-and-pepper noise of a photocopied scan."""
    if r.random() < 0.25:
        im = im.filter(ImageFilter.GaussianBlur(r.uniform(0.4, 0.9)))
    a = np.asarray(im, dtype=np.float32) * r.uniform(0.8, 1.0) + r.uniform(-10, 25)
    if r.random() < 0.2:  # dark strip where the scanner lid did not cover the page
        k = r.randint(3, 14)
        a[r.choice([np.s_[:, :k], np.s_[:, -k:], np.s_[:k, :], np.s_[-k:, :]])] = r.uniform(20, 90)
    a += g.normal(0, r.uniform(0, 12), a.shape)
    sp, p = g.random(a.shape), r.uniform(0, 0.01)
    a[sp < p / 2], a[sp > 1 - p / 2] = 0, 255
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_page(seed, split, index):
    """One page; all randomness derives from (seed, split, index), never from Python's salted hash()."""
    label = index % len(RVLCDIP_LABELS)
    cls = RVLCDIP_LABELS[label]
    r = random.Random(f"docdistill-demo/{seed}/{split}/{index}")  # str seeds go through sha512: stable everywhere
    g = np.random.default_rng([seed, STREAMS.index(split), index])
    # ambiguous pages, AMBIGUOUS/3 each: the sibling's layout; text half from the sibling's vocabulary;
    # both at once, which not even a model that sees image and text can resolve
    kind = int(3 * r.random() / AMBIGUOUS)  # 0, 1, 2: ambiguous; >= 3: a typical page
    p = Page(r, cls, {1: 0.5, 2: 0.6}.get(kind, 0.15))
    LAYOUTS[SIBLING[cls] if kind in (0, 2) else cls](p)
    words = ocr_noise(r, p.words, p.boxes, p.pids, r.uniform(0.1, 0.25) if cls == "handwritten" else r.uniform(0, 0.06))
    paras = {}
    for word, box, pid in words:
        paras.setdefault(pid, []).append((word, box))
    buf = io.BytesIO()
    scan_noise(p.im, r, g).save(buf, format="PNG")
    return {"image": {"bytes": buf.getvalue(), "path": None}, "width": W, "height": H, "category": cls,
        "ocr_words": [w for w, _, _ in words], "word_boxes": [b for _, b, _ in words],
        "ocr_paragraphs": [" ".join(w for w, _ in ws) for ws in paras.values()],
        "paragraph_boxes": [union([b for _, b in ws]) for ws in paras.values()],
        "label": label}


def _pages(args):
    seed, stream, start, stop = args
    return [make_page(seed, stream, i) for i in range(start, stop)]


def generate_pages(out_dir, layout, seed=0, workers=None):
    """Generate (or load, if out_dir already holds a complete one made with the same arguments) a corpus.

    layout: {split: (stream, pages per class)}. Pages are made in parallel chunks; each depends only on
    (seed, stream, index), so the result is the same for any number of workers.
    """
    layout = {split: [stream, int(n)] for split, (stream, n) in layout.items()}
    meta = {"version": FORMAT_VERSION, "seed": seed, "layout": layout}
    meta_path = os.path.join(out_dir, "demo_meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                return datasets.load_from_disk(out_dir)
    workers = workers or min(4, os.cpu_count() or 1)
    splits = {}
    for split, (stream, n) in layout.items():
        total = n * len(RVLCDIP_LABELS)
        chunks = [(seed, stream, a, min(a + 64, total)) for a in range(0, total, 64)]
        if workers > 1 and len(chunks) > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                rows = [r for chunk in tqdm(pool.imap(_pages, chunks), total=len(chunks),
                                            desc=f"demo {split} pages ({total})") for r in chunk]
        else:
            rows = [r for chunk in chunks for r in _pages(chunk)]
        splits[split] = datasets.Dataset.from_list(rows, features=FEATURES)
    # build beside out_dir and swap it in, so an interrupted run never leaves a half-written corpus behind
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".demo-tmp-", dir=parent) as tmp:
        datasets.DatasetDict(splits).save_to_disk(os.path.join(tmp, "ds"))
        with open(os.path.join(tmp, "ds", "demo_meta.json"), "w") as f:
            json.dump(meta, f)  # written last: marks the corpus complete
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(os.path.join(tmp, "ds"), out_dir)
    return datasets.load_from_disk(out_dir)


def generate_demo_dataset(out_dir, train_per_class=10, val_per_class=10, test_per_class=50, seed=0):
    """The student's corpus (train/validation/test) with the given pages per class."""
    return generate_pages(out_dir, {"train": ("train", train_per_class), "validation": ("validation", val_per_class),
                                    "test": ("test", test_per_class)}, seed)


def load_corpus(name, cache_dir, seed=0):
    """One of CORPORA by name, generated once into cache_dir/name."""
    return generate_pages(os.path.join(cache_dir, name), CORPORA[name], seed)


def train_demo_tokenizer(dataset, out_dir, vocab_size=3000):
    """Byte-level BPE on the train split's OCR words, saved RoBERTa-style (vocab.json + merges.txt); returns out_dir."""
    ds = dataset["train"] if isinstance(dataset, datasets.DatasetDict) else dataset
    tok = ByteLevelBPETokenizer(add_prefix_space=True)  # LayoutLMv3 prefixes every word with a space
    tok.train_from_iterator((" ".join(ws) for ws in ds["ocr_words"]), vocab_size=vocab_size - 1, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # files appear whole: other runs may be reading them
        tok.save_model(tmp)
        with open(os.path.join(tmp, "vocab.json")) as f:
            vocab = json.load(f)
        vocab["<mask>"] = len(vocab)  # RoBERTa keeps <mask> as the last id
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f, ensure_ascii=False)
        for name in ("merges.txt", "vocab.json"):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    return out_dir
