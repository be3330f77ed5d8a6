"""Text recognition: CTC decoding, charset folding, time alignment, each loss term against an independent formula,
deterministic degradation, the PP-OCRv4 teacher's preprocessing on real FUNSD crops, and a main.py run
teacher -> distil -> resume -> eval -> info with a tiny ONNX teacher built here."""
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from conftest import ROOT, SHARED, TIMING, run_main

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from textrec import ctc_kd  # noqa: E402
from textrec import teachers as ocr_teacher  # noqa: E402
from textrec import data as textrec  # noqa: E402
import registry  # noqa: E402

FUNSD = os.path.join(os.environ.get("DOCDISTILL_SHARED", SHARED), "data", "funsd", "dataset")


# ------------------------------------------------------------------------------------ charset, decoding

def test_ctc_greedy_collapses_repeats_then_drops_blanks():
    assert textrec.ctc_greedy([0, 1, 1, 0, 1, 2, 2, 0, 0, 3]) == [1, 1, 2, 3]
    assert textrec.ctc_greedy([5, 5, 5], length=2) == [5]
    assert textrec.ctc_greedy([0, 0]) == []
    assert textrec.decode(textrec.encode("Hello, World 42!")) == "Hello, World 42!"


def test_folding_onto_ascii():
    assert textrec.fold("，：（Ａｂ１）") == ",:(Ab1)"
    assert textrec.fold("café “x” – y…") == 'cafe "x" - y...'
    assert textrec.fold("中文☐") == ""
    assert textrec.fold_char("，") == textrec.STUDENT_CHARS.index(",") + 1
    assert textrec.fold_char("中") == textrec.BLANK and textrec.fold_char("…") == textrec.BLANK


def test_teacher_classes_mapped_onto_student_charset():
    classes = ["<blank>", "a", "Ａ", "A", "中", "，", " "]
    matrix = ocr_teacher.fold_matrix(classes)
    assert matrix.shape == (7, 96) and (matrix.sum(1) == 1).all()
    probs = np.array([0.1, 0.2, 0.15, 0.25, 0.05, 0.2, 0.05], np.float32)
    folded = probs @ matrix
    A, a, comma, space = (textrec.STUDENT_CHARS.index(c) + 1 for c in "Aa, ")
    assert folded[A] == pytest.approx(0.40) and folded[a] == pytest.approx(0.2)
    assert folded[comma] == pytest.approx(0.2) and folded[space] == pytest.approx(0.05)
    assert folded[0] == pytest.approx(0.15)  # blank + the CJK character's mass
    assert folded.sum() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------- alignment, loss

def test_student_and_teacher_share_time_steps():
    from textrec import crnn
    from textrec.task import Collator
    cfg = type("C", (), dict(student_height=32, seed=0, degrade_height=0, degrade_blur=0.0, degrade_noise=0.0,
                             degrade_jpeg=0, augment=False))()
    collate, student = Collator(cfg), crnn.build(textrec.STUDENT_CHARS, 32, "tiny").eval()
    for width in (20, 319, 321, 600):
        image = Image.new("RGB", (width, 48), "white")
        item = {"image": textrec.png(image), "width": width, "labels": [1], "has_label": True, "index": 0,
                "key": "k", "n_tokens": textrec.padded_width(width) // 8}
        batch = collate([item])
        steps = batch["teacher_pixel_values"].shape[-1] // 8
        assert batch["step_mask"].shape[1] == steps == max(40, math.ceil(width / 8))
        with torch.no_grad():
            assert student(batch["pixel_values"]).shape[1] == steps


def test_align_steps_pools_probabilities():
    logp = torch.randn(2, 6, 5).log_softmax(-1)
    pooled = ctc_kd.align_steps(logp, 3).exp()
    expected = (logp.exp()[:, 0::2] + logp.exp()[:, 1::2]) / 2
    torch.testing.assert_close(pooled, expected)
    assert ctc_kd.align_steps(logp, 6) is logp


def ctc_reference(logp, target):
    """-log p(target | logp) by the CTC forward recursion, float64, one crop."""
    ext = [0]
    for c in target:
        ext += [c, 0]
    alpha = np.full(len(ext), -np.inf)
    alpha[0] = logp[0, 0]
    if len(ext) > 1:
        alpha[1] = logp[0, ext[1]]
    for t in range(1, len(logp)):
        new = np.full(len(ext), -np.inf)
        for s in range(len(ext)):
            terms = [alpha[s]] + ([alpha[s - 1]] if s > 0 else [])
            if s > 1 and ext[s] != 0 and ext[s] != ext[s - 2]:
                terms.append(alpha[s - 2])
            new[s] = np.logaddexp.reduce(terms) + logp[t, ext[s]]
        alpha = new
    return -np.logaddexp(alpha[-1], alpha[-2] if len(ext) > 1 else -np.inf)


def make_batch(lengths, targets, steps=7, classes=6):
    mask = torch.arange(steps)[None] < torch.tensor(lengths)[:, None]
    labels = torch.full((len(targets), max(1, max(map(len, targets)))), textrec.IGNORE_INDEX)
    for i, t in enumerate(targets):
        labels[i, :len(t)] = torch.tensor(t)
    return {"step_mask": mask, "labels": labels, "has_label": torch.tensor([len(t) > 0 for t in targets])}


def test_ctc_term_against_forward_recursion():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 6, dtype=torch.float64)
    targets, lengths = [[1, 2, 2], [3], []], [7, 5, 6]  # the third crop is unlabelled
    out = ctc_kd.CTCDistillationLoss(0.0, 1.0, [], 0.1, with_teacher=False)(logits, None, make_batch(lengths, targets))
    logp = logits.log_softmax(-1).numpy()
    expected = np.mean([ctc_reference(logp[i, :lengths[i]], targets[i]) / len(targets[i]) for i in range(2)])
    assert out["ctc"].item() == pytest.approx(expected, rel=1e-5)
    assert out["total"].item() == pytest.approx(expected, rel=1e-5) and set(out) == {"total", "ctc"}


