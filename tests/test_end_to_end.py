"""Real `main.py` commands on a tiny generated corpus: teacher -> distil -> resume -> eval -> info."""
import json

import pytest
import torch

from conftest import run_main

FAST = ["--preset", "demo", "--max-length", "64", "--batch-size", "8", "--student-image-size", "64"]


@pytest.fixture(scope="module")
def trained(tiny_demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    common = FAST + ["--dataset", tiny_demo, "--cache-dir", root / "cache"]
    teacher = run_main("--mode", "teacher", *common, "--epochs", "1", "--output-dir", root / "t")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    student = run_main("--mode", "train", *common, "--epochs", "2", "--teacher", root / "t" / "teacher",
                       "--output-dir", root / "s")
    assert student.returncode == 0, student.stderr[-3000:]
    return root, common, student


def test_training_writes_every_artefact(trained):
    root, _, _ = trained
    out = root / "s"
    for name in ("latest_checkpoint.pth", "student_model.pth", "student_metrics.jsonl", "student_curves.png",
                 "train_config.json", "student/config.json", "student/model.safetensors",
                 "student/tokenizer_config.json", "student/preprocessor_config.json"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in open(out / "student_metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["train_loss"] > 0 and r["train_kd"] > 0
    assert json.load(open(out / "train_config.json"))["alpha"] == 0.7
    assert (root / "t" / "teacher" / "model.safetensors").exists()


def test_training_reports_truncation(trained):
    _, _, student = trained
    assert "truncated at 64 tokens" in student.stderr


def test_saved_student_loads_with_plain_transformers(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    root, _, _ = trained
    model = AutoModelForSequenceClassification.from_pretrained(root / "s" / "student")
    tokenizer = AutoTokenizer.from_pretrained(root / "s" / "student")
    assert model.config.hidden_size == 256 and model.config.num_hidden_layers == 4
    assert model.config.id2label[0] == "letter" and len(tokenizer) == model.config.vocab_size


def test_resume_from_checkpoint_continues_and_keeps_history(trained):
    root, common, _ = trained
    ckpt = torch.load(root / "s" / "latest_checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and {"model", "optimizer", "scheduler", "rng"} <= set(ckpt)
    resumed = run_main("--mode", "train", *common, "--epochs", "2", "--teacher", root / "t" / "teacher",
                       "--output-dir", root / "s", "--checkpoint", root / "s" / "latest_checkpoint.pth")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert len(open(root / "s" / "student_metrics.jsonl").readlines()) == 2


def test_resume_with_other_settings_names_them(trained):
    root, common, _ = trained
    bad = run_main("--mode", "train", *common, "--epochs", "2", "--teacher", root / "t" / "teacher",
                   "--output-dir", root / "s", "--checkpoint", root / "s" / "latest_checkpoint.pth", "--lr", "0.1")
    assert bad.returncode == 2
    assert "lr" in bad.stderr and "Traceback" not in bad.stderr


def test_eval_writes_sane_metrics_and_plot(trained):
    root, common, _ = trained
    result = run_main("--mode", "eval", *common, "--teacher", root / "t" / "teacher", "--output-dir", root / "s",
                      "--eval-split", "test")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.load(open(root / "s" / "eval.json"))
    assert scores["documents"] == 16
    for key in ("accuracy", "macro_f1", "teacher_agreement", "teacher_accuracy"):
        assert 0.0 <= scores[key] <= 1.0
    assert set(scores["per_class"]) == set(json.load(open(root / "s" / "student" / "config.json"))["label2id"])
    assert sum(map(sum, scores["confusion_matrix"])) == 16
    assert (root / "s" / "confusion_matrix.png").stat().st_size > 1000


def test_info_describes_data_and_models(trained):
    root, common, _ = trained
    info = run_main("--mode", "info", *common, "--teacher", root / "t" / "teacher", "--output-dir", root / "s")
    assert info.returncode == 0, info.stderr[-3000:]
    for text in ("truncated_share", "class_counts", "words_per_document", "teacher: BeitForImageClassification",
                 "student: LayoutLMv3ForSequenceClassification", "parameter ratio", "sample 0"):
        assert text in info.stdout, text


def test_eval_reads_the_student_with_its_own_settings(trained, tmp_path):
    """Reliability III, 11: without the flags it was trained with (the demo preset's 112-px page and 512 tokens
    would misread it), eval takes them from the run's train_config.json and student/; a flag that contradicts them
    is refused in one line."""
    root, _, _ = trained
    model = root / "s" / "student_model.pth"
    plain = ["--preset", "demo", "--dataset", tiny_demo_of(trained), "--cache-dir", root / "cache", "--model", model,
             "--eval-split", "test"]
    result = run_main("--mode", "eval", *plain, "--output-dir", tmp_path / "e")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(tmp_path / "e" / "eval.json"))["documents"] == 16
    refused = run_main("--mode", "eval", *plain, "--student-image-size", "112", "--output-dir", tmp_path / "r")
    assert refused.returncode == 2 and "--student-image-size 112 contradicts the 64 the student was trained with" \
        in refused.stderr.strip().splitlines()[-1]


def tiny_demo_of(trained):
    _, common, _ = trained
    return common[common.index("--dataset") + 1]
