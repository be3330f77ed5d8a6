"""Bad input data and a bad environment: one line that says what is wrong and how to fix it, exit code 2, no
traceback, and the output directory left as it was (the `fails` fixture of test_bad_input.py checks all four)."""
import errno
import json
import os

import datasets
import numpy as np
import pytest
import pytesseract
from PIL import Image

import dataset
import main
import ocr
import utils
import wordtags
from test_bad_input import FAST, cache, error_line, fails, out  # noqa: F401 (cache, out: fixtures)
from test_token_classification import TRICKY, byte_bpe, tiny_teacher_dir, wordpiece, write_funsd


def write_json_data(tiny_demo, folder, splits=("train", "validation")):
    """The tiny corpus as JSON Lines with class names as labels and each page as a PNG path relative to it."""
    os.makedirs(folder / "pages")
    data = datasets.load_from_disk(tiny_demo)
    for name in splits:
        names = data[name].features["label"].names
        with open(folder / f"{name}.jsonl", "w") as f:
            for i, row in enumerate(data[name]):
                page = f"pages/{name}-{i}.png"
                row["image"].save(folder / page)
                f.write(json.dumps({"image": page, "width": row["width"], "height": row["height"],
                                    "ocr_words": row["ocr_words"], "word_boxes": row["word_boxes"],
                                    "label": names[row["label"]], "category": row["category"]}) + "\n")
    return folder


def test_tesseract_missing_is_one_line_after_the_progress_bar(fails, tiny_demo, tmp_path, monkeypatch):
    no_ocr = tmp_path / "no-ocr"
    datasets.load_from_disk(tiny_demo).remove_columns(
        ["ocr_words", "word_boxes", "ocr_paragraphs", "paragraph_boxes"]).save_to_disk(str(no_ocr))
    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", str(tmp_path / "no-such-tesseract"))
    error = fails("--dataset", no_ocr, "--cache-dir", tmp_path / "fresh-cache")
    assert "Tesseract is not installed" in error and "apt-get install tesseract-ocr" in error


