"""Putting the student to work: eval on a subset of its classes, predict on files, ONNX export, the model card,
and the module layout (main only dispatches; bench does not import main)."""
import json
import os
import shutil
import subprocess
import sys

import datasets
import pytest

from conftest import ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import main  # noqa: E402  (commands run in this process: the CLI's code path without paying for imports each time)

FAST = ["--preset", "demo", "--max-length", "64", "--batch-size", "8", "--student-image-size", "64"]
HAS_TESSERACT = shutil.which("tesseract") is not None


class Done:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture
def cli(capsys):
    """cli(*flags) -> the exit code, stdout and stderr of `main.py flags`, run in this process."""
    def run(*args):
        code = main.main([str(a) for a in args])
        captured = capsys.readouterr()
        return Done(code, captured.out, captured.err)
    return run


@pytest.fixture(scope="module")
def student(tiny_demo, tmp_path_factory):
    """One tiny student trained for one epoch on the 16-class tiny corpus (alpha 0: no teacher needed)."""
    root = tmp_path_factory.mktemp("predict")
    common = FAST + ["--dataset", tiny_demo, "--cache-dir", root / "cache"]
    assert main.main([str(a) for a in ["--mode", "train", *common, "--epochs", "1", "--alpha", "0",
                                        "--output-dir", root / "s"]]) == 0
    card = open(root / "s" / "student" / "README.md").read()  # written by training, before any eval
    assert "library_name: transformers" in card and "Not evaluated on a test split yet" in card
    return root, common


def subset_corpus(tiny_demo, path, keep, rename=None):
    """The tiny corpus with only the classes in `keep` (ClassLabel names in that order), optionally renamed."""
    original = datasets.load_from_disk(tiny_demo)
    names = [(rename or {}).get(n, n) for n in keep]
    out = {}
    for split, data in original.items():
        data = data.filter(lambda row: row["category"] in keep, keep_in_memory=True)
        data = data.map(lambda row: {"label": keep.index(row["category"]),
                                     "category": (rename or {}).get(row["category"], row["category"])},
                        keep_in_memory=True)
        out[split] = data.cast_column("label", datasets.ClassLabel(names=names))
    datasets.DatasetDict(out).save_to_disk(str(path))
    return str(path)


def test_eval_on_a_subset_of_the_classes(student, cli, tiny_demo, tmp_path):
    root, common = student
    all_names = json.load(open(root / "s" / "student" / "config.json"))["id2label"]
    keep = [all_names[str(i)] for i in (9, 3, 0, 5, 12, 1, 7, 14, 2, 10)]  # 10 of 16, in another order
    data = subset_corpus(tiny_demo, tmp_path / "subset", keep)
    args = [*common, "--dataset", data, "--model", root / "s" / "student_model.pth", "--eval-split", "test",
            "--output-dir", tmp_path / "eval"]
    done = cli("--mode", "eval", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.load(open(tmp_path / "eval" / "eval.json"))
    assert scores["documents"] == 10
    assert set(scores["per_class"]) == set(keep)  # scores over the classes present
    assert len(scores["confusion_matrix"]) == 16 and sum(map(sum, scores["confusion_matrix"])) == 10
    assert scores["classes"]["in_data"] == 10 and len(scores["classes"]["not_in_data"]) == 6
    # the student's model card now carries these test scores, next to its training settings
    card = open(root / "s" / "student" / "README.md").read()
    assert card.startswith("---\nlibrary_name: transformers\n") and "knowledge-distillation" in card
    assert f"| accuracy | {scores['accuracy']:.4f} | {scores['teacher_accuracy']:.4f} |" in card
    assert f"value: {scores['accuracy']:.4f}" in card and "alpha 0.0" in card and "10 of the 16 classes" in card
    best = max(json.loads(line)["val_accuracy"] for line in open(root / "s" / "student_metrics.jsonl"))
    assert f"| best validation accuracy | {best:.4f}" in card
    # a class the student does not know is refused by name
    unknown = subset_corpus(tiny_demo, tmp_path / "unknown", keep, rename={keep[0]: "postcard"})
    refused = cli("--mode", "eval", *[unknown if a == data else a for a in args])
    assert refused.returncode == 2 and "'postcard'" in refused.stderr and "Traceback" not in refused.stderr


def test_bench_does_not_import_main():
    code = "import main; from modes import bench, evaluate, training, predict, export; import sys; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    for name in ("modes/bench.py", "modes/evaluate.py", "modes/training.py", "modes/predict.py", "modes/export.py",
                 "modes/model_card.py"):
        source = open(os.path.join(ROOT, name)).read()
        assert "from main import" not in source and "import main" not in source, name


