"""--kd-terms simkd for text recognition (ctc_simkd): the teacher head read from the ONNX file gives the teacher's
probabilities, the term against a written-out formula, projector trained and teacher head frozen, the cache key,
the refusals, and a main.py train -> eval -> predict (teacher gone) -> export run with the tiny ONNX teacher."""
import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from textrec import crnn  # noqa: E402
from textrec import ctc_kd  # noqa: E402
from textrec import simkd as ctc_simkd  # noqa: E402
from textrec import teachers as ocr_teacher  # noqa: E402
from textrec import data as textrec  # noqa: E402
from config import UserError, parse_config  # noqa: E402
import registry  # noqa: E402
import test_text_recognition  # noqa: E402
from test_text_recognition import make_batch, tiny_onnx_teacher  # noqa: E402

word_crops = test_text_recognition.word_crops  # the fixture: rendered words, train/validation/test


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: tiny models


@pytest.fixture
def tiny_teacher(tmp_path):
    return ocr_teacher.OnnxRecognizer(tiny_onnx_teacher(str(tmp_path / "tiny_rec.onnx")), threads=1)


def simkd_student(teacher, size="micro"):
    torch.manual_seed(0)
    return ctc_simkd.attach(crnn.build(textrec.STUDENT_CHARS, 32, size), teacher)


# ------------------------------------------------------------------------------------------- the teacher head

def test_teacher_head_read_from_tiny_graph(tiny_teacher):
    """The tiny teacher's MatMul weight and Add bias, as nn.Linear stores them; the student's head reproduces the
    teacher's folded log-probabilities when its projector is the identity."""
    import onnx
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in tiny_teacher._model.graph.initializer}
    weight, bias = ctc_simkd.teacher_head(tiny_teacher._model.graph)
    np.testing.assert_array_equal(weight.numpy(), weights["w"].T)
    np.testing.assert_array_equal(bias.numpy(), weights["b"])
    student = simkd_student(tiny_teacher)
    head = ctc_simkd.CTCSimKDHead({**student.config.simkd_head, "student_width": 3})
    head.load_state_dict({k: v for k, v in student.head.state_dict().items() if "projector" not in k}, strict=False)
    with torch.no_grad():
        head.projector.weight.copy_(torch.eye(3))
        head.projector.bias.zero_()
    pixels = torch.rand(2, 3, 48, 320) * 2 - 1
    out = tiny_teacher.features(pixels, [320, 320])
    torch.testing.assert_close(head(out["encoder"]), out["logits"], atol=1e-5, rtol=1e-5)


def test_teacher_head_reproduces_ppocrv4_probabilities():
    """PP-OCRv4's head (linear_85: 120 -> 6625) run in torch on its own encoder features gives its probabilities."""
    pytest.importorskip("rapidocr_onnxruntime")
    teacher = ocr_teacher.OnnxRecognizer("ppocrv4", threads=1)
    weight, bias = ctc_simkd.teacher_head(teacher._model.graph)
    assert weight.shape == (6625, 120) and bias.shape == (6625,)
    pixels = torch.rand(2, 3, 48, 320) * 2 - 1
    out = teacher.features(pixels, [320, 320])
    probs = torch.softmax(out["encoder"] @ weight.T + bias, -1)
    np.testing.assert_allclose(probs.numpy(), teacher.probs(pixels.numpy()), atol=1e-6)
    student = simkd_student(teacher)  # grows by the teacher's head: 120 x 6625 + 6625 frozen parameters
    assert sum(p.numel() for p in student.head.teacher_head.parameters()) == 801_625
    assert student.head.projector.weight.shape == (120, 2 * student.config.hidden)


# ------------------------------------------------------------------------------------------------- the term

