"""Bad input data and a bad environment: one line that says what is wrong and how to fix it, exit code 2, no
traceback, and the output directory left as it was (the `fails` fixture of test_bad_input.py checks all four)."""
import errno

import datasets
import pytesseract

from test_bad_input import FAST, cache, corpus, fails, out, snapshot  # noqa: F401 (fixtures)


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