@pytest.fixture(scope="module")
def scans(tiny_demo, tmp_path_factory):
    """A folder of inputs: a png, a 2-page tif, a 2-page pdf (in a sub-folder), a corrupt png and a text file."""
    from PIL import Image
    pages = [Image.open(__import__("io").BytesIO(row["image"]["bytes"])).convert("RGB")
             for row in datasets.load_from_disk(tiny_demo)["test"].cast_column(
                 "image", datasets.Image(decode=False)).select(range(3))]
    folder = tmp_path_factory.mktemp("scans")
    pages[0].save(folder / "one.png")
    pages[1].save(folder / "two.tif", save_all=True, append_images=[pages[2]])
    (folder / "sub").mkdir()
    pages[2].save(folder / "sub" / "three.pdf", save_all=True, append_images=[pages[0]], resolution=100)
    (folder / "broken.png").write_bytes(open(folder / "one.png", "rb").read()[:200])
    (folder / "notes.txt").write_text("not a scan\n")
    return folder


def rows_of(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.skipif(not HAS_TESSERACT, reason="tesseract not installed")
def test_predict_on_a_folder_of_scans_and_pdfs(student, cli, scans, tmp_path):
    root, common = student
    done = cli("--mode", "predict", *common, "--model", root / "s" / "student", "--input", scans,
                    "--output-dir", tmp_path / "p", "--top-k", "2", "--pdf-dpi", "100")
    assert done.returncode == 1, done.stderr[-3000:]  # some files failed, the rest were predicted
    failed = [line for line in done.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and any("broken.png" in f for f in failed) and any("notes.txt" in f for f in failed)
    rows = rows_of(tmp_path / "p" / "predictions.jsonl")
    assert [(os.path.relpath(r["file"], scans), r["page"]) for r in rows] == [
        ("one.png", 1), ("sub/three.pdf", 1), ("sub/three.pdf", 2), ("two.tif", 1), ("two.tif", 2)]
    names = set(json.load(open(root / "s" / "student" / "config.json"))["label2id"])
    for row in rows:
        assert row["label"] in names and len(row["top_k"]) == 2 and row["top_k"][0]["label"] == row["label"]
        assert 0 < row["top_k"][1]["probability"] <= row["probability"] <= 1 and row["words"] > 0
    assert rows[3]["words"] > 0
    csv_lines = open(tmp_path / "p" / "predictions.csv").read().splitlines()
    assert csv_lines[0] == "file,page,label,probability,top_k" and len(csv_lines) == 6
    summary = json.load(open(tmp_path / "p" / "predict_summary.json"))
    assert summary["pages"] == 5 and summary["failed"] == 2 and summary["seconds"]["ocr"] > 0
    # only readable files: exit code 0; nothing to read: bad usage, 2
    good = cli("--mode", "predict", *common, "--model", root / "s" / "student_model.pth",
                    "--input", scans / "one.png", str(scans / "sub" / "*.pdf"), "--output-dir", tmp_path / "q")
    assert good.returncode == 0, good.stderr[-3000:]
    assert [r["label"] for r in rows_of(tmp_path / "q" / "predictions.jsonl")][0] == rows[0]["label"]
    bad = cli("--mode", "predict", *common, "--model", root / "s" / "student", "--input", tmp_path / "nope",
                   "--output-dir", tmp_path / "r")
    assert bad.returncode == 2 and "error: " in bad.stderr


def test_onnx_export_matches_pytorch_and_int8_runs(student, cli, scans, tmp_path):
    root, common = student
    done = cli("--mode", "export", *common, "--model", root / "s" / "student", "--eval-split", "test",
                    "--output-dir", root / "s")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.load(open(root / "s" / "onnx" / "export.json"))
    assert report["float32"]["max_abs_difference"] <= report["tolerance"] == 1e-3
    assert report["documents_checked"] == 8 and report["float32"]["top1_agreement"] == 1.0
    assert report["int8"]["size_mb"] < report["float32"]["size_mb"]
    assert "max abs difference to PyTorch" in done.stdout
    for name in ("model.onnx", "model.int8.onnx", "config.json", "tokenizer_config.json",
                 "preprocessor_config.json"):
        assert (root / "s" / "onnx" / name).exists(), name
    if HAS_TESSERACT:  # predict runs the ONNX files and agrees with PyTorch's label
        torch_rows = cli("--mode", "predict", *common, "--model", root / "s" / "student", "--input",
                              scans / "two.tif", "--output-dir", tmp_path / "pt")
        assert torch_rows.returncode == 0, torch_rows.stderr[-3000:]
        for name in ("model.onnx", "model.int8.onnx"):
            onnx_rows = cli("--mode", "predict", *common, "--model", root / "s" / "onnx" / name, "--input",
                                 scans / "two.tif", "--output-dir", tmp_path / name)
            assert onnx_rows.returncode == 0, onnx_rows.stderr[-3000:]
            assert len(rows_of(tmp_path / name / "predictions.jsonl")) == 2
        expected = rows_of(tmp_path / "pt" / "predictions.jsonl")
        got = rows_of(tmp_path / "model.onnx" / "predictions.jsonl")
        assert [r["label"] for r in got] == [r["label"] for r in expected]
        assert abs(got[0]["probability"] - expected[0]["probability"]) < 1e-4


def test_bench_has_onnxruntime_rows(student, cli, tmp_path):
    root, common = student
    done = cli("--mode", "bench", *common, "--model", root / "s" / "student_model.pth", "--eval-split", "test",
               "--output-dir", tmp_path / "b")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["model"]: r for r in json.load(open(tmp_path / "b" / "bench.json"))["rows"]}
    assert {"student onnxruntime fp32", "student onnxruntime int8"} <= set(rows)
    ort, torch_row = rows["student onnxruntime fp32"], rows["student fp32"]
    assert ort["accuracy"] == pytest.approx(torch_row["accuracy"])  # the same model, another runtime
    assert rows["student onnxruntime int8"]["size_mb"] < ort["size_mb"] and ort["latency_ms_p50"] > 0
    assert "student onnxruntime int8" in done.stdout


def test_group_entities_from_bio_tags():
    from modes import predict
    words = [{"text": t, "box": [i * 10, 0, i * 10 + 8, 5], "tag": g} for i, (t, g) in enumerate(
        [("Date:", "B-QUESTION"), ("12/05", "B-ANSWER"), ("1996", "I-ANSWER"), ("x", "O"), ("Name", "I-QUESTION"),
         ("Bob", "I-ANSWER"), ("Lee", "I-ANSWER"), ("cut", None)])]
    entities = predict.group_entities(words)
    assert [(e["type"], e["text"], e["words"]) for e in entities] == [
        ("QUESTION", "Date:", [0]), ("ANSWER", "12/05 1996", [1, 2]), ("QUESTION", "Name", [4]),
        ("ANSWER", "Bob Lee", [5, 6])]
    assert entities[1]["box"] == [10, 0, 28, 5]


@pytest.mark.skipif(not HAS_TESSERACT, reason="tesseract not installed")
def test_word_tagging_student_predicts_and_exports(cli, scans, tmp_path):
    """A (random) DistilBERT word tagger: predict gives tagged words and entities; its ONNX export matches."""
    from transformers import DistilBertConfig, DistilBertForTokenClassification, DistilBertTokenizerFast
    import wordtags
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789") + \
        ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = DistilBertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    config = DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=len(vocab),
                              id2label=dict(enumerate(wordtags.FUNSD_TAGS)),
                              label2id={t: i for i, t in enumerate(wordtags.FUNSD_TAGS)})
    model = DistilBertForTokenClassification(config)
    model.save_pretrained(tmp_path / "run" / "student")
    tokenizer.save_pretrained(tmp_path / "run" / "student")
    common = ["--cache-dir", tmp_path / "cache", "--max-length", "128"]
    done = cli("--mode", "predict", *common, "--model", tmp_path / "run" / "student", "--input", scans / "one.png",
               "--output-dir", tmp_path / "p")
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = rows_of(tmp_path / "p" / "predictions.jsonl")
    assert row["page"] == 1 and len(row["words"]) > 0 and not (tmp_path / "p" / "predictions.csv").exists()
    tagged = [w for w in row["words"] if w["tag"] is not None]
    assert tagged and all(w["tag"] in wordtags.FUNSD_TAGS and len(w["box"]) == 4 for w in tagged)
    assert row["untagged_words"] == len(row["words"]) - len(tagged)  # beyond 128 tokens
    for entity in row["entities"]:
        assert entity["text"] == " ".join(row["words"][k]["text"] for k in entity["words"])
    exported = cli("--mode", "export", *common, "--model", tmp_path / "run" / "student", "--input", scans,
                   "--output-dir", tmp_path / "run")
    assert exported.returncode == 0, exported.stderr[-3000:]
    report = json.load(open(tmp_path / "run" / "onnx" / "export.json"))
    assert report["inputs"] == ["input_ids", "attention_mask"] and report["float32"]["max_abs_difference"] <= 1e-3
    again = cli("--mode", "predict", *common, "--model", tmp_path / "run" / "onnx" / "model.onnx", "--input",
                scans / "one.png", "--output-dir", tmp_path / "q")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [w["tag"] for w in rows_of(tmp_path / "q" / "predictions.jsonl")[0]["words"]] == \
        [w["tag"] for w in row["words"]]