def test_kl_term_against_loop():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 7, 6), torch.randn(2, 7, 6).log_softmax(-1)
    teacher[0, :3, 0] += 5  # some blank-dominated teacher steps
    teacher = teacher.log_softmax(-1)
    batch, T, w_blank = make_batch([7, 4], [[1, 2], [3]]), 2.0, 0.1
    out = ctc_kd.CTCDistillationLoss(0.5, T, ["kl"], w_blank, with_teacher=True)(student, teacher, batch)
    num = den = 0.0
    for i, n in enumerate([7, 4]):
        for t in range(n):
            p = np.exp(teacher[i, t].numpy() / T) / np.exp(teacher[i, t].numpy() / T).sum()
            q = np.exp(student[i, t].numpy() / T) / np.exp(student[i, t].numpy() / T).sum()
            w = w_blank if teacher[i, t].argmax() == 0 else 1.0
            num += w * (p * np.log(p / q)).sum()
            den += w
    assert out["kl"].item() == pytest.approx(T * T * num / den, rel=1e-4)
    assert out["total"].item() == pytest.approx(0.5 * out["ctc"].item() + 0.5 * out["kl"].item(), rel=1e-5)


def test_sequence_kd_is_ctc_on_teacher_transcript():
    torch.manual_seed(2)
    student = torch.randn(2, 7, 6, dtype=torch.float64)
    best = [[0, 2, 2, 0, 3, 3, 4], [1, 0, 1, 0, 0, 5, 5]]  # teacher's best paths: 2 3 4 over 7 steps, 1 1 over 4
    teacher = F.one_hot(torch.tensor(best), 6).double() * 10
    batch = make_batch([7, 4], [[], []])  # unlabelled crops: the teacher alone teaches them
    out = ctc_kd.CTCDistillationLoss(1.0, 1.0, ["seq"], 0.1, with_teacher=True)(student, teacher.log_softmax(-1),
                                                                              batch)
    logp = student.log_softmax(-1).numpy()
    expected = np.mean([ctc_reference(logp[0], [2, 3, 4]) / 3, ctc_reference(logp[1, :4], [1, 1]) / 2])
    assert out["seq"].item() == pytest.approx(expected, rel=1e-5)
    assert out["total"].item() == pytest.approx(expected, rel=1e-5)


def standardised(v):
    """One step's features over their channels: (v - mean) / sqrt(var + 1e-5), numpy float64."""
    return (v - v.mean()) / np.sqrt(v.var() + 1e-5)


