"""Text recognition in a real OCR pipeline: the student's preprocessing as arithmetic (equal to PIL's), the drop-in
export read by RapidOCR itself (crops and a page, no code of ours in between), whole pages through --mode predict,
and the --ocr-engine of the page tasks (words split from lines, the OCR cache key per engine)."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import main
import ocr
from conftest import SHARED
from textrec import crnn, data, dropin, pages

pytest.importorskip("rapidocr_onnxruntime")
FUNSD = os.path.join(os.environ.get("DOCDISTILL_SHARED", SHARED), "data", "funsd", "dataset")
pytestmark = pytest.mark.usefixtures("one_thread")


def render_page(path, lines=("Invoice number 4711", "Date: 12 March 2024", "Total due 93.50")):
    image = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(image)
    for k, line in enumerate(lines):
        draw.text((40, 60 + 90 * k), line, fill="black", font=ImageFont.load_default(size=28))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def crops_and_page(tmp_path_factory):
    """Real FUNSD word crops and a FUNSD test form when ../shared is there, else rendered ones."""
    root = tmp_path_factory.mktemp("dropin")
    (root / "crops").mkdir()
    if os.path.isdir(FUNSD):
        rows = data.funsd_records(FUNSD)["test"]
        for k, row in enumerate(rows[:40:5]):
            data.cut(row).save(root / "crops" / f"{k}.png")
        page = rows[0]["image"]
    else:
        for k, word in enumerate(["total", "Fax:", "A-12", "date of birth"]):
            image = Image.new("RGB", (20 + 14 * len(word), 30), "white")
            ImageDraw.Draw(image).text((6, 4), word, fill="black", font=ImageFont.load_default(size=20))
            image.save(root / "crops" / f"{k}.png")
        page = render_page(root / "page.png")
    return root / "crops", str(page)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    torch.manual_seed(0)
    model = crnn.build(data.STUDENT_CHARS, 32, "micro").eval()
    path = tmp_path_factory.mktemp("student") / "student"
    model.save_pretrained(str(path))
    return model, str(path)


# ----------------------------------------------------------------------- the student's preprocessing

def test_student_pixels_are_pils_bilinear_resize():
    """height_matrix is PIL's float resize of a column; half_width is PIL's bilinear at scale 2 (even widths; odd
    ones are read as ceil(W / 2) columns of the same kernel); student_pixels within a grey level of PIL on uint8."""
    rng = np.random.default_rng(0)
    column = rng.random((48, 1), np.float32)
    pil = np.asarray(Image.fromarray(column, mode="F").resize((1, 32), Image.BILINEAR))[:, 0]
    np.testing.assert_allclose(data.height_matrix(48, 32) @ column[:, 0], pil, atol=1e-6)
    rows = rng.random((3, 10), np.float32)
    pil = np.asarray(Image.fromarray(rows, mode="F").resize((5, 3), Image.BILINEAR))
    np.testing.assert_allclose(data.half_width(rows), pil, atol=1e-6)
    assert data.half_width(rng.random((2, 11), np.float32)).shape == (2, 6)
    # the kernel by hand: output 2 of 10 inputs reads inputs 3..6 with weights 1, 3, 3, 1 (/ 8)
    assert data.half_width(rows)[0, 2] == pytest.approx((rows[0, 3] + 3 * rows[0, 4] + 3 * rows[0, 5] + rows[0, 6]) / 8)
    grey = (rng.random((48, 64)) * 255).astype(np.uint8)
    pil = data.normalise(Image.fromarray(grey).resize((32, 32), Image.BILINEAR))
    assert np.abs(data.student_pixels(grey, 32) - pil).max() <= 2 / 255 + 1e-6  # PIL rounds to 8 bits


def test_dropin_wrapper_is_the_student_on_its_own_preprocessing(student):
    """PP-OCR's input -> the wrapper's grey crop is data.student_pixels of the same crop; its output is the student's
    softmax with the classes in PP-OCR's order (blank, the characters without the space, the space)."""
    model, _ = student
    crop = Image.new("RGB", (90, 48), (250, 240, 230))
    ImageDraw.Draw(crop).text((5, 10), "Fax 12", fill=(20, 30, 40))
    wrapper = dropin.PPOCRStudent(model)
    pixels = torch.from_numpy(dropin.ppocr_batch([crop], 640))
    ours = data.student_pixels(np.asarray(crop.convert("L")), 32)
    width = ours.shape[1] - 1  # the last column meets RapidOCR's padding of the batch
    np.testing.assert_allclose(wrapper.student_pixels(pixels)[0, 0, :, :width].numpy(), ours[:, :width], atol=2 / 255)
    order = dropin.class_order(data.STUDENT_CHARS)
    assert order[:3] == [0, 2, 3] and order[-1] == 1 and sorted(order) == list(range(96))
    assert dropin.character_list(data.STUDENT_CHARS)[0] == "!" and " " not in dropin.character_list(data.STUDENT_CHARS)
    with torch.no_grad():
        probs = torch.softmax(model(wrapper.student_pixels(pixels)), -1)
        torch.testing.assert_close(wrapper(pixels), probs[..., order])


# --------------------------------------------------------------------------- RapidOCR reads the export

