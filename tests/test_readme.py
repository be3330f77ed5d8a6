"""README's quick start, run from the page's own text, so that the front page cannot rot.

Each `<!-- quick start: TASK -->` block of README.md is read from the page and its `python main.py ...` lines are run
as written (main.main with their arguments, in a folder that holds tiny inputs under the names the page uses), in
order; every command must succeed and leave what it promises. Two things are added, the same for every block:
flags that only size the work (SIZING, appended to the commands that train or score), and, where a preset names
Hugging Face hub ids (no hub here), local stand-ins in their place with a small student. Page classification and
word tagging need Tesseract (their new documents are images), word tagging ../shared's DistilBERT files.
"""
import json
import os
import re
import shlex
import shutil

import pytest
from PIL import Image, ImageDraw, ImageFont

import config
from conftest import ROOT, SHARED, run_main

README = os.path.join(ROOT, "README.md")
SIZING = {"teacher": ["--epochs", "1"], "train": ["--epochs", "1", "--student-size", "micro"],
          "eval": ["--student-size", "micro"]}
PAGE_SIZING = ["--student-image-size", "32"]  # page classification's student reads the page too
WORDS = {"letter": "dear sir sincerely yours regards", "invoice": "invoice total amount due payment",
         "memo": "memo to from subject date"}
needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None, reason="Tesseract is not installed")


def quick_start(task):
    """The command lines of README's quick-start block for `task`, as argument lists (without `python main.py`)."""
    text = open(README).read()
    block = re.search(rf"<!-- quick start: {task} -->\s*```bash\n(.*?)```", text, re.S)
    assert block, f"README has no quick-start block for {task}"
    lines = [line for line in block.group(1).splitlines() if line.startswith("python main.py ")]
    assert lines, task
    return [shlex.split(line)[2:] for line in lines]


def run_quick_start(task, folder, stand_ins=None, monkeypatch=None, sizing=()):
    """Run the block in `folder`; returns {mode: its run's output dir}. stand_ins: settings of the presets replaced
    (hub ids by local stand-ins)."""
    if stand_ins:
        presets = config.preset_settings
        monkeypatch.setattr(config, "preset_settings", lambda name: {**presets(name), **stand_ins})
    outputs = {}
    for argv in quick_start(task):
        mode = argv[argv.index("--mode") + 1]
        argv = [os.path.join(folder, a) if os.path.exists(os.path.join(folder, a.split("/")[0])) or a.startswith(
            "runs/") else a for a in argv] + SIZING.get(mode, []) + (list(sizing) if mode in SIZING else [])
        done = run_main(*argv)
        assert done.returncode == 0, (argv, done.stderr[-3000:])
        outputs[mode] = argv[argv.index("--output-dir") + 1]
    return outputs


def write_pages(folder, per_class, classes=WORDS):
    """Pages of printed words, one folder per class."""
    font = ImageFont.load_default(size=26)
    for name, words in classes.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for k in range(per_class):
            page = Image.new("L", (420, 320), 255)
            draw = ImageDraw.Draw(page)
            shown = words.split()[k % 3:] + words.split()[:k % 3]
            for line in range(3):
                draw.text((20, 30 + 90 * line), " ".join(shown[line:line + 3]), font=font, fill=0)
            page.save(os.path.join(folder, name, f"page{k}.png"))


@needs_tesseract
def test_page_classification_quick_start(tmp_path, one_thread):
    write_pages(tmp_path / "my_pages", 10)
    write_pages(tmp_path / "my_test_pages", 2)
    write_pages(tmp_path / "unlabelled", 2)
    os.makedirs(tmp_path / "my_unlabeled_pages")
    os.makedirs(tmp_path / "new_scans")
    for k, path in enumerate(sorted((tmp_path / "unlabelled").rglob("*.png"))):
        shutil.copy(path, tmp_path / ("my_unlabeled_pages" if k < 4 else "new_scans") / f"page{k}.png")
    out = run_quick_start("page classification", str(tmp_path), sizing=PAGE_SIZING)
    run = tmp_path / "runs" / "mine"
    assert out["train"] == str(run)
    for name in ("teacher/model.safetensors", "student/model.safetensors", "student/checksums.json", "eval.json",
                 "predictions.jsonl", "predictions.csv", "onnx/model.onnx", "onnx/model.int8.onnx"):
        assert (run / name).exists(), name
    scores = json.load(open(run / "eval.json"))
    assert scores["documents"] == 6 and 0 <= scores["accuracy"] <= 1
    rows = [json.loads(line) for line in open(run / "predictions.jsonl")]
    assert len(rows) == 2 and all(row["label"] in WORDS for row in rows)


def test_text_recognition_quick_start(tmp_path, one_thread):
    font = ImageFont.load_default(size=22)
    words = ["form", "date", "total", "name", "page", "cost", "tel", "fax", "box", "item", "sum", "net"]
    for folder, chosen in (("my_crops", words + [w.upper() for w in words]), ("new_crops", words[:3])):
        os.makedirs(tmp_path / folder)
        for k, word in enumerate(chosen):
            crop = Image.new("RGB", (24 + 14 * len(word), 36), "white")
            ImageDraw.Draw(crop).text((8, 6), word, font=font, fill="black")
            crop.save(tmp_path / folder / f"crop{k}.png")
            if folder == "my_crops" and k % 5:  # every fifth crop has no transcript: unlabelled
                (tmp_path / folder / f"crop{k}.txt").write_text(word)
    run_quick_start("text recognition", str(tmp_path))
    run = tmp_path / "runs" / "crops"
    assert json.load(open(run / "eval.json"))["crops"] > 0
    assert len(open(run / "predictions.jsonl").readlines()) == 3
    assert (run / "onnx" / "model.onnx").exists()


@needs_tesseract
@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "models")), reason="needs ../shared/models")
def test_word_tagging_quick_start(tmp_path, one_thread, monkeypatch):
    from test_token_classification import byte_bpe, tiny_teacher_dir, write_funsd
    write_funsd(tmp_path / "my_forms", forms_per_split=3)
    write_funsd(tmp_path / "my_unlabeled_forms")
    os.makedirs(tmp_path / "new_forms")
    shutil.copy(tmp_path / "my_forms" / "testing_data" / "images" / "form10.png", tmp_path / "new_forms")
    teacher_tokenizer, bpe_dir = byte_bpe(tmp_path)
    distilbert = os.path.join(SHARED, "models", "distilbert-base-uncased")  # its config and tokenizer, no weights
    stand_ins = {"teacher": tiny_teacher_dir(tmp_path, bpe_dir, len(teacher_tokenizer)), "student_config": distilbert,
                 "tokenizer": distilbert, "student_size": "micro"}
    run_quick_start("word tagging", str(tmp_path), stand_ins, monkeypatch)
    run = tmp_path / "runs" / "forms"
    scores = json.load(open(run / "eval.json"))
    assert scores["documents"] == 3 and 0 <= scores["f1"] <= 1
    assert json.loads(open(run / "predictions.jsonl").readline())["words"]
    assert (run / "onnx" / "model.onnx").exists()