def test_feature_terms_against_formula():
    """Each feature term against a per-step loop: teacher at twice the student's steps (pairs averaged), backbone
    through a learned projection (4 -> 7), encoder of equal width (no projection), log(p + 1e-4) for the logits."""
    torch.manual_seed(2)
    B, T, C = 2, 6, 5
    student = {"logits": torch.randn(B, T, C), "backbone": torch.randn(B, T, 4), "encoder": torch.randn(B, T, 3)}
    teacher = {"logits": torch.randn(B, 2 * T, C).log_softmax(-1), "backbone": 3 * torch.randn(B, 2 * T, 7) + 1,
               "encoder": torch.randn(B, 2 * T, 3)}
    batch = make_batch([6, 4], [[1, 2], []], steps=T, classes=C)
    terms = ["feature_backbone", "feature_encoder", "feature_logits"]
    loss = ctc_kd.CTCDistillationLoss(0.5, 2.0, terms, 0.1, True, feature_weight=0.3,
                                      feature_dims={"backbone": (4, 7), "encoder": (3, 3)})
    assert isinstance(loss.projections["encoder"], torch.nn.Identity)
    out = loss(student, teacher, batch)
    W = loss.projections["backbone"].weight.detach().double().numpy()
    bias = loss.projections["backbone"].bias.detach().double().numpy()
    s = {k: v.double().numpy() for k, v in student.items()}
    t = {k: v.double().numpy() for k, v in teacher.items()}
    sums, counts = {k: 0.0 for k in terms}, {k: 0 for k in terms}
    for b, n in enumerate([6, 4]):
        for step in range(n):
            pair = slice(2 * step, 2 * step + 2)
            target = standardised(t["backbone"][b, pair].mean(0))
            sums["feature_backbone"] += ((W @ s["backbone"][b, step] + bias - target) ** 2).sum()
            target = standardised(t["encoder"][b, pair].mean(0))
            sums["feature_encoder"] += ((s["encoder"][b, step] - target) ** 2).sum()
            q = np.exp(t["logits"][b, pair]).mean(0)
            p = np.exp(s["logits"][b, step]) / np.exp(s["logits"][b, step]).sum()
            sums["feature_logits"] += ((np.log(p + 1e-4) - np.log(q + 1e-4)) ** 2).sum()
            for k, width in zip(terms, (7, 3, C)):
                counts[k] += width
    for k in terms:
        assert out[k].item() == pytest.approx(sums[k] / counts[k], rel=1e-5), k
    expected = 0.5 * out["ctc"].item() + 0.5 * 0.3 * sum(sums[k] / counts[k] for k in terms)
    assert out["total"].item() == pytest.approx(expected, rel=1e-5)
    assert set(out) == {"total", "ctc", *terms}
    # the projection learns from the backbone term: it gets a gradient; alpha 0 (no teacher) has no projections
    out["total"].backward()
    assert loss.projections["backbone"].weight.grad.abs().sum() > 0
    assert not list(ctc_kd.CTCDistillationLoss(0.0, 2.0, terms, 0.1, False).parameters())


