"""--unlabeled: documents without labels add only the distillation term; cached, reported, resumed exactly."""
import json
import os

import numpy as np
import pytest
import torch

import demo_corpus as demo
from conftest import assert_same_run, kill_inside_second_epoch, metrics, run_main
from losses import IGNORE_INDEX, DistillationLoss


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(student, teacher, labels, labeled, T, alpha, w):
    """Written out in float64: CE over labelled rows; KL over all rows, unlabelled ones weighted w, / all rows."""
    s, t, y, lab = (np.asarray(x, np.float64) for x in (student, teacher, labels, labeled))
    p_s, p_t = softmax(s / T), softmax(t / T)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1)
    kd = T * T * (kl[lab == 1].sum() + w * kl[lab == 0].sum()) / len(kl)
    ys = y[lab == 1].astype(int)
    ce = -np.log(softmax(s[lab == 1])[np.arange(len(ys)), ys]).mean()
    return alpha * kd + (1 - alpha) * ce, kd, ce


@pytest.mark.parametrize("w", [1.0, 0.5, 0.0])
def test_unlabelled_rows_add_only_the_kd_term(w):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g) * 2, torch.randn(6, 5, generator=g) * 2
    labeled = torch.tensor([True, False, True, False, False, True])
    labels = torch.where(labeled, torch.tensor([1, 0, 4, 0, 0, 2]), IGNORE_INDEX)
    loss = DistillationLoss(temperature=2.0, alpha=0.6, unlabeled_weight=w)
    out = loss(student, teacher, {"labels": labels, "labeled": labeled})
    total, kd, ce = reference(student, teacher, labels, labeled, 2.0, 0.6, w)
    assert out["total"].item() == pytest.approx(total, rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5) and out["ce"].item() == pytest.approx(ce, rel=1e-5)
    # the gradient of an unlabelled row comes from the KL term alone: with alpha 0 it is exactly zero
    s = student.clone().requires_grad_()
    DistillationLoss(2.0, 0.0, w)(s, teacher, {"labels": labels, "labeled": labeled})["total"].backward()
    assert torch.all(s.grad[~labeled] == 0) and torch.any(s.grad[labeled] != 0)


def test_all_labelled_flag_changes_nothing_and_unlabelled_only_batch_has_no_ce():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 1])
    loss = DistillationLoss(4.0, 0.7)
    everyone = torch.ones(4, dtype=torch.bool)
    plain, flagged = loss(student, teacher, labels), loss(student, teacher, {"labels": labels, "labeled": everyone})
    assert torch.equal(plain["total"], flagged["total"])
    out = loss(student, teacher, {"labels": torch.full((4,), IGNORE_INDEX), "labeled": ~everyone})
    assert out["ce"].item() == 0 and out["kd"].item() > 0 and torch.isfinite(out["total"])


def test_per_word_unlabelled_rows_use_their_word_positions_only():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    labels = torch.tensor([[0, 2, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 4])  # row 1: unlabelled, 3 words
    positions = torch.tensor([[True, True, False, False], [True, True, True, False]])
    out = DistillationLoss(1.0, 0.5)(student, teacher, {"labels": labels, "labeled": torch.tensor([True, False]),
                                                         "positions": positions})
    rows = positions.reshape(-1)
    _, kd, ce = reference(student.reshape(-1, 3)[rows], teacher.reshape(-1, 3)[rows],
                          np.array([0, 2, 0, 0, 0]), np.array([1, 1, 0, 0, 0]), 1.0, 0.5, 1.0)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5) and out["ce"].item() == pytest.approx(ce, rel=1e-5)


# ----------------------------------------------------------------------------- real runs

FAST = ["--preset", "demo", "--max-length", "64", "--batch-size", "4", "--student-image-size", "64",
        "--student-size", "small", "--epochs", "2", "--save-every", "2"]
@pytest.fixture(scope="module")
def setup(tiny_demo, tmp_path_factory):
    """A teacher that reads words, boxes and page (the demo's kind) trained for one epoch on the tiny corpus, and
    16 unlabelled pages (generated with labels, which must be ignored)."""
    root = tmp_path_factory.mktemp("unlabeled")
    pool = str(root / "pool")
    demo.generate_pages(pool, {"train": ("unlabeled", 1)}, seed=3)
    common = [*FAST, "--dataset", tiny_demo, "--cache-dir", root / "cache"]
    teacher = run_main("--mode", "teacher", *common, "--teacher", "demo-layoutlmv3", "--epochs", "1",
                       "--output-dir", root / "t")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    return root, [*common, "--teacher", root / "t" / "teacher", "--unlabeled", pool]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, args = setup
    result = run_main("--mode", "train", *args, "--output-dir", root / "full")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "full", result


