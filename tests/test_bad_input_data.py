"""Bad input data and a bad environment: one line that says what is wrong and how to fix it, exit code 2, no
traceback, and the output directory left as it was (the `fails` fixture of test_bad_input.py checks all four)."""
import errno
import json
import os

import datasets
import pytesseract

import main
from test_bad_input import FAST, cache, corpus, fails, out, snapshot  # noqa: F401 (fixtures)


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
