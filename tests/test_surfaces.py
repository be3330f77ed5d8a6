"""Reliability III: the guarantees of the page and word tasks on the surfaces that came later (text recognition,
predict, export, sweep, config files): bad input is one line naming what is wrong, nothing is lost or overwritten
by accident, no input takes unbounded memory. Table-driven where there are several cases of one kind."""
import io
import json
import os
import subprocess
import sys
import time

import pypdfium2 as pdfium
import pytest
from PIL import Image, ImageDraw

import main
import utils
from conftest import ROOT
from modes import predict
from test_text_recognition import tiny_onnx_teacher
from textrec import data as textrec

WORDS = ["form", "date", "total", "name", "page", "cost", "tel", "fax", "box", "item"]


def crop(path, word):
    image = Image.new("RGB", (16 + 9 * len(word), 24), "white")
    ImageDraw.Draw(image).text((6, 6), word, fill="black")
    image.save(path)


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """A folder of crop images (their transcripts come from the table a case writes)."""
    root = tmp_path_factory.mktemp("crops")
    for k, word in enumerate(WORDS):
        crop(root / f"c{k}.png", word)
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_onnx_teacher(str(tmp_path_factory.mktemp("teacher") / "tiny_rec.onnx"))


def good_rows():
    return [json.dumps({"image": f"c{k}.png", "text": word}) for k, word in enumerate(WORDS)]


def run(capsys, *args):
    """main.main(args) -> (exit code, the last line of stderr)."""
    capsys.readouterr()
    code = main.main([str(a) for a in args])
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


# --------------------------------------------------------------------- 4: bad text-recognition input, one line each