def test_train_with_unlabelled_pages(setup, uninterrupted):
    root, _ = setup
    out, result = uninterrupted
    assert "unlabeled (" in result.stderr and "16 documents join train" in result.stderr
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["train_kd"] > 0 for r in rows)
    # the teacher cache holds a row for each of the 32 labelled and 16 unlabelled pages, and none is blank
    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(root / "cache" / "teacher") for f in fs]
    from safetensors.torch import load_file
    logits = load_file(path)["logits"]
    assert logits.shape[0] == 48 and bool((logits.abs().sum(-1) > 0).all())
    assert json.load(open(out / "train_config.json"))["unlabeled"].endswith("pool")


def test_info_reports_unlabelled_pages(setup):
    root, args = setup
    result = run_main("--mode", "info", *args, "--output-dir", root / "info")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unlabeled (16)" in result.stdout and "[unlabeled]" in result.stdout


def test_unlabelled_needs_distillation(tmp_path):
    from config import UserError, parse_config
    for extra in (["--mode", "train", "--alpha", "0"], ["--mode", "teacher"]):
        with pytest.raises(UserError, match="--unlabeled"):
            parse_config(["--unlabeled", "demo-unlabeled", "--output-dir", str(tmp_path), *extra])


def test_sigkill_mid_epoch_then_resume_with_both_sources_ends_like_an_uninterrupted_run(setup, uninterrupted):
    root, args = setup
    full, _ = uninterrupted
    out = root / "killed"
    ckpt = out / "latest_checkpoint.pth"
    saved = kill_inside_second_epoch(args, out)
    assert saved["epoch"] == 1 and 0 < saved["step_in_epoch"] < 12  # 48 pages, batch 4: 12 steps an epoch
    resumed = run_main("--mode", "train", *args, "--output-dir", out, "--checkpoint", ckpt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(full, out)


def test_student_sizes_are_named_in_one_place():
    import config
    import models
    assert set(config.STUDENT_SIZES) == set(models.STUDENT_SIZES) | {"full"}
    for shapes in models.STUDENT_SIZES.values():
        lm = shapes["layoutlmv3"]
        assert 4 * lm["coordinate_size"] + 2 * lm["shape_size"] == lm["hidden_size"]


# ----------------------------------------------------------------------------- token classification (word tags)

def word_batch():
    """A labelled form and an unlabelled one (every tag IGNORE_INDEX) as WordCollator batches them. Word 3 of
    the labelled form and word 1 of the unlabelled one have no teacher token (truncated); the unlabelled form's
    word 3 is padding."""
    import wordtags
    pixels = np.zeros((3, 4, 4), np.uint8)
    docs = [dict(index=0, ner_tags=[1, 2, 0, 3], input_ids=[2, 5, 6, 7, 8, 9, 3], word_pos=[1, 2, 4, 5],
                 teacher_input_ids=[0, 5, 6, 7, 2], bbox=[[0, 0, 0, 0]] + [[1, 2, 3, 4]] * 3 + [[0, 0, 0, 0]],
                 teacher_word_pos=[1, 2, 3, -1], teacher_pixels=pixels),
            dict(index=7, ner_tags=[IGNORE_INDEX] * 3, input_ids=[2, 5, 6, 7, 3], word_pos=[1, 2, 3],
                 teacher_input_ids=[0, 9, 10, 2], bbox=[[0, 0, 0, 0]] + [[5, 6, 7, 8]] * 2 + [[0, 0, 0, 0]],
                 teacher_word_pos=[1, -1, 2], teacher_pixels=pixels)]
    spec = {"size": [4, 4], "resample": 2, "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3}
    return wordtags.WordCollator(0, 1, spec)(docs)


def test_unlabelled_form_adds_only_the_kd_term_over_its_real_words():
    import wordtags
    batch = word_batch()
    assert batch["labeled"].tolist() == [True, False]
    assert batch["positions"].tolist() == [[True, True, True, False], [True, False, True, False]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 4
    g = torch.Generator().manual_seed(3)
    C, T, alpha, w = 7, 2.0, 0.6, 0.5
    student_tokens = torch.randn(2, 7, C, generator=g) * 2
    teacher_tokens = torch.randn(2, 5, C, generator=g) * 2

    def loss(s, t, weight=w, a=alpha):
        return DistillationLoss(T, a, weight)(wordtags.at_words(s, batch["word_pos"]),
                                              wordtags.at_words(t, batch["teacher_word_pos"]), batch)

    out = loss(student_tokens, teacher_tokens)
    # by hand, in float64: (form, student position, teacher position, tag or None for unlabelled) of every word
    # both models read; the unlabelled form's KL weighted w, the KD averaged over all 5 words, the CE over 3
    words = [(0, 1, 1, 1), (0, 2, 2, 2), (0, 4, 3, 0), (1, 1, 1, None), (1, 3, 2, None)]
    kl_sum = ce_sum = 0.0
    for b, s_pos, t_pos, tag in words:
        s, t = student_tokens[b, s_pos].double(), teacher_tokens[b, t_pos].double()
        p_t, log_p_s = torch.softmax(t / T, -1), torch.log_softmax(s / T, -1)
        kl = float((p_t * (torch.log(p_t) - log_p_s)).sum())
        kl_sum += kl if tag is not None else w * kl
        ce_sum += float(-torch.log_softmax(s, -1)[tag]) if tag is not None else 0.0
    kd, ce = T * T * kl_sum / len(words), ce_sum / 3
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5) and out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["total"].item() == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5)
    # the unlabelled form's dropped word, padding and later sub-tokens do not count
    noisy_student, noisy_teacher = student_tokens.clone(), teacher_tokens.clone()
    noisy_student[1, [0, 2, 4]] = 1e3
    noisy_teacher[1, 3:] = -1e3
    assert loss(noisy_student, noisy_teacher)["total"].item() == pytest.approx(out["total"].item(), rel=1e-6)
    # with alpha 1 (KD alone) the unlabelled form's gradient is at its two words only; with weight 0 it is none
    for weight, expected in ((w, [1, 3]), (0.0, [])):
        s = student_tokens.clone().requires_grad_()
        loss(s, teacher_tokens, weight, 1.0)["total"].backward()
        assert [p for p in range(7) if s.grad[1, p].abs().sum() > 0] == expected


@pytest.mark.parametrize("with_tags", [True, False])
def test_untagged_hub_layout_forms(tmp_path, with_tags):
    """An unlabelled source in the hub layout: its tags, present (any numbers) or absent, become IGNORE_INDEX."""
    import wordtags
    rows = unlabelled_forms(tmp_path, 2, with_tags)
    data, tags = wordtags.from_hub_layout(rows, tagged=False)
    assert tags is None and data["train"]["ner_tags"] == [[IGNORE_INDEX] * len(w) for w in data["train"]["words"]]


def unlabelled_forms(tmp_path, n, with_tags=True):
    """n forms in the hub layout (one split), drawn like test_token_classification's, tagged 99 (no such tag)."""
    import datasets
    import wordtags
    from test_token_classification import write_funsd
    folder = wordtags.load_funsd_folder(write_funsd(tmp_path / "pool-source", forms_per_split=n))["train"]
    columns = {"id": [f"u{i}" for i in range(n)], "tokens": folder["words"], "bboxes": folder["boxes"],
               "image": folder["image"]}
    if with_tags:
        columns["ner_tags"] = [[99] * len(w) for w in folder["words"]]
    return datasets.DatasetDict(train=datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image()))