def test_disk_full_says_no_space_left_and_where(fails, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(datasets.Dataset, "map", full)
    error = fails("--cache-dir", tmp_path / "fresh-cache")
    assert error.startswith("error: no space left on device at --output-dir ") and "fresh-cache" in error
    assert error.endswith(": free space or use another --output-dir/--cache-dir")

    def full_at(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/big/disk/cache.arrow")
    monkeypatch.setattr(datasets.Dataset, "map", full_at)
    assert "no space left on device at /big/disk/cache.arrow: free space" in fails("--cache-dir", tmp_path / "c2")


def test_max_length_beyond_the_students_positions(fails):
    error = fails("--max-length", "600")
    assert "--max-length 600 is more than the 512 token positions of the student (layoutlmv3, " \
           "max_position_embeddings 514): use --max-length 512 or less" in error


def test_json_with_class_names_as_labels_and_image_paths_loads(capsys, tiny_demo, cache, tmp_path):
    data = write_json_data(tiny_demo, tmp_path / "json")
    code = main.main([str(f) for f in [*FAST, "--mode", "info", "--dataset", data, "--cache-dir", cache,
                                       "--output-dir", tmp_path / "out"]])
    printed = capsys.readouterr().out
    assert code == 0 and "splits train (32), validation (16)" in printed and '"words_per_document"' in printed
    assert '"zero": 0' in printed  # every page was read from its path: none is blank


def test_json_that_is_not_utf8(fails, tiny_demo, tmp_path):
    data = write_json_data(tiny_demo, tmp_path / "json")
    text = (data / "validation.jsonl").read_bytes()
    (data / "validation.jsonl").write_bytes(text.replace(b'"memo"', b'"m\xe9mo"'))
    error = fails("--dataset", data)
    assert f"{data / 'validation.jsonl'} is not UTF-8 text (byte " in error and "save it as UTF-8" in error


def test_empty_split_is_named(fails, tiny_demo, tmp_path):
    data = write_json_data(tiny_demo, tmp_path / "json")
    (data / "validation.jsonl").write_text("")
    assert f"{data / 'validation.jsonl'} is empty: add documents to it, or remove it" in fails("--dataset", data)
    on_disk = datasets.load_from_disk(tiny_demo)
    on_disk["validation"] = on_disk["validation"].select([])
    on_disk.save_to_disk(str(tmp_path / "empty"))
    error = fails("--dataset", tmp_path / "empty")
    assert "split 'validation' is empty (0 documents): add documents to it" in error and "offline" not in error


def test_only_a_train_split_too_small_to_carve_validation_from(fails, tiny_demo, tmp_path):
    datasets.DatasetDict(train=datasets.load_from_disk(tiny_demo)["train"]).save_to_disk(str(tmp_path / "train"))
    error = fails("--dataset", tmp_path / "train")
    assert "no 'validation' split and 10% of the 32 documents of 'train' cannot be set aside" in error
    assert "add a 'validation' split, or more documents of each class" in error


def test_mistyped_eval_split_lists_the_splits(fails, tiny_demo, tmp_path):
    error = fails("--mode", "eval", "--eval-split", "tset")
    assert "dataset has no split 'tset' (splits: train, validation, test): use --eval-split with one of them" in error
    no_validation = datasets.load_from_disk(tiny_demo)
    del no_validation["validation"]
    no_validation.save_to_disk(str(tmp_path / "no-validation"))
    error = fails("--mode", "eval", "--dataset", tmp_path / "no-validation")  # eval never scores a carved split
    assert "dataset has no split 'validation' (splits: train, test)" in error


# ----------------------------------------------------------------------------- token classification (FUNSD)

@pytest.fixture(scope="module")
def token_flags(tmp_path_factory):
    """Flags of a token-classification `info` run (it preprocesses every split) with tiny random models."""
    root = tmp_path_factory.mktemp("token")
    _, student_tokenizer = wordpiece(root, TRICKY)
    teacher_tokenizer, bpe_dir = byte_bpe(root)
    return ["--mode", "info", "--task", "token-classification", "--tokenizer", student_tokenizer,
            "--student-config", "builtin:distilbert-base-uncased", "--student-size", "tiny", "--eval-split", "test",
            "--teacher", tiny_teacher_dir(root, bpe_dir, len(teacher_tokenizer)), "--cache-dir", root / "cache"]


def annotation(root, name="form00"):
    return root / "training_data" / "annotations" / f"{name}.json"


def edit_first_word(path, **word):
    form = json.loads(path.read_text())
    form["form"][0]["words"][0] = {**form["form"][0]["words"][0], **word}
    path.write_text(json.dumps(form))


BAD_FORMS = {
    "malformed JSON": (lambda p: p.write_text('{"form": [{"label": "header",'), "is not valid JSON (Expecting"),
    "no form": (lambda p: p.write_text('{"entities": []}'), "has no 'form' (the list of entities)"),
    "word without a box": (lambda p: edit_first_word(p, box=None), "entity 0: word 0 'RESEARCH' has box None"),
    "3-coordinate box": (lambda p: edit_first_word(p, box=[10, 10, 90]), "has box [10, 10, 90]: give 4 numbers"),
    "null text": (lambda p: edit_first_word(p, text=None), "entity 0: word 0 has no text (null"),
    "missing page image": (lambda p: (p.parent.parent / "images" / f"{p.stem}.png").unlink(),
                           "images/form00.png cannot be read ("),
    "not UTF-8": (lambda p: p.write_bytes(p.read_text().replace("RESEARCH", "RÉSEARCH").encode("latin-1")),
                  "is not UTF-8 text (byte "),
}


@pytest.mark.parametrize("case", BAD_FORMS)
def test_bad_funsd_form_stops_the_run_naming_its_file(capsys, out, token_flags, tmp_path, case):
    edit, message = BAD_FORMS[case]
    data = write_funsd(tmp_path / "funsd")
    edit(annotation(tmp_path / "funsd"))
    error = error_line(capsys, out, [*token_flags, "--dataset", data])
    assert f"split 'train', document 0: {annotation(tmp_path / 'funsd')}" in error and message in error
    assert "--on-bad-sample skip" in error


def test_skip_leaves_bad_forms_out_and_counts_them(capsys, caplog, token_flags, tmp_path):
    data = write_funsd(tmp_path / "funsd", forms_per_split=3)
    annotation(tmp_path / "funsd", "form01").write_text("{not json")
    code = main.main([str(f) for f in [*token_flags, "--dataset", data, "--on-bad-sample", "skip",
                                       "--output-dir", tmp_path / "out"]])
    printed = capsys.readouterr().out
    assert code == 0 and '"documents": 2,\n  "skipped": 1' in printed
    assert "train: skipping 1 unusable documents of 3 (first, document 1: " in caplog.text


def hub_layout(tmp_path, change):
    """The generated forms in the hub's layout (tokens, bboxes, ner_tags, image); change(row) -> columns to change
    in the first training form."""
    folder = wordtags.load_funsd_folder(write_funsd(tmp_path / "funsd"))
    hub = datasets.DatasetDict({name: split.remove_columns("problem").rename_columns(
        {"words": "tokens", "boxes": "bboxes"}) for name, split in folder.items()})
    hub["train"] = hub["train"].map(lambda row, i: {**row, **change(row)} if i == 0 else row, with_indices=True)
    hub.save_to_disk(str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_layout_with_pixel_boxes_or_missing_tags(capsys, out, token_flags, tmp_path):
    pixel_boxes = hub_layout(tmp_path / "a", lambda row: {"bboxes": [[20, 1200, 180, 1300]] * len(row["tokens"])})
    error = error_line(capsys, out, [*token_flags, "--dataset", pixel_boxes])
    assert "split 'train', document 0: word box 0 [20, 1200, 180, 1300] lies outside the 1000x1000 page" in error
    assert "0-1000 grid" in error and "not pixels" in error
    short_tags = hub_layout(tmp_path / "b", lambda row: {"ner_tags": row["ner_tags"][:-1]})
    error = error_line(capsys, out, [*token_flags, "--dataset", short_tags])
    assert "split 'train', document 0: 11 words, 11 boxes and 10 tags: give one box and one tag per word" in error
    assert wordtags.form_problem([], [], []) == ""  # a form without words is usable (it scores nothing)


def test_max_length_beyond_the_token_teachers_positions(capsys, out, token_flags, tmp_path):
    error = error_line(capsys, out, [*token_flags, "--dataset", write_funsd(tmp_path / "funsd"), "--max-length", 513])
    assert "--max-length 513 is more than the 512 token positions of the teacher (layoutlmv3" in error


def test_skipping_selects_through_an_indices_file_not_in_memory(tmp_path):
    split = datasets.Dataset.from_dict({"problem": ["", "bad page", "", ""]})
    prepared = dataset.cached_map(split, lambda batch, indices: {"index": indices, "problem": batch["problem"]},
                                  None, str(tmp_path), "key", "test")
    usable = dataset.drop_bad_documents(prepared, "train", "skip")
    assert usable.with_format(None)["index"] == [0, 2, 3]
    files = [os.path.basename(f["filename"]) for f in usable.cache_files]
    assert files == ["key.arrow", "key.usable.arrow"]  # the teacher-logit cache key sees the selection


def test_16_bit_grayscale_page_is_scaled_not_blank(monkeypatch):
    values = np.full((40, 60), 60000, np.uint16)
    values[10:20, 5:55] = 5000  # dark text on light paper, every value above 255
    page = Image.fromarray(values)
    assert page.mode == "I;16"
    rgb = np.asarray(utils.to_rgb(page))
    assert rgb.shape == (40, 60, 3) and rgb[0, 0].tolist() == [233] * 3 and rgb[15, 30].tolist() == [19] * 3
    spec = {"size": [20, 30], "resample": 2}
    assert dataset.resize_page(page, spec).min() < 50  # the text survives resizing
    seen = []
    monkeypatch.setattr(pytesseract, "image_to_data", lambda image, **kw: seen.append(np.asarray(image)) or
                        {key: [] for key in ("text", "conf", "left", "top", "width", "height", "page_num",
                                             "block_num", "par_num")})
    ocr.ocr_page(page)
    assert seen[0].min() == 19 and seen[0].max() == 233  # Tesseract sees the text, not a white page


def test_bad_input_creates_no_output_directory(capsys, tiny_demo, cache, tmp_path):
    code = main.main([str(f) for f in [*FAST, "--mode", "eval", "--dataset", tiny_demo, "--cache-dir", cache,
                                       "--eval-split", "tset", "--output-dir", tmp_path / "new"]])
    assert code == 2 and "no split 'tset'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