def test_transcript_teacher_spells_its_transcripts(tmp_path):
    path = tmp_path / "other_engine.jsonl"
    rows = [{"key": "f/1", "text": "Tööl，1"}, {"key": "f/2", "text": ""}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    teacher = ocr_teacher.TranscriptTeacher(str(path))
    logp = teacher.forward_keys(["f/1", "f/2"], 20)
    assert logp.shape == (2, 20, 96)
    paths = ctc_kd.greedy_targets(logp, torch.tensor([20, 20]))[2]
    assert [textrec.decode(p) for p in paths] == ["Tool,1", ""]


# ----------------------------------------------------------------------------------------- degradation

def test_degradation_is_deterministic_per_seed_and_crop():
    image = Image.new("RGB", (120, 48), "white")
    ImageDraw.Draw(image).text((5, 15), "Degrade", fill="black")
    settings = dict(height=12, blur=0.8, noise=12.0, jpeg=30)
    a = np.asarray(textrec.degrade(image, 7, "form/3", **settings))
    assert (a == np.asarray(textrec.degrade(image, 7, "form/3", **settings))).all()
    assert (a != np.asarray(textrec.degrade(image, 7, "form/4", **settings))).any()
    assert (a != np.asarray(textrec.degrade(image, 8, "form/3", **settings))).any()
    assert a.shape == (48, 120)
    clean = np.asarray(textrec.degrade(image, 7, "form/3"))
    assert (clean == np.asarray(image.convert("L"))).all()


# ------------------------------------------------------------------------------ the real PP-OCRv4 teacher

@pytest.mark.skipif(not os.path.isdir(FUNSD), reason="needs ../shared/data/funsd")
def test_ppocrv4_preprocessing_matches_paddleocr_on_funsd_crops():
    pytest.importorskip("rapidocr_onnxruntime")
    from rapidocr_onnxruntime.ch_ppocr_rec.text_recognize import TextRecognizer
    teacher = ocr_teacher.OnnxRecognizer("ppocrv4", threads=1)
    assert len(teacher.classes) == 6625 and teacher.classes[0] == "<blank>" and teacher.classes[-1] == " "
    assert teacher.onnx_parameters == pytest.approx(2.69e6, rel=0.01)
    reference = TextRecognizer({"model_path": ocr_teacher.ppocrv4_path(), "rec_img_shape": [3, 48, 320],
                                "rec_batch_num": 1, "intra_op_num_threads": 1, "inter_op_num_threads": 1})
    rows = textrec.funsd_records(FUNSD)["test"][:6]
    texts = []
    for row in rows:
        crop = textrec.cut(row)
        mine = textrec.teacher_array(textrec.resize_for_teacher(crop, 640))
        bgr = np.asarray(crop)[:, :, ::-1].copy()
        theirs = reference.resize_norm_img(bgr, 320 / 48)  # words narrower than 320 px at height 48
        np.testing.assert_array_equal(theirs[:, :, :mine.shape[2]], mine)
        width = textrec.padded_width(mine.shape[2])
        pixels = np.zeros((1, 3, 48, width), np.float32)
        pixels[0, :, :, :mine.shape[2]] = mine
        probs = teacher.probs(pixels)
        assert probs.shape == (1, width // 8, 6625) and np.allclose(probs.sum(-1), 1, atol=1e-4)
        texts.append(teacher.read(torch.from_numpy(pixels), [width])[0])
        assert texts[-1] == textrec.fold(reference([bgr])[0][0][0])
    truths = [textrec.fold(r["text"]) for r in rows]
    assert sum(t == p for t, p in zip(truths, texts)) >= 4, (truths, texts)


# ------------------------------------------------------------------------------------- main.py end to end

CHARS = "abcdefghijklmnopqrstuvwxyz，中"


def tiny_onnx_teacher(path):
    """x [N, 3, 48, W] -> average over 48 x 8 cells -> linear -> softmax: [N, W / 8, 1 + len(CHARS) + 1]."""
    import onnx
    from onnx import TensorProto, helper
    classes = 1 + len(CHARS) + 1
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 3, (3, classes)).astype(np.float32)
    bias = np.zeros(classes, np.float32)
    bias[0] = 2.0  # mostly blank, as real recognisers are
    nodes = [helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[48, 8], strides=[48, 8]),
             helper.make_node("Squeeze", ["pooled", "axes"], ["seq"]),
             helper.make_node("Transpose", ["seq"], ["steps"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["steps", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=2)]
    graph = helper.make_graph(
        nodes, "tiny_rec", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 48, "w"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", "t", classes])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [2]), onnx.numpy_helper.from_array(weight, "w"),
         onnx.numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, {"character": "\n".join(CHARS)})
    onnx.save(model, path)
    return path


def test_onnx_teacher_exposes_backbone_and_encoder_outputs(tmp_path):
    """The tiny teacher's AveragePool (backbone) and its head's MatMul input (encoder) become outputs: [B, T, 3]
    each, equal to the 48 x 8 cell averages, 0 past a crop's own width; its probabilities are forward()'s."""
    teacher = ocr_teacher.OnnxRecognizer(tiny_onnx_teacher(str(tmp_path / "tiny_rec.onnx")), threads=1)
    pixels = torch.randn(3, 3, 48, 400)
    out = teacher.features(pixels, [320, 400, 320])
    assert teacher.feature_names == {"backbone": "pooled", "encoder": "steps"}
    assert {k: tuple(v.shape) for k, v in out.items()} == {"logits": (3, 50, 96), "backbone": (3, 50, 3),
                                                           "encoder": (3, 50, 3)}
    assert teacher.feature_dims() == {"backbone": 3, "encoder": 3}
    cells = pixels.reshape(3, 3, 48, 50, 8).mean((2, 4)).transpose(1, 2)  # [B, T, 3]
    for k in ("backbone", "encoder"):
        torch.testing.assert_close(out[k][1], cells[1])
        torch.testing.assert_close(out[k][[0, 2], :40], cells[[0, 2], :40])
        assert not out[k][[0, 2], 40:].any()
    torch.testing.assert_close(out["logits"], teacher(pixels, [320, 400, 320]))


def test_ppocrv4_feature_tensors():
    """On PP-OCRv4: the PPLCNetV3 output (480 channels) and the SVTR neck output (120), W / 8 steps each; the
    head's own linear layer and softmax on the encoder tensor give the model's probabilities."""
    pytest.importorskip("rapidocr_onnxruntime")
    import onnx
    teacher = ocr_teacher.OnnxRecognizer("ppocrv4", threads=1)
    pixels = torch.rand(1, 3, 48, 320) * 2 - 1
    out = teacher.features(pixels, [320])
    assert teacher.feature_names == {"backbone": "p2o.AveragePool.1", "encoder": "transpose_51.tmp_0"}
    assert out["backbone"].shape == (1, 40, 480) and out["encoder"].shape == (1, 40, 120)
    graph = onnx.load(ocr_teacher.ppocrv4_path()).graph  # weights are initialisers or Constant nodes
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    weights.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                    if n.op_type == "Constant" and n.attribute[0].name == "value"})
    probs = torch.softmax(out["encoder"][0] @ torch.tensor(weights["linear_85.w_0"])
                          + torch.tensor(weights["linear_85.b_0"]), -1)
    np.testing.assert_allclose(probs.numpy(), teacher.probs(pixels.numpy())[0], atol=1e-5)