def test_token_classification_train_with_unlabelled_forms(tmp_path):
    """A tiny run: 2 labelled forms and 2 unlabelled ones (hub layout, only split, tags 99 that must be ignored)
    in one batch, a random-weights LayoutLMv3 teacher (a config with the FUNSD tags), the small DistilBERT student."""
    from transformers import LayoutLMv3Config
    import wordtags
    from test_token_classification import TRICKY, byte_bpe, tiny_teacher_dir, wordpiece, write_funsd
    data = write_funsd(tmp_path / "funsd")
    pool = tmp_path / "pool"
    unlabelled_forms(tmp_path, 2)["train"].save_to_disk(str(pool))
    _, student_tokenizer = wordpiece(tmp_path, TRICKY)
    teacher_tokenizer, bpe_dir = byte_bpe(tmp_path)
    teacher = tiny_teacher_dir(tmp_path, bpe_dir, len(teacher_tokenizer))
    config = LayoutLMv3Config.from_pretrained(teacher)
    config.update(dict(id2label=dict(enumerate(wordtags.FUNSD_TAGS)),
                       label2id={t: i for i, t in enumerate(wordtags.FUNSD_TAGS)}))
    config.save_pretrained(teacher)
    args = ["--task", "token-classification", "--dataset", data, "--eval-split", "test", "--tokenizer",
            student_tokenizer, "--student-config", "builtin:distilbert-base-uncased", "--student-size", "small",
            "--cache-dir", tmp_path / "cache", "--batch-size", "4", "--max-length", "64", "--epochs", "1",
            "--teacher", teacher, "--unlabeled", pool, "--output-dir", tmp_path / "s"]
    result = run_main("--mode", "train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 documents join train" in result.stderr
    rows = metrics(tmp_path / "s")
    assert len(rows) == 1 and rows[0]["train_kd"] > 0
    # the teacher cache: rows 0-1 for the labelled forms, 2-3 for the unlabelled ones, none blank
    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache" / "teacher") for f in fs]
    from safetensors.torch import load_file
    logits = load_file(path)["logits"]
    assert logits.shape[0] == 4 and bool((logits.abs().sum((1, 2)) > 0).all())


# ------------------------------------------------------------------------ --labeled-fraction: part of the labels
def test_labeled_fraction_hides_a_seeded_share_of_the_labels():
    import datasets
    import dataset
    import wordtags
    from textrec.task import untranscribed
    hidden = dataset.hidden_labels(10, 0.3, seed=7)
    assert len(hidden) == 7 and hidden == dataset.hidden_labels(10, 0.3, seed=7) != dataset.hidden_labels(10, 0.3, 8)
    assert dataset.hidden_labels(10, 1.0, 7) == set() and len(dataset.hidden_labels(3, 0.01, 7)) == 2  # one kept
    pages = datasets.Dataset.from_dict({"label": [0, 1, 2, 1], "words": [["a"], ["b", "c"], ["d"], ["e"]]})
    out = dataset.hide_labels(pages, {1, 3}, dataset.without_labels, alpha=0.5)
    assert out["label"] == [0, IGNORE_INDEX, 2, IGNORE_INDEX] and out["words"] == pages["words"]
    assert dataset.hide_labels(pages, {1, 3}, dataset.without_labels, alpha=0.0)["label"] == [0, 2]  # left out
    forms = datasets.Dataset.from_dict({"words": [["a", "b"], ["c"]], "ner_tags": [[1, 2], [3]]})
    assert wordtags.untag_some(forms, {0})["ner_tags"] == [[IGNORE_INDEX] * 2, [3]]
    crops = [{"key": "k0", "has_text": True}, {"key": "k1", "has_text": True}]
    assert [r["has_text"] for r in dataset.hide_labels(crops, {1}, untranscribed, alpha=0.5)] == [True, False]
    assert dataset.hide_labels(crops, {1}, untranscribed, alpha=0.0) == crops[:1]


def test_train_with_half_the_labels(setup):
    """The tiny corpus's 32 pages with --labeled-fraction 0.5: 16 keep their labels, the teacher teaches all 32."""
    root, args = setup
    args = [a for a in args[:args.index("--unlabeled")]]
    result = run_main("--mode", "train", *args, "--labeled-fraction", "0.5", "--epochs", "1",
                      "--output-dir", root / "half")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "16 of 32 training documents keep their labels; the other 16 are taught by the teacher" in result.stderr
    assert metrics(root / "half")[0]["train_kd"] > 0
    from config import UserError, parse_config
    with pytest.raises(UserError, match="--labeled-fraction"):
        parse_config(["--labeled-fraction", "0.5", "--mode", "teacher", "--output-dir", str(root / "x")])


def test_resume_from_a_checkpoint_that_predates_a_setting(setup, uninterrupted, tmp_path):
    """A checkpoint written before --labeled-fraction existed (no such setting recorded, fingerprint without it)
    resumes when the setting is at its default, and is refused, naming it, when it is not."""
    import hashlib

    import checkpoints
    from config import UserError, parse_config
    out, _ = uninterrupted
    checkpoint = torch.load(out / "latest_checkpoint.pth", weights_only=True)
    old_keys = [k for k in checkpoints.RESUME_KEYS if k != "labeled_fraction"]
    checkpoint["settings"].pop("labeled_fraction")
    blob = json.dumps({k: checkpoint["settings"][k] for k in old_keys}, sort_keys=True)
    checkpoint["fingerprint"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    old = tmp_path / "old.pth"
    torch.save(checkpoint, old)
    root, args = setup
    argv = ["--mode", "train", *map(str, args), "--output-dir", str(out)]
    assert checkpoints.load_checkpoint(str(old), parse_config(argv), "student")["fingerprint"] == checkpoint["fingerprint"]
    with pytest.raises(UserError, match="labeled_fraction: 1.0 in checkpoint, 0.5 now"):
        checkpoints.load_checkpoint(str(old), parse_config([*argv, "--labeled-fraction", "0.5"]), "student")


def test_hidden_transcripts_change_the_crop_cache_key(tmp_path):
    """Crops whose transcripts --labeled-fraction hides are prepared anew, not read from the all-labelled cache."""
    from textrec import data as textrec
    from PIL import Image
    Image.new("RGB", (40, 20), "white").save(tmp_path / "page.png")
    rows = [{"image": str(tmp_path / "page.png"), "box": [0, 0, 10, 10], "text": "a", "has_text": True, "key": "k"}]
    hidden = [{**rows[0], "has_text": False}]
    assert textrec.records_key(rows, max_width=640) != textrec.records_key(hidden, max_width=640)
