"""Text recognition II: the labels' conventions (measured, the teacher's case folded, kl silent at the spaces it
drops: against written-out formulas), the top-k teacher cache, augmentation by epoch, and training without any
transcript (the teacher's readings as the validation reference)."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import compact_logits
import teacher_cache
from conftest import run_main
from test_text_recognition import make_batch, tiny_onnx_teacher
from textrec import conventions, ctc_kd, data
from textrec.task import Collator

pytestmark = pytest.mark.usefixtures("one_thread")
SPACE = data.STUDENT_CHARS.index(" ") + 1


# --------------------------------------------------------------------------------------- conventions

def test_measure_finds_case_spaces_and_trailing_punctuation():
    truths = ["TOTAL DUE", "CASH 10.00", "TEL: 03-1234", "GST ID", "Fax:"] * 5
    readings = ["Totaldue", "Cash10.00", "Tel:03-1234", "GSTID", "Fax"] * 5
    found = conventions.measure(truths, readings)
    assert found["case"] == "as printed"  # "Fax:" has lower-case letters: the labels are not all capitals
    found = conventions.measure([t.upper() for t in truths], readings)
    assert found["case"] == "upper" and found["label_lower_share"] == 0.0
    assert found["spaces"] == "keep" and (found["label_spaces"], found["teacher_spaces"]) == (20, 0)
    assert found["trailing_punctuation_labels"] == 5 and found["trailing_punctuation_dropped_by_teacher"] == 1.0
    assert "folded to upper case" in conventions.describe(found)
    same = conventions.measure(["Fax", "Date"], ["Fax", "Date"])
    assert (same["case"], same["spaces"]) == ("as printed", "as read")
    assert conventions.describe(same).endswith("nothing to teach")


def test_case_fold_moves_each_letters_mass_to_the_labels_case():
    fold = conventions.case_fold("upper")
    a, big_a, comma = (data.STUDENT_CHARS.index(c) + 1 for c in "aA,")
    probs = np.zeros(96, np.float32)
    probs[[0, a, big_a, comma]] = [0.1, 0.5, 0.2, 0.2]
    folded = probs @ fold
    assert folded[big_a] == pytest.approx(0.7) and folded[a] == 0 and folded[comma] == pytest.approx(0.2)
    assert folded[0] == pytest.approx(0.1) and (fold.sum(1) == 1).all()
    assert (conventions.case_fold("as printed") == np.eye(96)).all()
    assert conventions.case_fold("lower")[big_a, a] == 1


def brute_force_alignment(logp, target):
    """The best CTC path of `target` under logp [T, C], by enumerating every path (tiny T)."""
    best, best_path = -math.inf, None
    for path in itertools.product(range(logp.shape[1]), repeat=logp.shape[0]):
        if data.ctc_greedy(list(path)) == target:
            score = sum(logp[t, c] for t, c in enumerate(path))
            if score > best:
                best, best_path = score, path
    return best_path


def test_viterbi_alignment_is_the_best_ctc_path():
    torch.manual_seed(3)
    logp = torch.randn(2, 5, 4).log_softmax(-1)
    targets, lengths = [[1, 2, 2], [3]], torch.tensor([5, 4])
    states = conventions.viterbi_states(logp, targets, lengths)
    for b, (target, n) in enumerate(zip(targets, lengths)):
        path = brute_force_alignment(logp[b, :n].numpy(), target)
        ext = [0] + [c for t in target for c in (t, 0)]
        assert [ext[s] for s in states[b, :n].tolist()] == list(path)
        assert (states[b, n:] == -1).all()
    assert (conventions.viterbi_states(logp[:1, :2], [[1, 1, 1]], torch.tensor([2])) == -1).all()  # cannot fit


def test_kl_leaves_out_the_steps_around_a_space_the_teacher_drops():
    """Label "a b" (a labelled crop), teacher reading "ab": steps a, blank, blank, b, blank; the alignment puts the
    space's blank-space-blank on steps 1-2, which leave the kl term; a second, unlabelled crop keeps all its steps;
    a space the teacher does read (third crop) keeps its steps too. Against a per-step loop."""
    a, b = (data.STUDENT_CHARS.index(c) + 1 for c in "ab")
    best = torch.tensor([[a, 0, 0, b, 0], [a, 0, 0, b, 0], [a, 0, SPACE, b, 0]])
    teacher = (torch.nn.functional.one_hot(best, 96).float() * 8).log_softmax(-1)
    torch.manual_seed(4)
    student = torch.randn(3, 5, 96)
    batch = make_batch([5, 5, 5], [[a, SPACE, b], [], [a, SPACE, b]], steps=5)
    gaps = conventions.label_gaps(teacher, batch["labels"], batch["has_label"], batch["step_mask"])
    assert gaps.tolist() == [[False, True, True, False, False], [False] * 5, [False] * 5]
    T, w_blank = 2.0, 0.1
    loss = ctc_kd.CTCDistillationLoss(0.5, T, ["kl"], w_blank, True, label_gaps=("space",))
    out = loss(student, teacher, batch)
    num = den = 0.0
    for i in range(3):
        for t in range(5):
            if gaps[i, t]:
                continue
            p = torch.softmax(teacher[i, t] / T, -1).double().numpy()
            q = torch.softmax(student[i, t] / T, -1).double().numpy()
            w = w_blank if teacher[i, t].argmax() == 0 else 1.0
            num += w * (p * (np.log(p) - np.log(q))).sum()
            den += w
    assert out["kl"].item() == pytest.approx(T * T * num / den, rel=1e-4)
    plain = ctc_kd.CTCDistillationLoss(0.5, T, ["kl"], w_blank, True)(student, teacher, batch)
    assert plain["kl"].item() != pytest.approx(out["kl"].item(), rel=1e-3)


def test_trailing_punctuation_and_every_disagreement():
    """"Fax:" read "Fax": "trailing" masks the colon's steps; "all" masks every character the teacher misreads ("Fbx:"
    read "Fax": the b and the colon), not those it reads; a space is not trailing punctuation."""
    F, a, x, b, colon = (data.STUDENT_CHARS.index(c) + 1 for c in "Faxb:")
    best = torch.tensor([[F, 0, a, 0, x, 0, 0, 0]])
    teacher = (torch.nn.functional.one_hot(best, 96).float() * 8).log_softmax(-1)
    fax = make_batch([8], [[F, a, x, colon]], steps=8)
    gaps = conventions.label_gaps(teacher, fax["labels"], fax["has_label"], fax["step_mask"], ("trailing",))
    assert gaps[0, :5].tolist() == [False] * 5 and gaps[0, 5:].any()
    assert not conventions.label_gaps(teacher, fax["labels"], fax["has_label"], fax["step_mask"], ("space",)).any()
    fbx = make_batch([8], [[F, b, x, colon]], steps=8)
    gaps = conventions.label_gaps(teacher, fbx["labels"], fbx["has_label"], fbx["step_mask"], ("all",))
    assert gaps[0, 0].item() is False and gaps[0, 2].item() is True and gaps[0, 4].item() is False
    assert conventions.checked([F, a, x, colon], ("trailing",)) == [3] and conventions.checked([F, a], ("trailing",)) == []
    found = conventions.measure(["Fax:"] * 12, ["Fax"] * 12)
    assert conventions.gap_kinds(found) == ("trailing",) and conventions.gap_kinds(None) == ()


# ------------------------------------------------------------------------------------------- top-k cache

def test_compact_teacher_cache_tables():
    """8-bit log-probabilities of every class (--teacher-top-k 0), and the top K with the rest shared evenly (K)."""
    torch.manual_seed(5)
    logits = torch.randn(3, 4, 6) * 3
    logp = torch.log_softmax(logits, -1)
    eight = compact_logits.CompactLogits.of(logits, 0)
    assert eight.parts["logp_uint8"].dtype == torch.uint8
    step = compact_logits.LOGP_RANGE / 255
    expected = torch.round((logp.clamp(min=-32) + 32) / step) * step - 32
    torch.testing.assert_close(eight[torch.tensor([2, 0])], expected[[2, 0]], atol=1e-5, rtol=0)
    assert (eight[torch.arange(3)] - logp).abs().max() <= step / 2 + 1e-5
    table = compact_logits.CompactLogits.of(logits, 2)
    assert table.parts["topk_ids"].dtype == torch.uint8 and table.parts["rest_logp"].shape == (3, 4)
    got = table[torch.tensor([2, 0])]
    for row, i in zip(got, (2, 0)):
        for t in range(4):
            p = torch.softmax(logits[i, t], -1)
            top = p.topk(2).indices
            expected = torch.full((6,), float(1 - p[top].sum()) / 4)
            expected[top] = p[top]
            torch.testing.assert_close(row[t].exp(), expected, atol=2e-3, rtol=2e-3)  # float16 log-probabilities
    stored = table.tables("logits")
    assert set(stored) == {"logits.topk_ids", "logits.topk_logp", "logits.rest_logp", "logits.classes"}
    back = compact_logits.with_compact({**stored, "backbone": torch.zeros(3, 4, 2)})
    assert set(back) == {"logits", "backbone"} and torch.equal(back["logits"][torch.tensor([1])], table[[1]])
    rows = {"logits": {i: logits[i] for i in range(3)}}
    assert set(teacher_cache.to_tables(rows, top_k=0)) == {"logits.logp_uint8", "logits.classes"}
    assert set(teacher_cache.to_tables(rows, top_k=None)) == set(teacher_cache.to_tables(rows, top_k=6)) == {"logits"}


# ------------------------------------------------------------------------------------------- augmentation

def test_augmentation_is_a_function_of_seed_epoch_and_crop():
    image = Image.new("L", (120, 48), 255)
    ImageDraw.Draw(image).text((5, 15), "Augment 42", fill=0)
    views = {(e, k): np.asarray(data.augment(image, 7, e, k)) for e in range(4) for k in ("a/1", "a/2")}
    assert all(v.shape == (48, 120) for v in views.values())
    assert (views[(0, "a/1")] == np.asarray(data.augment(image, 7, 0, "a/1"))).all()
    assert any((views[(0, "a/1")] != views[(e, "a/1")]).any() for e in range(1, 4))
    cfg = type("C", (), dict(student_height=32, seed=7, degrade_height=0, degrade_blur=0.0, degrade_noise=0.0,
                             degrade_jpeg=0, augment=True))()
    sampler = type("S", (), {"epoch": 0})()
    collator, trained = Collator(cfg), Collator(cfg).follow_epochs(sampler)
    plain = collator.student_array(image.convert("RGB"), "a/1")  # not bound to a training sampler: never augmented
    assert (plain == data.student_pixels(np.asarray(image), 32)).all()
    sampler.epoch = 2
    assert np.allclose(trained.student_array(image.convert("RGB"), "a/1"),
                       data.student_pixels(views[(2, "a/1")], 32))


# --------------------------------------------------------------------- main.py: conventions, no transcripts

@pytest.fixture(scope="module")
def capital_crops(tmp_path_factory):
    """Rendered words whose transcripts are in capitals (as SROIE's); a folder of crops without any transcript."""
    root = tmp_path_factory.mktemp("capitals")
    words = ["total", "cash", "date", "tax", "change", "item", "qty", "price"]
    for split, chosen in (("train", words), ("validation", words[:3]), ("test", words[3:6])):
        rows = []
        for k, word in enumerate(chosen):
            image = Image.new("RGB", (16 + 9 * len(word), 24), "white")
            ImageDraw.Draw(image).text((6, 6), word, fill="black")
            image.save(root / f"{split}-{k}.png")
            rows.append({"image": f"{split}-{k}.png", "text": word.upper()})
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bare = tmp_path_factory.mktemp("bare")
    for k in range(10):
        image = Image.new("RGB", (60, 24), "white")
        ImageDraw.Draw(image).text((6, 6), words[k % 8], fill="black")
        image.save(bare / f"crop{k}.png")
    return root, bare


def test_main_measures_conventions_and_trains_without_transcripts(capital_crops, tmp_path):
    root, bare = capital_crops
    teacher = tiny_onnx_teacher(str(tmp_path / "tiny_rec.onnx"))  # reads lower-case letters (and CJK)
    common = ["--task", "text-recognition", "--teacher", teacher, "--cache-dir", tmp_path / "cache", "--batch-size",
              "4", "--epochs", "1", "--alpha", "0.5", "--lr", "1e-3"]
    done = run_main("--mode", "train", "--dataset", root, "--output-dir", tmp_path / "caps", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "label conventions: labels against the teacher's readings of 8 labelled training crops: letter case upper" \
        in done.stderr
    saved = json.loads((tmp_path / "caps" / "student" / "config.json").read_text())
    assert saved["label_conventions"]["case"] == "upper"
    assert "letter case upper" in (tmp_path / "caps" / "student" / "README.md").read_text()  # the model card says it
    off = run_main("--mode", "train", "--dataset", root, "--output-dir", tmp_path / "off", "--no-label-conventions",
                   *common)
    assert off.returncode == 0 and "label conventions" not in off.stderr
    assert "teacher logits computed once" in off.stderr  # the folded teacher has a cache of its own
    # a folder of crops without a single transcript: the teacher alone teaches; validation is scored against the
    # teacher's readings, said in the log, in every validation row and in eval.json
    done = run_main("--mode", "train", "--dataset", bare, "--output-dir", tmp_path / "bare", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the teacher's readings of them are the reference" in done.stderr
    rows = [json.loads(line) for line in open(tmp_path / "bare" / "student_metrics.jsonl")]
    assert rows[0]["val_teacher_reference"] == 1.0 and math.isfinite(rows[0]["val_cer"])
    done = run_main("--mode", "eval", "--dataset", bare, "--output-dir", tmp_path / "bare", "--eval-split", "test",
                    *common)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bare" / "eval.json").read_text())
    assert result["reference"].startswith("the teacher's readings") and result["teacher_scores"]["cer"] == 0.0
    refused = run_main("--mode", "train", "--dataset", bare, "--output-dir", tmp_path / "none", *common[:-4],
                       "--alpha", "0")
    assert refused.returncode == 2 and "have no transcripts" in refused.stderr