BAD_ROWS = {  # the line written as row 3 of the table, and what the one line must say
    "malformed JSONL line": ('{"image": "c2.png", "text": "total"', "train.jsonl row 3 is not valid JSON"),
    "text that is not a string": (json.dumps({"image": "c2.png", "text": 7}),
                                  "train.jsonl row 3: 'text' must be a string, got int"),
    "box of 3 numbers": (json.dumps({"image": "c2.png", "text": "total", "box": [1, 2, 3]}),
                         "train.jsonl row 3: box [1, 2, 3] is not 4 numbers"),
    "box of text": (json.dumps({"image": "c2.png", "text": "total", "box": "left"}),
                    "train.jsonl row 3: box 'left' is not a JSON list of numbers"),
    "no image": (json.dumps({"text": "total"}), "train.jsonl row 3 has no 'image'"),
    "missing image": (json.dumps({"image": "nope.png", "text": "total"}), "nope.png does not exist"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_text_recognition_row_is_one_line_naming_file_and_row_or_skipped(case, crops, teacher, tmp_path,
                                                                             capsys):
    line, says = BAD_ROWS[case]
    rows = good_rows()
    rows[2] = line
    (crops / "train.jsonl").write_text("\n".join(rows) + "\n")
    (crops / "validation.jsonl").write_text("\n".join(good_rows()[:3]) + "\n")
    args = ["--mode", "info", "--task", "text-recognition", "--dataset", crops, "--teacher", teacher,
            "--cache-dir", tmp_path / "cache", "--output-dir", tmp_path / "out"]
    code, error = run(capsys, *args)
    assert code == 2 and error.startswith("error: ") and says in error and "--on-bad-sample skip" in error, error
    code, _ = run(capsys, *args, "--on-bad-sample", "skip")
    assert code == 0


def test_crop_folder_inputs_bad_transcript_csv_box_and_pixel_limit(crops, tmp_path, monkeypatch):
    folder = tmp_path / "folder"
    folder.mkdir()
    crop(folder / "a.png", "form")
    (folder / "a.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (rows,) = [textrec.folder_records(str(folder))]
    assert "a.txt is not UTF-8 text (byte 3)" in rows[0]["problem"]
    csv_file = tmp_path / "t.csv"
    csv_file.write_text(f"image,text,box\n{crops / 'c0.png'},form,\"[1, 2, x]\"\n")
    assert "box '[1, 2, x]' is not a JSON list of numbers" in textrec.table_records(str(csv_file))[0]["problem"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every crop is over it
    assert "over the 100 pixels images may have" in textrec.image_problem(str(crops / "c0.png"))


# --------------------------------------------------------------------- 5: a --teacher that is not a CTC recogniser

def not_a_recogniser(path, kind):
    """An ONNX teacher that is wrong in one way."""
    import onnx
    from onnx import TensorProto, helper
    if kind in ("truncated", "random bytes"):
        good = open(tiny_onnx_teacher(path), "rb").read()
        open(path, "wb").write(good[:len(good) // 2] if kind == "truncated" else os.urandom(len(good)))
        return path
    if kind == "too many characters":
        model = onnx.load(tiny_onnx_teacher(path))
        helper.set_model_props(model, {"character": "\n".join("abcdefghij")})
        onnx.save(model, path)
        return path
    # "pooled output": [N, C], one prediction per crop, not per time step
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["probs"])]
    graph = helper.make_graph(nodes, "not_ctc", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                               ["n", 3, 48, "w"])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, {"character": "a"})
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("kind, says", [
    ("truncated", "is not an ONNX model (truncated, or another kind of file)"),
    ("random bytes", "is not an ONNX model (truncated, or another kind of file)"),
    ("pooled output", "gives an output of shape [1, 3] for one crop: expected a CTC text recogniser"),
    ("too many characters", "its `character` list has 10 characters"),
])
def test_a_teacher_that_is_not_a_ctc_recogniser_is_refused_before_training(kind, says, crops, tmp_path, capsys):
    (crops / "train.jsonl").write_text("\n".join(good_rows()) + "\n")
    (crops / "validation.jsonl").write_text("\n".join(good_rows()[:3]) + "\n")
    teacher = not_a_recogniser(str(tmp_path / "teacher.onnx"), kind)
    code, error = run(capsys, "--mode", "train", "--task", "text-recognition", "--dataset", crops, "--teacher",
                      teacher, "--cache-dir", tmp_path / "cache", "--output-dir", tmp_path / "out")
    assert code == 2 and error.startswith(f"error: --teacher {teacher}") and says in error, error
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------- 6 and 9: text recognition without labels

@pytest.mark.parametrize("how", ["--unlabeled", "--labeled-fraction 0"])
def test_text_recognition_learns_from_unlabelled_crops(how, crops, teacher, tmp_path, capsys, caplog, one_thread):
    (crops / "train.jsonl").write_text("\n".join(good_rows()) + "\n")
    (crops / "validation.jsonl").write_text("\n".join(good_rows()[:3]) + "\n")
    caplog.set_level("INFO")
    extra = ["--unlabeled", crops] if how == "--unlabeled" else ["--labeled-fraction", "0"]
    code, error = run(capsys, "--mode", "train", "--task", "text-recognition", "--dataset", crops, "--teacher",
                      teacher, "--epochs", "1", "--student-size", "micro", "--alpha", "0.5", *extra,
                      "--cache-dir", tmp_path / "cache", "--output-dir", tmp_path / "out")
    assert code == 0, error
    row = json.loads(open(tmp_path / "out" / "student_metrics.jsonl").readline())
    assert row["train_kl"] > 0
    if how == "--unlabeled":  # the folder's crops (all its splits) join the 10 labelled ones
        assert f"unlabeled ({crops}): 13 documents join train" in caplog.text
    else:
        assert "--labeled-fraction 0: 0 of 10 training documents keep their labels" in caplog.text
        assert row["train_ctc"] == 0


def test_char_accuracy_is_clipped_at_zero():
    assert textrec.char_accuracy(2.5) == 0.0 and textrec.char_accuracy(0.25) == 0.75
    assert textrec.char_accuracy(float("nan")) != textrec.char_accuracy(float("nan"))  # nothing scored: NaN


# --------------------------------------------------------------------- 2: no input takes unbounded memory

def pdf_bytes(*sizes):
    document = pdfium.PdfDocument.new()
    for width, height in sizes:
        document.new_page(width, height)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def test_a_pdf_page_of_200_inches_renders_within_the_pixel_limit(tmp_path, monkeypatch, caplog):
    bomb = tmp_path / "bomb.pdf"
    bomb.write_bytes(pdf_bytes((14400, 14400)))  # 200 x 200 inches: 40000 x 40000 pixels at 200 dpi
    assert bomb.stat().st_size < 1000
    monkeypatch.setattr(predict, "MAX_PAGE_PIXELS", 250_000)  # the default is PIL's 89M; a small one keeps it quick
    (page,) = predict.read_pages(str(bomb), 200)
    assert page.width * page.height <= 250_000 and page.width == page.height
    assert "rendered at 2 dpi instead of --pdf-dpi 200" in caplog.text
    assert predict.MAX_PAGE_PIXELS == 250_000 and Image.MAX_IMAGE_PIXELS > 80_000_000


def test_predict_reads_an_image_as_training_does(tmp_path):
    # a grey scan with an EXIF orientation: predict's page is the page training's datasets decodes (mode, pixels),
    # so both OCR the same pixels and predict finds training's OCR cache entry (Tesseract reads a grey page and its
    # RGB copy differently: 60 of 64 real RVL-CDIP pages got other words when predict OCR'd an RGB copy)
    import datasets
    scan = tmp_path / "scan.jpg"
    page = Image.new("L", (120, 80), 255)
    ImageDraw.Draw(page).rectangle((10, 10, 50, 30), fill=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 on display
    page.save(scan, exif=exif)
    (read,) = predict.read_pages(str(scan), 200)
    decoded = datasets.Image().decode_example({"path": str(scan), "bytes": None})
    assert (read.mode, read.size) == (decoded.mode, decoded.size) == ("L", (80, 120))
    assert read.tobytes() == decoded.tobytes()


def test_a_pdf_without_pages_says_so(tmp_path):
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(pdf_bytes())
    with pytest.raises(ValueError, match="not a readable PDF") as refused:
        list(predict.read_pages(str(empty), 200))
    assert "Success" not in str(refused.value)


def test_expanding_many_inputs_is_linear(tmp_path):
    names = [str(tmp_path / f"f{k}.png") for k in range(20000)]
    for name in names[:3]:
        open(name, "w").close()
    start = time.perf_counter()
    files, missing = predict.expand_inputs(names[:3] * 5000 + names[3:6])
    assert files == names[:3] and missing == names[3:6]
    assert time.perf_counter() - start < 2  # quadratic: minutes


# --------------------------------------------------------------------- 3: nothing a user made is removed

def test_predict_and_export_never_replace_or_remove_what_they_did_not_write(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "onnx").mkdir(parents=True)
    (out / "onnx" / "notes.txt").write_text("mine")
    (out / "predictions.jsonl").write_text("an earlier run's\n")
    code, error = run(capsys, "--mode", "predict", "--input", tmp_path, "--output-dir", out)
    assert code == 2 and "already holds predictions (predictions.jsonl): replace them with --overwrite" in error
    code, error = run(capsys, "--mode", "export", "--input", tmp_path, "--output-dir", out)
    assert code == 2 and "onnx already holds an export" in error and "--overwrite" in error
    assert (out / "predictions.jsonl").read_text() == "an earlier run's\n"

    def write(directory):  # what export writes, through the same function
        open(os.path.join(directory, "model.onnx"), "w").write("new")
    utils.atomic_files(str(out / "onnx"), write)
    assert (out / "onnx" / "notes.txt").read_text() == "mine" and (out / "onnx" / "model.onnx").read_text() == "new"


# --------------------------------------------------------------------- 8: two runs into one output directory

def test_a_second_run_into_the_same_directory_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / utils.LOCK).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        code, error = run(capsys, "--mode", "predict", "--input", ROOT, "--output-dir", out)
        assert code == 2 and f"is in use by another docdistill run (process {holder.pid})" in error
    finally:
        holder.kill()
        holder.wait()
    with utils.output_lock(str(out)):  # its process is gone: taken over
        assert json.loads((out / utils.LOCK).read_text())["pid"] == os.getpid()
    assert not (out / utils.LOCK).exists()
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError):
        with utils.output_lock(str(fresh)):
            raise ValueError("bad input")
    assert not fresh.exists()  # a directory the lock made and nothing else wrote into is removed


# --------------------------------------------------------------------- 7: sweep storage, 9: config files

@pytest.mark.parametrize("storage, says", [
    ("foo://nowhere", "cannot open the study's database"),
    ("sqlite:////nonexistent-folder/sweep.db", "cannot open the study's database"),
    ("corrupt", "cannot open the study's database (file is not a database)"),
])
def test_a_sweep_storage_that_cannot_be_opened_is_one_line(storage, says, tmp_path, capsys):
    if storage == "corrupt":
        (tmp_path / "sweep.db").write_bytes(b"not a database" * 100)
        storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    code, error = run(capsys, "--mode", "sweep", "--sweep", "alpha=0,0.5", "--preset", "demo", "--sweep-storage",
                      storage, "--output-dir", tmp_path / "out")
    assert code == 2 and error.startswith(f"error: --sweep-storage {storage}: {says}"), error


def test_list_valued_sweep_axes_are_refused_and_not_listed(capsys, tmp_path):
    code, error = run(capsys, "--mode", "sweep", "--sweep", "teacher_weights=1,2", "--output-dir", tmp_path)
    assert code == 2 and "'teacher_weights' cannot be an axis" in error
    assert "teacher_weights" not in error.split("(axes:")[1] and "extra_teachers" not in error


@pytest.mark.parametrize("name, text", [("c.yaml", "lr: 0.1\nepochs: 2\nlr: 0.2\n"),
                                        ("c.json", '{"lr": 0.1, "lr": 0.2}')])
def test_a_key_given_twice_in_a_config_file_is_refused(name, text, tmp_path, capsys):
    (tmp_path / name).write_text(text)
    code, error = run(capsys, "--config", tmp_path / name, "--mode", "info")
    assert code == 2 and f"--config {tmp_path / name}: lr given twice" in error
