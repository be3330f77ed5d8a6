"""Bad input: one line that says what is wrong and how to fix it, exit code 2, and no output touched.

Most commands run main.main() in this process (the same code path as the CLI, without paying for the imports
every time); the CLI itself is checked for the exit code, the single line and --debug's traceback.
"""
import logging
import os

import datasets
import pytest
import torch
from transformers import BeitImageProcessor, BertConfig, LayoutLMv3Config, LayoutLMv3ForSequenceClassification

import dataset
import main
import models
from conftest import run_main
from demo_corpus import RVLCDIP_LABELS

FAST = ["--preset", "demo", "--max-length", "64", "--batch-size", "8", "--student-image-size", "64"]


def snapshot(directory):
    return {p: open(os.path.join(d, p), "rb").read() for d, _, files in os.walk(directory) for p in files}


@pytest.fixture
def out(tmp_path):
    """An output directory holding a previous run's results, which a failing command must leave alone (even with
    --overwrite, which the commands below pass: the old run is replaced only as the new one saves its own)."""
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"name": "student", "epoch": 1}, out / "latest_checkpoint.pth")
    (out / "eval.json").write_text('{"accuracy": 0.5}\n')
    (out / "train_config.json").write_text('{"alpha": 0.7}\n')
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def error_line(capsys, out, argv):
    """The one error line of main.main(argv), checked: exit code 2, one error line and no traceback on stderr,
    `out` untouched."""
    before = snapshot(out)
    code = main.main([str(f) for f in ["--output-dir", out, *argv]])  # argv may override it
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, lines[-5:]
    assert snapshot(out) == before
    return errors[0]


@pytest.fixture
def fails(capsys, out, tiny_demo, cache):
    """fails(*flags) -> the error line of `main.py --mode train` on the tiny corpus (flags override)."""
    def run(*flags):
        return error_line(capsys, out, [*FAST, "--mode", "train", "--dataset", tiny_demo, "--cache-dir", cache,
                                        "--overwrite", *flags])
    return run


@pytest.fixture(scope="module")
def corpus(tiny_demo, tmp_path_factory):
    """corpus(split, index, **columns) -> a copy of the tiny corpus with one document changed."""
    original = datasets.load_from_disk(tiny_demo)

    def make(split, index, **columns):
        path = tmp_path_factory.mktemp("corpus")
        changed = original[split].map(lambda row, i: {**row, **columns} if i == index else row, with_indices=True,
                                      keep_in_memory=True)
        datasets.DatasetDict({**original, split: changed}).save_to_disk(str(path))
        return path
    return make


def teacher_dir(path, labels, architecture="BeitForImageClassification"):
    """A config-only teacher (random weights) for `labels`."""
    config = models.demo_teacher_config(labels)
    config.architectures = [architecture]
    config.save_pretrained(path)
    BeitImageProcessor(size={"height": 224, "width": 224}).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- the command line itself