@pytest.fixture(scope="module")
def word_crops(tmp_path_factory):
    """Rendered words: train/validation/test JSONL, two training crops without transcript."""
    root = tmp_path_factory.mktemp("crops")
    words = ["form", "date", "total", "name", "Fax", "page", "cost", "A-12", "x", "ok", "tel", "id"]
    for split, chosen in (("train", words), ("validation", words[:4]), ("test", words[4:8])):
        rows = []
        for k, word in enumerate(chosen):
            image = Image.new("RGB", (16 + 9 * len(word), 24), "white")
            ImageDraw.Draw(image).text((6, 6), word, fill="black")
            name = f"{split}-{k}.png"
            image.save(root / name)
            rows.append({"image": name, "text": None if split == "train" and k in (1, 2) else word})
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(root)


def test_main_distil_resume_eval_info(word_crops, tmp_path):
    teacher = tiny_onnx_teacher(str(tmp_path / "tiny_rec.onnx"))
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--task", "text-recognition", "--teacher", teacher, "--dataset", word_crops, "--output-dir", out,
              "--cache-dir", cache, "--batch-size", "4", "--lr", "1e-3", "--alpha", "0.5", "--temperature", "2",
              "--kd-terms", "kl,seq", "--degrade-height", "12", "--degrade-noise", "4", "--save-every", "1"]
    done = run_main("--mode", "train", "--epochs", "2", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "student_metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and {"train_ctc", "train_kl", "train_seq"} <= set(rows[0])
    assert "teacher logits computed once" in done.stderr
    for name in ("student_model.pth", "student/model.safetensors", "student/config.json", "latest_checkpoint.pth"):
        assert (out / name).exists(), name

    # Killed after its first epoch, then resumed: the same metrics as the uninterrupted run (CPU, exact resume).
    killed = tmp_path / "killed"
    args = [a if a != out else killed for a in common]
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--mode", "train", "--epochs", "2",
                                *map(str, args)], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not (killed / "latest_checkpoint.pth").exists():
        time.sleep(0.02)  # --save-every 1: killed a step or so into the first epoch
    process.kill()
    process.wait()
    resumed = run_main("--mode", "train", "--epochs", "2", "--checkpoint", killed / "latest_checkpoint.pth", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "teacher logits reused" in resumed.stderr
    again = [json.loads(line) for line in open(killed / "student_metrics.jsonl")]
    drop = TIMING
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows]

    done = run_main("--mode", "eval", "--eval-split", "test", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["crops"] == 4 and {"cer", "wer", "exact", "exact_nocase"} <= set(result["student"])
    assert result["teacher_parameters"] == 3 * 30 + 30 + 1 and result["student_ms_per_crop"] > 0
    assert (out / "worst_errors.png").stat().st_size > 0
    # eval_predictions.jsonl: one row per crop, whose edits add up to the split's CER (jiwer, in eval.json)
    crops = [json.loads(line) for line in open(out / "eval_predictions.jsonl")]
    assert len(crops) == 4 and all(r["student_edits"] == textrec.char_errors(r["truth"], r["student"]) for r in crops)
    for who, scores in (("student", result["student"]), ("teacher", result["teacher_scores"])):
        edits, chars = sum(r[f"{who}_edits"] for r in crops), sum(len(r["truth"]) for r in crops)
        assert edits / chars == pytest.approx(scores["cer"])
    # the student/ directory (safetensors + JSON config) loads to the same weights as student_model.pth
    from textrec import crnn
    from_dir = crnn.CRNN.from_pretrained(str(out / "student"))
    saved = torch.load(out / "student_model.pth", weights_only=True)
    assert json.loads(saved["config"]) == from_dir.config.to_dict()
    for k, v in from_dir.state_dict().items():
        assert torch.equal(v, saved["state_dict"][k]), k
    assert registry.load_student(str(out / "student")).config.to_dict() == from_dir.config.to_dict()
    info = run_main("--mode", "info", *common)
    assert info.returncode == 0, info.stderr[-3000:]
    assert "OnnxRecognizer" in info.stdout and "CRNN" in info.stdout and '"unlabelled": 2' in info.stdout


def test_feature_kd_trains_projections_checkpoints_and_resumes_them(word_crops, tmp_path, monkeypatch):
    """A --kd-terms feature_* run (in-process main.main, tiny teacher): the projections are in the optimizer and
    the checkpoint; the teacher cache holds the features; stopped by SIGTERM in its second epoch and resumed, the
    run ends with the projections, weights and metrics of the uninterrupted run."""
    import main
    teacher = tiny_onnx_teacher(str(tmp_path / "tiny_rec.onnx"))
    common = ["--mode", "train", "--task", "text-recognition", "--teacher", teacher, "--dataset", word_crops,
              "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--lr", "1e-3", "--epochs", "2",
              "--alpha", "0.5", "--kd-terms", "kl,feature_backbone,feature_encoder,feature_logits",
              "--feature-weight", "0.5", "--degrade-height", "12", "--max-samples", "8",
              "--teacher-top-k", "96"]  # float32, every class: the cached logits equal the live ones
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    threads = torch.get_num_threads()  # one thread (torch and onnxruntime): 5x faster on a busy 2-core machine
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        run_feature_kd_and_resume(main, common, full, stopped, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def run_feature_kd_and_resume(main, common, full, stopped, tmp_path, monkeypatch):
    import signal
    from safetensors.torch import load_file
    import teacher_cache
    from config import parse_config
    from registry import build_task
    from textrec.task import TextRecognition
    assert main.main([*common, "--output-dir", str(full)]) == 0
    done = torch.load(full / "latest_checkpoint.pth", weights_only=True)
    projections = done["criterion"]
    assert projections["projections.backbone.weight"].shape == (3, 256)  # tiny CRNN 256 -> the teacher's 3
    assert projections["projections.encoder.weight"].shape == (3, 352)   # BiLSTM 2 x 176 -> 3
    model_params = sum(1 for _ in done["model"] if "running" not in _ and "num_batches" not in _)
    assert len(done["optimizer"]["state"]) == model_params + 4  # every student parameter and the 4 projection ones
    # the teacher cache holds the features (float16) beside the logits, and gives what the teacher gives live
    [path] = (tmp_path / "cache" / "teacher").glob("*.safetensors")
    tables = load_file(str(path))
    assert set(tables) == {"logits", "backbone", "encoder"} and tables["backbone"].dtype == torch.float16
    task = build_task(parse_config(common))
    batch = task.collator([task.splits["train"][i] for i in range(4)])
    live, cached = task.teacher_outputs(task.teacher, batch), teacher_cache.TeacherCache(tables)(batch)
    for k in ("logits", "backbone", "encoder"):
        torch.testing.assert_close(cached[k], live[k], atol=2e-3, rtol=2e-3)
    rows = [json.loads(line) for line in open(full / "student_metrics.jsonl")]
    assert {"train_feature_backbone", "train_feature_encoder", "train_feature_logits", "train_kl"} <= set(rows[0])

    outputs, steps = TextRecognition.student_outputs, []

    def sigterm_at_third_step(self, student, batch):  # 8 crops, batch 4: 2 steps an epoch; the 3rd is in epoch 2
        steps.extend([1] if student.training else [])
        if student.training and len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return outputs(self, student, batch)
    with monkeypatch.context() as patch:
        patch.setattr(TextRecognition, "student_outputs", sigterm_at_third_step)
        assert main.main([*common, "--output-dir", str(stopped)]) == 143
    saved = torch.load(stopped / "latest_checkpoint.pth", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 1)
    assert not torch.equal(saved["criterion"]["projections.backbone.weight"],
                           projections["projections.backbone.weight"])
    assert main.main([*common, "--output-dir", str(stopped), "--checkpoint",
                      str(stopped / "latest_checkpoint.pth")]) == 0
    resumed = torch.load(stopped / "latest_checkpoint.pth", weights_only=True)
    for part in ("criterion", "model"):
        assert resumed[part].keys() == done[part].keys()
        for k in done[part]:
            assert torch.equal(resumed[part][k], done[part][k]), (part, k)
    drop = TIMING
    again = [json.loads(line) for line in open(stopped / "student_metrics.jsonl")]
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows]


# ----------------------------------------------------------------------------------- predict and export

def test_predict_and_export_crops(tmp_path, capsys):
    """An untrained CRNN student: --mode predict writes one row per crop; --mode export matches PyTorch."""
    from textrec import crnn
    import main
    torch.manual_seed(0)
    student = tmp_path / "student"
    crnn.build(textrec.STUDENT_CHARS, 32, "tiny").eval().save_pretrained(str(student))
    crops = tmp_path / "crops"
    crops.mkdir()
    for k, word in enumerate(["total", "A-12", "x", "a line wider than the 320 px padding"]):
        image = Image.new("RGB", (16 + 9 * len(word), 24), "white")
        ImageDraw.Draw(image).text((6, 6), word, fill="black")
        image.save(crops / f"{k}.png")
    Image.new("RGB", (20, 60), "white").save(crops / "4-sideways.png")  # taller than wide: turned upright

    out = tmp_path / "predict"
    assert main.main(["--mode", "predict", "--model", str(student), "--input", str(crops), "--output-dir", str(out),
                      "--cache-dir", str(tmp_path / "cache"), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [os.path.basename(r["file"]) for r in rows] == ["0.png", "1.png", "2.png", "3.png", "4-sideways.png"]
    for row in rows:
        assert row["page"] == 1 and isinstance(row["text"], str) and 0.0 <= row["confidence"] <= 1.0
    assert json.loads((out / "predict_summary.json").read_text())["task"] == "text-recognition"
    # student_model.pth beside student/ (as --mode train writes it) predicts the same
    model = crnn.CRNN.from_pretrained(str(student))
    torch.save({"state_dict": model.state_dict(), "config": json.dumps(model.config.to_dict())},
               tmp_path / "student_model.pth")
    assert main.main(["--mode", "predict", "--model", str(tmp_path / "student_model.pth"), "--input", str(crops),
                      "--output-dir", str(tmp_path / "pth"), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert [json.loads(line)["text"] for line in open(tmp_path / "pth" / "predictions.jsonl")] == \
        [r["text"] for r in rows]

    # export needs crops to check on; with them, the float32 file matches PyTorch and predict runs it
    assert main.main(["--mode", "export", "--model", str(student), "--output-dir", str(tmp_path / "e")]) == 2
    assert main.main(["--mode", "export", "--model", str(student), "--input", str(crops),
                      "--output-dir", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "onnx" / "export.json").read_text())
    assert report["inputs"] == ["pixel_values"] and report["documents_checked"] == 5
    assert report["float32"]["max_abs_difference"] <= 1e-3 and report["int8"]["size_mb"] > 0
    onnx_out = tmp_path / "predict-onnx"
    assert main.main(["--mode", "predict", "--model", str(tmp_path / "e" / "onnx" / "model.onnx"),
                      "--input", str(crops), "--output-dir", str(onnx_out), "--cache-dir", str(tmp_path / "cache")]) == 0
    again = [json.loads(line) for line in open(onnx_out / "predictions.jsonl")]
    assert [r["text"] for r in again] == [r["text"] for r in rows]
    assert all(abs(a["confidence"] - b["confidence"]) < 1e-4 for a, b in zip(again, rows))
    capsys.readouterr()
