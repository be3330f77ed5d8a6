import os
import shutil
import sys

import datasets
import pytest
import pytesseract
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ocr  # noqa: E402

needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract binary not installed")

WORDS = ["HELLO", "WORLD", "INVOICE"]
ORIGINS = [(40, 40), (300, 40), (40, 160)]


def render_page(words=WORDS, origins=ORIGINS):
    image = Image.new("RGB", (640, 260), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=40)
    boxes = []
    for word, xy in zip(words, origins):
        draw.text(xy, word, fill="black", font=font)
        boxes.append(draw.textbbox(xy, word, font=font))
    return image, boxes


def make_dataset(images):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": list(range(len(images)))}, features=features)


@needs_tesseract
def test_ocr_page_finds_words_and_boxes():
    image, drawn = render_page()
    out = ocr.ocr_page(image)
    assert len(out["ocr_words"]) == len(out["word_boxes"])
    found = [w for w in WORDS if w in out["ocr_words"]]
    assert len(found) >= 2, out["ocr_words"]
    for word in found:
        x0, y0, x1, y1 = out["word_boxes"][out["ocr_words"].index(word)]
        dx0, dy0, dx1, dy1 = drawn[WORDS.index(word)]
        assert all(isinstance(v, int) for v in (x0, y0, x1, y1))
        assert abs(x0 - dx0) < 15 and abs(y0 - dy0) < 15 and abs(x1 - dx1) < 15 and abs(y1 - dy1) < 15
    # every word sits inside exactly one paragraph box
    assert " ".join(out["ocr_paragraphs"]).split() == out["ocr_words"]
    for x0, y0, x1, y1 in out["word_boxes"]:
        assert sum(px0 <= x0 and py0 <= y0 and x1 <= px1 and y1 <= py1
                   for px0, py0, px1, py1 in out["paragraph_boxes"]) >= 1


@needs_tesseract
def test_add_ocr_columns_caches(tmp_path, monkeypatch):
    pages = [render_page()[0], render_page(["TOTAL", "AMOUNT", "DATE"])[0]]
    ds = make_dataset(pages)
    calls = []
    real = pytesseract.image_to_data
    monkeypatch.setattr(pytesseract, "image_to_data", lambda *a, **k: calls.append(1) or real(*a, **k))

    out = ocr.add_ocr_columns(ds, str(tmp_path))
    assert len(calls) == 2
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert not list(tmp_path.glob("*.tmp"))
    for name in ["ocr_words", "word_boxes", "ocr_paragraphs", "paragraph_boxes", "width", "height", "label"]:
        assert name in out.column_names
    assert out.features["word_boxes"] == datasets.Sequence(datasets.Sequence(datasets.Value("int32")))
    assert out[0]["width"] == 640 and out[0]["height"] == 260
    assert "HELLO" in out[0]["ocr_words"] or "WORLD" in out[0]["ocr_words"]

    again = ocr.add_ocr_columns(ds, str(tmp_path))
    assert len(calls) == 2  # served from cache
    assert again["ocr_words"] == out["ocr_words"]

    # a changed image must miss the cache
    changed = make_dataset([render_page(["OTHER", "TEXT", "HERE"])[0]])
    ocr.add_ocr_columns(changed, str(tmp_path))
    assert len(calls) == 3


def test_existing_ocr_columns_returned_unchanged(tmp_path, monkeypatch):
    ds = make_dataset([render_page()[0]]).add_column("ocr_words", [["x"]])
    monkeypatch.setattr(pytesseract, "image_to_data", lambda *a, **k: pytest.fail("tesseract called"))
    assert ocr.add_ocr_columns(ds, str(tmp_path)) is ds
    assert not list(tmp_path.iterdir())


def test_missing_binary_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", str(tmp_path / "no-such-tesseract"))
    with pytest.raises(ocr.OCRUnavailable, match="apt-get install tesseract-ocr"):
        ocr.ocr_page(render_page()[0])
    with pytest.raises(ocr.OCRUnavailable, match="brew install tesseract"):
        ocr.add_ocr_columns(make_dataset([render_page()[0]]), str(tmp_path / "cache"))


@needs_tesseract
def test_ocr_in_two_processes_gives_the_same_columns(tmp_path):
    ds = make_dataset([render_page()[0], render_page(["TOTAL", "AMOUNT", "DATE"])[0]])
    one = ocr.add_ocr_columns(ds, str(tmp_path / "one"))
    two = ocr.add_ocr_columns(ds, str(tmp_path / "two"), num_proc=2)
    assert two.features == one.features
    assert two.with_format(None).to_dict() == one.with_format(None).to_dict()