def test_cli_error_is_one_line_with_exit_code_2_and_debug_shows_the_traceback(tmp_path):
    result = run_main("--mode", "train", "--preset", "demo", "--temperature", "0", "--output-dir", tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: --temperature must be > 0, got 0.0\n"
    debug = run_main("--mode", "train", "--preset", "demo", "--temperature", "0", "--output-dir", tmp_path,
                     "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
    (["--alpha", "1.5"], "--alpha must be in [0, 1], got 1.5"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--log-every", "0"], "--log-every must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--weight-decay", "-5"], "--weight-decay must be >= 0, got -5.0"),
    (["--student-image-size", "0"], "--student-image-size must be >= 16, got 0"),
    (["--max-samples", "-1"], "--max-samples must be >= 0, got -1"),
    (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
    (["--warmup-ratio", "2"], "--warmup-ratio must be in [0, 1], got 2.0"),
    (["--max-length", "2"], "--max-length must be >= 4, got 2"),
])
def test_invalid_hyper_parameters(fails, flags, message):
    assert message in fails(*flags)


# ----------------------------------------------------------------------------- paths, hub ids, checkpoints

@pytest.mark.parametrize("flag", ["--dataset", "--teacher", "--checkpoint", "--model"])
def test_missing_paths(fails, tmp_path, flag):
    error = fails(flag, tmp_path / "missing")
    assert f"{tmp_path / 'missing'}: no such" in error


def test_output_dir_that_is_a_file(fails, tmp_path):
    (tmp_path / "runs").write_text("notes")
    assert f"--output-dir {tmp_path / 'runs'} is a file, not a directory" in fails("--output-dir", tmp_path / "runs")
    assert (tmp_path / "runs").read_text() == "notes"


@pytest.mark.parametrize("content, message", [
    (b"", "is empty (0 bytes)"),
    (b"this is not a checkpoint" * 10, "is not a readable checkpoint"),
    (None, "is a directory, not a checkpoint file"),
])
def test_unreadable_checkpoint(fails, tmp_path, content, message):
    path = tmp_path / "latest_checkpoint.pth"
    path.mkdir() if content is None else path.write_bytes(content)
    assert message in fails("--checkpoint", path)


@pytest.mark.parametrize("flag, message", [("--teacher", "cannot load a model config from 'nobody-xyz/no-such"),
                                           ("--dataset", "cannot load dataset 'nobody-xyz/no-such")])
def test_unknown_hub_id_while_offline(out, tiny_demo, cache, flag, message):
    before = snapshot(out)
    given = {"--dataset": tiny_demo, "--teacher": "demo-dit", flag: "nobody-xyz/no-such-thing"}
    result = run_main(*FAST, "--mode", "train", "--output-dir", out, "--overwrite", "--cache-dir", cache,
                      *[x for kv in given.items() for x in kv])  # run_main sets HF_HUB_OFFLINE=1
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in error and ("offline" in error or "reachable from this machine" in error)
    assert snapshot(out) == before


def test_checkpoint_from_another_model(fails, tmp_path):
    teacher_run = tmp_path / "teacher_checkpoint.pth"
    torch.save({"name": "teacher", "fingerprint": "0", "settings": {}}, teacher_run)
    assert "is a checkpoint of teacher training, not of the student" in fails("--checkpoint", teacher_run)
    best_model = tmp_path / "student_model.pth"
    torch.save({"state_dict": {}, "config": "{}"}, best_model)
    assert "is not a docdistill training checkpoint" in fails("--checkpoint", best_model)
    beit = tmp_path / "teacher_model.pth"
    torch.save({"state_dict": {}, "config": models.demo_teacher_config(["a"]).to_json_string()}, beit)
    assert "holds a beit model, not a layoutlmv3 student" in fails("--mode", "eval", "--model", beit)


# ----------------------------------------------------------------------------- models and labels

def test_teacher_that_is_not_an_image_classifier(fails, tmp_path):
    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(tmp_path / "bert")
    assert "is a BertForMaskedLM model, not an image classifier" in fails("--teacher", tmp_path / "bert")


def test_student_and_teacher_class_count_mismatch(fails, tmp_path):
    teacher = teacher_dir(tmp_path / "teacher", RVLCDIP_LABELS[:3])
    assert "(3 classes in the teacher, 16 in the dataset)" in fails("--teacher", teacher)
    config = LayoutLMv3Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              coordinate_size=8, shape_size=16, vocab_size=100, input_size=64,
                              id2label=dict(enumerate(RVLCDIP_LABELS[:3])))
    student = LayoutLMv3ForSequenceClassification(config)
    torch.save({"state_dict": student.state_dict(), "config": config.to_json_string()}, tmp_path / "s.pth")
    error = fails("--mode", "eval", "--model", tmp_path / "s.pth")
    assert "was trained on 3 classes and the dataset has 16" in error


def test_dataset_without_label_column(fails, tiny_demo, tmp_path):
    datasets.load_from_disk(tiny_demo).remove_columns("label").save_to_disk(str(tmp_path / "nolabel"))
    assert "dataset has no 'label' column" in fails("--dataset", tmp_path / "nolabel")


def test_dataset_with_unknown_label_names(fails, tiny_demo, tmp_path):
    renamed = ["postcard" if n == "letter" else n for n in RVLCDIP_LABELS]
    error = fails("--teacher", teacher_dir(tmp_path / "teacher", renamed))
    assert "only in teacher: ['postcard']; only in dataset: ['letter']" in error
    data = datasets.load_from_disk(tiny_demo)
    data["validation"] = data["validation"].cast_column("label", datasets.ClassLabel(names=renamed))
    data.save_to_disk(str(tmp_path / "renamed"))
    error = fails("--dataset", tmp_path / "renamed")
    assert "split 'validation' has other class names than the training split (only in validation: ['postcard']" \
           in error


# ----------------------------------------------------------------------------- documents

BAD_DOCUMENTS = {
    "corrupt image": (dict(image={"bytes": b"\x89PNG\r\n garbage", "path": None}), "is not a readable image"),
    "zero-byte image": (dict(image={"bytes": b"", "path": None}), "is empty (0 bytes)"),
    "box outside the page": (dict(word_boxes=[[10, 10, 900, 30]] * 5, ocr_words=["w"] * 5),
                             "word box 0 [10, 10, 900, 30] lies outside the 320x416 page"),
    "inverted box": (dict(word_boxes=[[10, 10, 60, 12], [100, 40, 50, 12]], ocr_words=["a", "b"]),
                     "word box 1 [100, 40, 50, 12] is inverted"),
}


@pytest.mark.parametrize("case", BAD_DOCUMENTS)
def test_bad_document_stops_the_run_naming_it(fails, corpus, case):
    columns, message = BAD_DOCUMENTS[case]
    error = fails("--dataset", corpus("train", 3, **columns))
    assert "split 'train', document 3: " in error and message in error and "--on-bad-sample skip" in error


def test_a_page_without_ocr_words_is_a_document_of_its_class(capsys, caplog, corpus, cache, tmp_path):
    """Reliability III, 10: blank pages, file folders, photos have a class, read from the image alone (not errors
    under the default --on-bad-sample fail); training counts them."""
    caplog.set_level(logging.INFO)
    data = corpus("train", 3, ocr_words=[], word_boxes=[])
    code = main.main([str(f) for f in [*FAST, "--mode", "train", "--epochs", "1", "--alpha", "0", "--dataset", data,
                                       "--cache-dir", cache, "--output-dir", tmp_path]])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert "train: 32 documents" in caplog.text and "1 without OCR words (read from the page alone)" in caplog.text
    assert dataset.document_problem([], [], 320, 416) == ""


def test_boxes_within_the_tolerance_are_clamped_not_refused():
    assert dataset.document_problem(["a"], [[-3, 0, 325, 420]], 320, 416) == ""  # 1% outside: OCR rounding
    assert dataset.normalize_boxes([[-3, 0, 325, 420]], 320, 416) == [[0, 0, 1000, 1000]]
    assert dataset.document_problem(["a"], [[5, 5, 5, 9]], 320, 416) == ""  # zero width is not inverted
    assert "outside" in dataset.document_problem(["a"], [[0, 0, 330, 10]], 320, 416)  # 3%


def test_skip_leaves_bad_documents_out_and_reports_them(capsys, caplog, corpus, cache, tmp_path):
    caplog.set_level(logging.INFO)
    data = corpus("train", 3, image={"bytes": b"", "path": None})
    code = main.main([str(f) for f in [*FAST, "--mode", "train", "--epochs", "1", "--alpha", "0", "--dataset", data,
                                       "--cache-dir", cache, "--output-dir", tmp_path, "--on-bad-sample", "skip"]])
    err = caplog.text
    assert code == 0, capsys.readouterr().err[-2000:]
    assert "train: skipping 1 unusable documents of 32 (first, document 3: image (embedded bytes) is empty" in err
    assert "train: 31 documents" in err
    assert "left out 1 unusable documents (train: 1)" in err.strip().splitlines()[-1]
    assert (tmp_path / "student_model.pth").exists()