def test_simkd_term_against_formula(tiny_teacher):
    torch.manual_seed(1)
    student = simkd_student(tiny_teacher)
    pixels = torch.rand(3, 1, 32, 28) * 2 - 1  # 7 steps
    out = student(pixels, features=True)
    assert set(out) == {"logits", "backbone", "encoder", "projected"}
    # the logits: log of the teacher head's probabilities on the projected features, folded onto the student charset
    fold = torch.tensor(ocr_teacher.fold_matrix(tiny_teacher.classes))
    z = out["encoder"] @ student.head.projector.weight.T + student.head.projector.bias
    layer = student.head.teacher_head[0]
    expected = (torch.softmax(z @ layer.weight.T + layer.bias, -1) @ fold).clamp_min(1e-12).log()  # as the teacher's
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["projected"], z)
    torch.testing.assert_close(out["logits"].exp().sum(-1), torch.ones(3, 7))
    torch.testing.assert_close(F.log_softmax(out["logits"], -1), out["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_teacher.fold, fold)

    batch = make_batch([7, 5, 3], [[1, 2], [3], []], steps=7, classes=out["logits"].shape[-1])
    teacher = {"logits": F.log_softmax(torch.randn(3, 7, out["logits"].shape[-1]), -1),
               "backbone": torch.randn(3, 7, 3), "encoder": torch.randn(3, 7, 3) * 5}
    loss = ctc_kd.CTCDistillationLoss(0.6, 2.0, ["simkd"], 0.1, True, feature_weight=0.3)
    got = loss(out, teacher, batch)
    mask = batch["step_mask"]
    squared = ((z - teacher["encoder"]) ** 2).sum(-1)  # raw, not standardised
    by_hand = (squared * mask).sum() / (mask.sum() * 3)
    torch.testing.assert_close(got["simkd"], by_hand)
    torch.testing.assert_close(got["total"], 0.4 * got["ctc"] + 0.6 * 0.3 * by_hand)
    # teacher features on twice the steps: averaged over pairs of steps first
    double = torch.randn(3, 14, 3)
    pooled = double.reshape(3, 7, 2, 3).mean(2)
    got = loss(out, {**teacher, "encoder": double}, batch)
    torch.testing.assert_close(got["simkd"], (((z - pooled) ** 2).sum(-1) * mask).sum() / (mask.sum() * 3))


def test_projector_trained_teacher_head_frozen(tiny_teacher):
    import train
    student = simkd_student(tiny_teacher)
    cfg = parse_config(["--task", "text-recognition", "--lr", "1e-2", "--weight-decay", "0.1"])
    loss = ctc_kd.CTCDistillationLoss(0.5, 1.0, ["kl", "simkd"], 0.1, True)
    optimizer = train.make_optimizer(cfg, student, loss)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    head = student.head
    assert all(id(p) in in_optimizer and p.requires_grad for p in head.projector.parameters())
    assert not any(id(p) in in_optimizer or p.requires_grad for p in head.teacher_head.parameters())
    before = copy.deepcopy(head.state_dict())
    pixels = torch.rand(3, 1, 32, 28) * 2 - 1
    batch = make_batch([7, 5, 3], [[1, 2], [3], []], steps=7, classes=len(textrec.STUDENT_CHARS) + 1)
    teacher = {"logits": F.log_softmax(torch.randn(3, 7, len(textrec.STUDENT_CHARS) + 1), -1),
               "backbone": torch.randn(3, 7, 3), "encoder": torch.randn(3, 7, 3)}
    loss(student(pixels, features=True), teacher, batch)["total"].backward()
    optimizer.step()
    after = head.state_dict()
    assert not torch.equal(after["projector.weight"], before["projector.weight"])
    for k in ("teacher_head.0.weight", "teacher_head.0.bias"):
        assert torch.equal(after[k], before[k]), k


# ------------------------------------------------------------------------------------------- main.py end to end

def crops_dir(root):
    root.mkdir()
    for k, word in enumerate(["total", "A-12", "x"]):
        image = Image.new("RGB", (16 + 9 * len(word), 24), "white")
        ImageDraw.Draw(image).text((6, 6), word, fill="black")
        image.save(root / f"{k}.png")
    return root


def test_cache_key_and_refusals(word_crops, tmp_path):
    import train
    from registry import build_task
    teacher = tiny_onnx_teacher(str(tmp_path / "tiny_rec.onnx"))
    common = ["--mode", "train", "--task", "text-recognition", "--dataset", word_crops,
              "--cache-dir", str(tmp_path / "cache"), "--max-samples", "4", "--student-size", "micro"]
    keys = {}
    for terms in ("kl", "simkd", "kl,simkd"):
        cfg = parse_config([*common, "--teacher", teacher, "--kd-terms", terms])
        task = build_task(cfg)
        keys[terms] = train.cache_extra(cfg, task, task.teacher)
        assert isinstance(task.student.head, ctc_simkd.CTCSimKDHead) == ("simkd" in terms)
    assert keys["kl"] != keys["simkd"] == keys["kl,simkd"]  # the features are stored with simkd
    transcripts = tmp_path / "t.jsonl"
    transcripts.write_text('{"key": "x", "text": "x"}\n')
    with pytest.raises(UserError, match="simkd needs the teacher's features: an ONNX recogniser"):
        build_task(parse_config([*common, "--kd-terms", "simkd", "--teacher", str(transcripts)]))
    with pytest.raises(UserError, match="subset of"):
        parse_config([*common, "--teacher", teacher, "--kd-terms", "attention"])


def test_train_eval_predict_export_without_teacher(word_crops, tmp_path, monkeypatch):
    """A simkd run (1 epoch) saves the student with its projector and the teacher's head; with the teacher gone,
    the saved student loads, predicts and exports, and gives the in-memory student's outputs."""
    import main
    from textrec import task as textrec_task
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    teacher = tiny_onnx_teacher(str(tmp_path / "tiny_rec.onnx"))
    out = tmp_path / "run"
    common = ["--task", "text-recognition", "--teacher", teacher, "--dataset", word_crops, "--output-dir", str(out),
              "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--lr", "1e-3", "--alpha", "0.5",
              "--kd-terms", "kl,simkd", "--degrade-height", "12", "--max-samples", "8", "--student-size", "micro"]
    kept = {}
    save = textrec_task.TextRecognition.save_pretrained

    def keep(self, model, directory, role):
        kept["student"] = copy.deepcopy(model).eval()
        return save(self, model, directory, role)
    with monkeypatch.context() as patch:
        patch.setattr(textrec_task.TextRecognition, "save_pretrained", keep)
        assert main.main(["--mode", "train", "--epochs", "1", *common]) == 0
    rows = [json.loads(line) for line in open(out / "student_metrics.jsonl")]
    assert {"train_ctc", "train_kl", "train_simkd"} <= set(rows[0])
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["simkd_head"]["teacher_head"] == [["linear", 3, 30]] and len(config["simkd_head"]["fold"]) == 30
    assert main.main(["--mode", "eval", "--eval-split", "test", *common]) == 0
    assert json.loads((out / "eval.json").read_text())["crops"] == 4

    os.remove(teacher)  # from here on, no teacher
    memory = kept["student"]
    crops = crops_dir(tmp_path / "crops")
    pixels = torch.rand(2, 1, 32, 40) * 2 - 1
    for path in (out / "student_model.pth", out / "student"):
        loaded = registry.load_student(str(path)).eval()
        assert isinstance(loaded.head, ctc_simkd.CTCSimKDHead)
        with torch.no_grad():
            assert torch.equal(loaded(pixels), memory(pixels))
    assert main.main(["--mode", "predict", "--model", str(out / "student_model.pth"), "--input", str(crops),
                      "--output-dir", str(tmp_path / "predict"), "--cache-dir", str(tmp_path / "cache"),
                      "--batch-size", "8"]) == 0
    texts = [json.loads(line)["text"] for line in open(tmp_path / "predict" / "predictions.jsonl")]
    assert texts == in_memory_texts(memory, crops)
    assert main.main(["--mode", "export", "--model", str(out / "student"), "--input", str(crops),
                      "--output-dir", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "onnx" / "export.json").read_text())
    assert report["float32"]["max_abs_difference"] <= 1e-3


def in_memory_texts(model, crops):
    """The in-memory student's transcripts of the crops (one batch), prepared as --mode predict prepares them."""
    import config
    from textrec import pages
    items = []
    for name in sorted(os.listdir(crops)):
        with Image.open(crops / name) as image:
            items.append(pages.crop_item(image.convert("RGB"), model.config.height,
                                         config.defaults()["max_text_width"]))
    with torch.no_grad():
        logits = model(pages.crop_batch(items, model.config.height)).numpy()
    return [row["text"] for row in pages.crop_readings(logits, items, model.config.chars)]
