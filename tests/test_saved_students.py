"""Saved students of every task, in both forms (student_model.pth and the student/ directory), are read by the one
loader (registry.load_student), which verifies their checksums: a flipped byte is refused in one line; eval and
bench refuse a corrupted text-recognition student as they refuse a page student."""
import json

import pytest
import torch
from transformers import (DistilBertConfig, DistilBertForTokenClassification, LayoutLMv3Config,
                          LayoutLMv3ForSequenceClassification)

import main
import models
import registry
import saved
from config import UserError
from test_reliability import flip_bytes_of
from test_text_recognition import tiny_onnx_teacher, word_crops  # noqa: F401 (word_crops: a fixture)
from textrec import crnn
from textrec import data as textrec


class Stub:
    """The one hook save_best asks of a task."""
    @staticmethod
    def save_pretrained(model, directory, role):
        model.save_pretrained(directory)


def page_student():
    config = LayoutLMv3Config(**models.STUDENT_SIZES["micro"]["layoutlmv3"], vocab_size=60, input_size=32,
                              max_position_embeddings=66, id2label={0: "letter", 1: "memo"},
                              label2id={"letter": 0, "memo": 1})
    return LayoutLMv3ForSequenceClassification(config)


def word_student():
    config = DistilBertConfig(**models.STUDENT_SIZES["micro"]["distilbert"], vocab_size=60,
                              id2label={0: "O", 1: "B-HEADER"}, label2id={"O": 0, "B-HEADER": 1})
    return DistilBertForTokenClassification(config)


def crnn_student():
    return crnn.build(textrec.STUDENT_CHARS, 32, "micro")


STUDENTS = {"page": (page_student, "classifier.out_proj.weight"), "word": (word_student, "classifier.weight"),
            "text": (crnn_student, "head.weight")}


@pytest.mark.parametrize("kind", STUDENTS)
def test_both_forms_load_and_a_flipped_byte_in_either_is_refused(kind, tmp_path):
    build, tensor = STUDENTS[kind]
    torch.manual_seed(0)
    student = build().eval()
    saved.save_best(Stub, student, str(tmp_path), "student")
    pth, directory = tmp_path / "student_model.pth", tmp_path / "student"
    assert json.load(open(directory / saved.CHECKSUMS))["sha256"].keys() == {"model.safetensors"}
    for path in (pth, directory):  # intact: the same weights as the model that was saved
        loaded = registry.load_student(str(path))
        assert all(torch.equal(v, student.state_dict()[k]) for k, v in loaded.state_dict().items()), path

    weights = student.state_dict()[tensor].contiguous()
    flip_bytes_of(directory / "model.safetensors", weights)
    with pytest.raises(UserError, match=f"^{directory / 'model.safetensors'} is corrupt: its bytes do not match"):
        registry.load_student(str(directory))
    flip_bytes_of(pth, weights)
    with pytest.raises(UserError, match=f"^{pth} is corrupt: its tensors do not match the checksum"):
        registry.load_student(str(pth))


def test_eval_and_bench_refuse_a_corrupt_text_recognition_student(word_crops, tmp_path, capsys):  # noqa: F811
    teacher = tiny_onnx_teacher(str(tmp_path / "tiny_rec.onnx"))
    student = crnn_student()
    saved.save_best(Stub, student, str(tmp_path / "run"), "student")
    pth = tmp_path / "run" / "student_model.pth"
    flip_bytes_of(pth, student.state_dict()["head.weight"].contiguous())
    common = ["--task", "text-recognition", "--dataset", word_crops, "--teacher", teacher, "--model", str(pth),
              "--cache-dir", str(tmp_path / "cache"), "--student-size", "micro"]
    for mode in ("eval", "bench"):
        capsys.readouterr()
        assert main.main(["--mode", mode, *common, "--output-dir", str(tmp_path / mode)]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of the data it read
        assert error.startswith(f"error: {pth} is corrupt: its tensors do not match the checksum"), error
        assert not (tmp_path / mode).exists()  # nothing written