def test_rapidocr_reads_crops_and_a_page_with_the_exported_student(student, crops_and_page, tmp_path, capsys):
    """--mode export writes rec_ppocr.onnx; RapidOCR(rec_model_path=it) reads crops and a whole page with nothing of
    ours in between, giving the texts and confidences our PyTorch student gives on the same crops."""
    from rapidocr_onnxruntime import RapidOCR
    model, path = student
    crops, page = crops_and_page
    assert main.main(["--mode", "export", "--model", path, "--input", str(crops), "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "onnx" / "export.json").read_text())["ppocr"]
    assert report["max_abs_difference"] <= 1e-4 and report["same_text_as_pytorch_student"] == 1.0
    exported = str(tmp_path / "onnx" / "rec_ppocr.onnx")
    engine = RapidOCR(rec_model_path=exported, use_cls=False, intra_op_num_threads=1)
    assert engine.text_rec.postprocess_op.character[:3] == ["blank", "!", '"']
    reader = pages.StudentReader(model, model.config.chars, model.config.height)
    names = sorted(os.listdir(crops))
    ours = reader([Image.open(crops / n).convert("RGB") for n in names])
    for name, mine in zip(names, ours):
        (text, score), = engine(str(crops / name), use_det=False, use_cls=False, use_rec=True)[0]
        assert text == mine["text"]
        assert score == pytest.approx(mine["confidence"], abs=1e-3)
    # a page: RapidOCR's detection and its batching of our recogniser (6 crops padded to the widest: an untrained
    # BiLSTM reads the padding too) give what textrec/pages.py's PageReader gives with the same file
    found, _ = engine(page, use_cls=False, text_score=0.0)
    lines = pages.PageReader(pages.OnnxReader(exported))(Image.open(page).convert("RGB"))
    assert len(found) == len(lines) > 2
    assert sorted((pages.box_of(box), text) for box, text, _ in found) == \
        sorted((line["box"], line["text"]) for line in lines)
    assert [line["box"] for line in pages.PageReader(reader)(Image.open(page).convert("RGB"))] == \
        [line["box"] for line in lines]
    capsys.readouterr()


# ------------------------------------------------------------------------------------- predict on pages

def test_predict_reads_pages_line_by_line_and_crops_as_before(student, tmp_path, capsys):
    model, path = student
    inputs = tmp_path / "in"
    inputs.mkdir()
    render_page(inputs / "page.png")
    Image.new("RGB", (120, 30), "white").save(inputs / "word.png")
    out = tmp_path / "out"
    assert main.main(["--mode", "predict", "--model", path, "--input", str(inputs), "--output-dir", str(out)]) == 0
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    page_rows = [r for r in rows if r["file"].endswith("page.png")]
    assert len(page_rows) == 3 and [r["line"] for r in page_rows] == [1, 2, 3]
    assert all(set(r) >= {"box", "points", "text", "confidence", "text_file"} for r in page_rows)
    assert [r["box"][1] for r in page_rows] == sorted(r["box"][1] for r in page_rows)  # reading order
    text = (out / page_rows[0]["text_file"]).read_text()
    assert text == "\n".join(r["text"] for r in page_rows) + "\n"
    (crop_row,) = [r for r in rows if r["file"].endswith("word.png")]
    assert set(crop_row) == {"file", "page", "text", "confidence"}
    summary = json.loads((out / "predict_summary.json").read_text())
    assert summary["pages"] == 2 and summary["seconds"]["prepare"] > 0
    # --read-as crop: the page is one crop too
    assert main.main(["--mode", "predict", "--model", path, "--input", str(inputs), "--output-dir", str(out),
                      "--overwrite", "--read-as", "crop"]) == 0
    assert len(open(out / "predictions.jsonl").readlines()) == 2
    capsys.readouterr()


# ----------------------------------------------------------------------------------- --ocr-engine

def test_words_of_lines_interpolate_boxes_by_character_position():
    lines = [{"text": "ab  cdef", "box": [100, 10, 180, 30]}, {"text": "", "box": [0, 0, 5, 5]}]
    words, boxes = pages.words_of(lines)
    assert words == ["ab", "cdef"]
    assert boxes == [[100, 10, 120, 30], [140, 10, 180, 30]]  # characters 0-2 and 4-8 of 8, 10 px each
    assert pages.reading_order([[50, 0, 60, 10], [0, 2, 10, 12], [0, 30, 10, 40]]) == [[1, 0], [2]]


def test_ocr_engine_reads_pages_and_keys_its_cache(student, tmp_path):
    """PP-OCRv4 (and a student) as the page tasks' OCR: words with pixel boxes in ocr.py's format, cached under a
    key of the engine; Tesseract's key is the one it always had."""
    _, path = student
    page = Image.open(render_page(tmp_path / "page.png")).convert("RGB")
    engine = pages.ocr_engine("ppocrv4")
    assert pages.ocr_engine("tesseract") is None
    result = ocr.cached_page_ocr(page, str(tmp_path / "ocr"), engine)
    assert len(result["ocr_words"]) == len(result["word_boxes"]) >= 3 and len(result["ocr_paragraphs"]) == 3
    assert "".join(result["ocr_words"]).lower().startswith("invoice")
    assert all(0 <= b[0] < b[2] <= 640 and 0 <= b[1] < b[3] <= 480 for b in result["word_boxes"])
    tesseract_key = hashlib.sha256(ocr.CACHE_VERSION)
    tesseract_key.update(f"{page.mode}:{page.size}".encode())
    tesseract_key.update(page.tobytes())
    assert ocr.page_key(None).hexdigest() == hashlib.sha256(ocr.CACHE_VERSION).hexdigest()
    stored = os.listdir(tmp_path / "ocr")
    assert len(stored) == 1 and stored[0] != tesseract_key.hexdigest() + ".json"
    assert ocr.cached_page_ocr(page, str(tmp_path / "ocr"), engine) == result  # from the cache
    student_engine = pages.ocr_engine(path)
    assert student_engine.key != engine.key
    read = student_engine.read(page)
    assert len(read["ocr_paragraphs"]) == 3 and len(read["ocr_words"]) == len(read["word_boxes"])
