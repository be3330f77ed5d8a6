"""--kd-terms of page classification and word tagging (kd_terms.py): each term against a formula written out here,
kd alone bit for bit DistillationLoss, SimKD's head saved with the student, a feature run's projection
optimised, checkpointed and resumed exactly, attention maps transferred and cached, and several teachers averaged
in probability."""
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

import heads
import kd_terms
import saved
from conftest import TIMING
from losses import IGNORE_INDEX, DistillationLoss

FAST = ["--preset", "demo", "--max-length", "64", "--batch-size", "8", "--student-image-size", "64"]


def batch_with_unlabeled(shape, classes, g):
    """labels [shape] with an ignored position and unlabelled rows 1 and 3 (and, per word, padding positions)."""
    labels = torch.randint(0, classes, shape, generator=g)
    labels.view(-1)[2] = IGNORE_INDEX
    labeled = torch.tensor([True, False, True, False, True])
    labels[~labeled] = IGNORE_INDEX
    batch = {"labels": labels, "labeled": labeled}
    if len(shape) == 2:
        batch["positions"] = torch.rand(shape, generator=g) > 0.3
    return batch


def reference_positions(batch, unlabeled_weight):
    """Which positions the teacher's terms cover and their weights, written out: labelled positions weigh 1,
    the real positions of unlabelled rows weigh unlabeled_weight."""
    labels = batch["labels"].numpy()
    unlabeled = ~batch["labeled"].numpy().reshape(-1, *[1] * (labels.ndim - 1)) & np.ones(labels.shape, bool)
    if "positions" in batch:
        unlabeled &= batch["positions"].numpy()
    labelled = labels != IGNORE_INDEX
    teach = (labelled | unlabeled).reshape(-1)
    weight = np.where(unlabeled.reshape(-1), unlabeled_weight, 1.0)[teach]
    return labelled.reshape(-1), teach, weight


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("shape", [(5,), (5, 4)])
def test_kd_alone_is_distillation_loss_bit_for_bit(shape):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*shape, 6, generator=g, requires_grad=True)
    t = torch.randn(*shape, 6, generator=g)
    batch = batch_with_unlabeled(shape, 6, g)
    new = kd_terms.TermsLoss(4.0, 0.7, 0.5, ["kd"])(s, t, batch)
    old = DistillationLoss(4.0, 0.7, 0.5)(s, t, batch)
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)
    assert torch.equal(torch.autograd.grad(new["total"], s)[0], torch.autograd.grad(old["total"], s)[0])
    assert not list(kd_terms.TermsLoss(4.0, 0.7, 0.5, ["kd"]).parameters())  # nothing more to optimise


@pytest.mark.parametrize("shape", [(5,), (5, 4)])
@pytest.mark.parametrize("terms", [["kd", "logit-mse", "feature"], ["logit-mse", "simkd"]])
def test_terms_against_formula(shape, terms):
    g = torch.Generator().manual_seed(len(shape) + len(terms))
    classes, width, teacher_width, T, alpha, w, fw = 5, 3, 4, 2.0, 0.6, 0.5, 0.3
    batch = batch_with_unlabeled(shape, classes, g)
    s, t = torch.randn(*shape, classes, generator=g), torch.randn(*shape, classes, generator=g)
    # simkd's student features are already projected (SimKDHead's projector): the teacher's width
    sf = torch.randn(*shape, teacher_width if "simkd" in terms else width, generator=g)
    tf = torch.randn(*shape, teacher_width, generator=g)
    loss = kd_terms.TermsLoss(T, alpha, w, terms, fw, widths=(width, teacher_width))
    out = loss({"logits": s, "features": sf}, {"logits": t, "features": tf}, batch)

    labelled, teach, weight = reference_positions(batch, w)
    S, Tl = s.numpy().reshape(-1, classes).astype(np.float64), t.numpy().reshape(-1, classes).astype(np.float64)
    SF, TF = sf.numpy().reshape(-1, sf.shape[-1]).astype(np.float64), tf.numpy().reshape(-1, teacher_width)
    y = batch["labels"].numpy().reshape(-1)
    ce = -np.log(softmax(S[labelled])[np.arange(labelled.sum()), y[labelled]]).mean()
    n = teach.sum()
    expected = {"ce": ce}
    p_t, p_s = softmax(Tl[teach] / T), softmax(S[teach] / T)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1)
    if "kd" in terms:
        expected["kd"] = T * T * (weight * kl).sum() / n
    expected["logit-mse"] = (weight * ((S[teach] - Tl[teach]) ** 2).mean(-1)).sum() / n
    if "feature" in terms:
        W, b = loss.projection.weight.detach().numpy(), loss.projection.bias.detach().numpy()
        expected["feature"] = (weight * ((SF[teach] @ W.T + b - TF[teach]) ** 2).mean(-1)).sum() / n
    if "simkd" in terms:
        expected["simkd"] = (weight * ((SF[teach] - TF[teach]) ** 2).mean(-1)).sum() / n
    teacher_part = sum(v * (fw if k in ("feature", "simkd") else 1.0) for k, v in expected.items() if k != "ce")
    expected["total"] = (1 - alpha) * ce + alpha * teacher_part
    assert set(out) == set(expected)
    for k, v in expected.items():
        assert out[k].item() == pytest.approx(v, rel=1e-5), k


def test_feature_projection_gets_gradients():
    loss = kd_terms.TermsLoss(4.0, 0.5, 1.0, ["feature"], widths=(3, 4))
    labels = torch.tensor([0, 1])
    out = loss({"logits": torch.randn(2, 2), "features": torch.randn(2, 3)},
               {"logits": torch.randn(2, 2), "features": torch.randn(2, 4)}, labels)
    out["total"].backward()
    assert loss.projection.weight.grad is not None and loss.projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("per_word", [True, False])
def test_attention_term_against_formula(per_word):
    """KL(teacher row || student row) over the real rows, each row renormalised over the real columns, rows of an
    unlabelled document weighted; the teacher's map longer than the batch (a cached one, zero-padded) is cut."""
    g = torch.Generator().manual_seed(3 + per_word)
    B, R, alpha, w, fw = 3, 4, 0.6, 0.5, 0.3
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    labeled = torch.tensor([True, False, True])
    if per_word:  # one tag per word, and "positions"
        labels = torch.where(real, torch.randint(0, 3, (B, R), generator=g), IGNORE_INDEX)
        labels[~labeled] = IGNORE_INDEX
        batch = {"labels": labels, "labeled": labeled, "positions": real}
    else:  # one label per page, its real text tokens in the attention mask
        batch = {"labels": torch.tensor([0, IGNORE_INDEX, 1]), "labeled": labeled, "attention_mask": real.long()}
    logits = torch.randn(*batch["labels"].shape, 3, generator=g)
    s = torch.softmax(torch.randn(B, R, R, generator=g), -1)
    t = torch.zeros(B, R + 2, R + 2)
    t[:, :R, :R] = torch.softmax(torch.randn(B, R, R, generator=g), -1)
    loss = kd_terms.TermsLoss(2.0, alpha, w, ["attention"], fw)
    out = loss({"logits": logits, "attention": s}, {"logits": logits, "attention": t.half()}, batch)

    S, Tm, mask = s.numpy().astype(np.float64), t.half().float().numpy().astype(np.float64), real.numpy()
    total = n = 0.0
    for b in range(B):
        cols = mask[b]
        for i in np.flatnonzero(mask[b]):
            p, q = Tm[b, i, :R][cols] / Tm[b, i, :R][cols].sum(), S[b, i][cols] / S[b, i][cols].sum()
            total += (1.0 if labeled[b] else w) * (p * np.log(p / q)).sum()
            n += 1
    expected = total / n
    assert out["attention"].item() == pytest.approx(expected, rel=1e-5)
    assert out["total"].item() == pytest.approx((1 - alpha) * out["ce"].item() + alpha * fw * expected, rel=1e-5)


def test_word_pairs_read_first_sub_tokens_on_both_axes():
    import wordtags
    maps = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 5, 5)
    pos = torch.tensor([[1, 3], [4, 0]])
    pairs = wordtags.at_word_pairs(maps, pos)
    assert all(pairs[b, i, j] == maps[b, pos[b, i], pos[b, j]] for b in range(2) for i in range(2) for j in range(2))


def tiny_word_student():
    from transformers import DistilBertConfig, DistilBertForTokenClassification
    torch.manual_seed(0)
    labels = ["O", "B-A", "I-A", "B-Q"]
    config = DistilBertConfig(vocab_size=50, dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_position_embeddings=32,
                              id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    return DistilBertForTokenClassification(config)


@pytest.mark.parametrize("layoutlmv3_head", [False, True])
def test_simkd_student_is_its_projection_and_the_teachers_head_and_loads_alone(tmp_path, layoutlmv3_head):
    from modes import predict
    from transformers import LayoutLMv3Config
    from transformers.models.layoutlmv3.modeling_layoutlmv3 import LayoutLMv3ClassificationHead
    student = tiny_word_student()
    teacher_head = (LayoutLMv3ClassificationHead(LayoutLMv3Config(hidden_size=6, num_labels=4)) if layoutlmv3_head
                    else nn.Linear(6, 4)).eval()
    order = [2, 0, 3, 1]  # the teacher's class of each of the dataset's classes
    heads.attach_simkd_head(student, teacher_head, order)
    head = student.classifier
    assert [p.requires_grad for p in head.teacher_head.parameters()] == [False] * len(list(head.teacher_head.parameters()))
    assert head.projector.weight.requires_grad and head.projector.weight.shape == (6, 8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(head(x), teacher_head(head.projector(x))[:, order], atol=1e-6)

    ids = torch.randint(0, 50, (2, 7))
    student.eval()
    with torch.no_grad():
        expected = student(input_ids=ids).logits
    stub = type("Task", (), {"save_pretrained": staticmethod(lambda model, d, role: model.save_pretrained(d))})
    saved.save_best(stub, student, str(tmp_path), "student")  # student_model.pth and student/, as training
    del student, teacher_head  # nothing of the teacher is left
    for path in (tmp_path / "student", tmp_path / "student_model.pth"):
        model, _, config = predict.load_model(str(path))
        assert isinstance(model.classifier, heads.SimKDHead) and config.simkd_head["teacher_width"] == 6
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, expected), path


def test_simkd_refuses_a_head_it_cannot_copy():
    from config import UserError
    with pytest.raises(UserError, match="simkd"):
        heads.attach_simkd_head(tiny_word_student(), nn.Sequential(nn.Linear(6, 4)), [0, 1, 2, 3])


@pytest.mark.parametrize("argv, message", [
    (["--kd-terms", "kl"], "--kd-terms for --task sequence-classification must be a comma-separated subset of kd, "
                           "logit-mse, feature, simkd, attention"),
    (["--kd-terms", "feature,simkd"], "choose feature or simkd"),
    (["--task", "text-recognition", "--kd-terms", "feature"], "--kd-terms for --task text-recognition"),
])
def test_kd_terms_are_checked_per_task(argv, message):
    from config import UserError, parse_config
    with pytest.raises(UserError, match=message):
        parse_config(argv)
    assert parse_config([]).kd_terms == "kd" and parse_config(["--task", "text-recognition"]).kd_terms == "kl"


# ----------------------------------------------------------------------------------- real runs, tiny corpus

def test_cache_key_covers_the_requested_features(tiny_demo, tmp_path):
    import teacher_cache
    import train
    import utils
    from config import parse_config
    from registry import build_task
    common = [*FAST, "--dataset", tiny_demo, "--cache-dir", str(tmp_path / "cache")]
    keys = {}
    for terms in ("kd", "logit-mse", "feature", "simkd"):
        cfg = parse_config([*common, "--kd-terms", terms])
        utils.seed_everything(cfg.seed)  # the demo teacher's random weights: the same in each task, as in main
        task = build_task(cfg)
        keys[terms] = teacher_cache.cache_key(task.teacher, task.splits["train"], train.cache_extra(cfg, task, task.teacher))
    assert keys["kd"] == keys["logit-mse"] != keys["feature"] == keys["simkd"]


def test_feature_run_trains_checkpoints_and_resumes_its_projection(tiny_demo, tmp_path, monkeypatch, one_thread):
    """--kd-terms kd,feature through main.main: the projection is in the optimizer and the checkpoint, the cache holds
    the teacher's pooled features; stopped by SIGTERM inside epoch 2 and resumed, the run ends as the uninterrupted
    one (weights, projection, metrics)."""
    import main
    from safetensors.torch import load_file
    from classification import DocumentClassification
    common = ["--mode", "train", *FAST, "--dataset", tiny_demo, "--cache-dir", str(tmp_path / "cache"), "--epochs",
              "2", "--kd-terms", "kd,feature", "--feature-weight", "0.5"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert main.main([*common, "--output-dir", str(full)]) == 0
    done = torch.load(full / "latest_checkpoint.pth", weights_only=True)
    assert done["criterion"]["projection.weight"].shape == (192, 256)  # tiny LayoutLMv3 256 -> demo DiT 192
    last = done["optimizer"]["param_groups"][0]["params"][-2:]  # the criterion's come after the student's
    assert [tuple(done["optimizer"]["state"][i]["exp_avg"].shape) for i in last] == [(192, 256), (192,)]
    [path] = (tmp_path / "cache" / "teacher").glob("*.safetensors")
    tables = load_file(str(path))
    assert set(tables) == {"logits", "features"} and tables["features"].shape == (32, 192)
    rows = [json.loads(line) for line in open(full / "student_metrics.jsonl")]
    assert {"train_kd", "train_feature", "train_ce"} <= set(rows[0])

    outputs, steps = DocumentClassification.student_outputs, []

    def sigterm_in_second_epoch(self, student, batch):  # 32 pages, batch 8: 4 steps an epoch; the 6th is in epoch 2
        steps.extend([1] if student.training else [])
        if student.training and len(steps) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return outputs(self, student, batch)
    with monkeypatch.context() as patch:
        patch.setattr(DocumentClassification, "student_outputs", sigterm_in_second_epoch)
        assert main.main([*common, "--output-dir", str(stopped)]) == 143
    saved = torch.load(stopped / "latest_checkpoint.pth", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 2)
    assert main.main([*common, "--output-dir", str(stopped), "--checkpoint",
                      str(stopped / "latest_checkpoint.pth")]) == 0
    resumed = torch.load(stopped / "latest_checkpoint.pth", weights_only=True)
    for part in ("criterion", "model"):
        assert resumed[part].keys() == done[part].keys()
        assert all(torch.equal(resumed[part][k], done[part][k]) for k in done[part]), part
    drop = TIMING
    again = [json.loads(line) for line in open(stopped / "student_metrics.jsonl")]
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows]


def word_tagging_flags(tmp_path):
    """Token classification on two generated forms with a tiny random LayoutLMv3 teacher (FUNSD's tags) and a tiny
    DistilBERT student, each with its own tokenizer: the flags of a one-epoch run."""
    from test_token_classification import TRICKY, byte_bpe, tiny_teacher_dir, wordpiece, write_funsd
    from transformers import LayoutLMv3Config
    from wordtags import FUNSD_TAGS
    data = write_funsd(tmp_path / "funsd")
    _, student_tokenizer = wordpiece(tmp_path, TRICKY)
    teacher_tokenizer, bpe_dir = byte_bpe(tmp_path)
    teacher = tiny_teacher_dir(tmp_path, bpe_dir, len(teacher_tokenizer))
    config = LayoutLMv3Config.from_pretrained(teacher)
    config.update({"id2label": dict(enumerate(FUNSD_TAGS)), "label2id": {t: i for i, t in enumerate(FUNSD_TAGS)}})
    config.save_pretrained(teacher)  # random weights with FUNSD's tags
    common = ["--task", "token-classification", "--dataset", data, "--eval-split", "test", "--tokenizer",
              student_tokenizer, "--student-config", "builtin:distilbert-base-uncased", "--student-size", "tiny",
              "--cache-dir", str(tmp_path / "cache"), "--batch-size", "2", "--lr", "1e-3", "--teacher", teacher,
              "--alpha", "0.5", "--epochs", "1"]
    return common


def test_word_tagging_feature_and_simkd_runs(tmp_path, one_thread, capsys):
    """Token classification: feature and simkd train, the cache holds the teacher's features per word (one cache for
    both, which info counts), and the simkd student is scored by --mode eval and loaded by the predict path from its
    own files."""
    import main
    from modes import predict
    from safetensors.torch import load_file
    common = word_tagging_flags(tmp_path)
    for terms in ("feature", "simkd"):
        assert main.main(["--mode", "train", *common, "--kd-terms", terms, "--output-dir", str(tmp_path / terms)]) == 0
        row = json.loads(open(tmp_path / terms / "student_metrics.jsonl").readline())
        assert row[f"train_{terms}"] > 0 and "train_kd" not in row
    [path] = (tmp_path / "cache" / "teacher").glob("*.safetensors")  # one cache: both need the same features
    tables = load_file(str(path))
    assert tables["features"].shape[0] == 2 and tables["features"].shape[1:] == (tables["logits"].shape[1], 64)
    assert main.main(["--mode", "eval", *common, "--output-dir", str(tmp_path / "simkd")]) == 0
    assert 0 <= json.load(open(tmp_path / "simkd" / "eval.json"))["f1"] <= 1
    model, _, _ = predict.load_model(str(tmp_path / "simkd" / "student"))
    assert isinstance(model.classifier, heads.SimKDHead)
    capsys.readouterr()
    assert main.main(["--mode", "info", *common, "--output-dir", str(tmp_path / "simkd")]) == 0
    assert f"{tmp_path / 'cache' / 'teacher'}: 1 caches" in capsys.readouterr().out


def test_word_tagging_attention_run_trains_and_caches_word_maps(tmp_path, one_thread):
    """--kd-terms kd,attention: the run trains both terms, the cache stores the teacher's word x word maps (float16,
    rows of each form renormalisable: its real words' rows hold probability), a second run reads the cache, and a
    run with the live teacher gets the same term (up to the cache's precision)."""
    import main
    from safetensors.torch import load_file
    common = [*word_tagging_flags(tmp_path), "--kd-terms", "kd,attention"]
    rows = {}
    for run, flags in (("first", []), ("again", []), ("live", ["--no-teacher-cache"])):
        assert main.main(["--mode", "train", *common, *flags, "--output-dir", str(tmp_path / run)]) == 0
        rows[run] = json.loads(open(tmp_path / run / "student_metrics.jsonl").readline())
        assert rows[run]["train_attention"] > 0 and rows[run]["train_kd"] > 0
    assert rows["live"]["train_attention"] == pytest.approx(rows["first"]["train_attention"], rel=1e-2)
    [path] = (tmp_path / "cache" / "teacher").glob("*.safetensors")  # the second run reused it
    tables = load_file(str(path))
    words = tables["logits"].shape[1]
    assert set(tables) == {"logits", "attention"} and tables["attention"].dtype == torch.float16
    assert tables["attention"].shape == (2, words, words) and bool((tables["attention"].float().sum(-1) > 0).any())


def test_page_attention_run_with_a_teacher_reading_the_students_tokens(tiny_demo, tmp_path, one_thread):
    """A LayoutLMv3 teacher reading the student's tokens: text x text maps, cached at the longest page's tokens."""
    import main
    from safetensors.torch import load_file
    assert main.main(["--mode", "train", *FAST, "--dataset", tiny_demo, "--cache-dir", str(tmp_path / "cache"),
                      "--teacher", "demo-layoutlmv3", "--kd-terms", "kd,attention", "--epochs", "1",
                      "--output-dir", str(tmp_path / "run")]) == 0
    assert json.loads(open(tmp_path / "run" / "student_metrics.jsonl").readline())["train_attention"] > 0
    [path] = (tmp_path / "cache" / "teacher").glob("*.safetensors")
    maps = load_file(str(path))["attention"]
    assert maps.dtype == torch.float16 and maps.shape[0] == 32 and maps.shape[1] == maps.shape[2] <= 64


def test_attention_refuses_a_teacher_that_reads_no_words(tiny_demo, tmp_path):
    from config import UserError, parse_config
    from registry import build_task
    cfg = parse_config([*FAST, "--dataset", tiny_demo, "--cache-dir", str(tmp_path / "cache"), "--kd-terms",
                        "kd,attention"])
    with pytest.raises(UserError, match="--kd-terms attention compares text-token attention maps, and the teacher .* "
                                        "reads no words"):
        build_task(cfg)


# ----------------------------------------------------------------------------------- several teachers

def test_teacher_ensemble_averages_probabilities():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 6, generator=g) * 3, torch.randn(4, 6, generator=g) * 3
    T = 2.0
    mixed = kd_terms.TeacherEnsemble([nn.Linear(1, 1), nn.Linear(1, 1)], [None, None], [1.0, 3.0], T, list("abcdef"))
    expected = 0.25 * torch.softmax(a / T, -1) + 0.75 * torch.softmax(b / T, -1)
    assert torch.allclose(torch.softmax(mixed.combine([a, b]) / T, -1), expected, atol=1e-6)
    twins = kd_terms.TeacherEnsemble([nn.Linear(1, 1), nn.Linear(1, 1)], [None, None], [1.0, 1.0], T, list("abcdef"))
    labels = torch.tensor([0, 1, 2, 3])
    one, two = (DistillationLoss(T, 0.7)(torch.zeros(4, 6), t, labels) for t in (a, twins.combine([a, a])))
    assert one["kd"].item() == pytest.approx(two["kd"].item(), rel=1e-5, abs=1e-7)


def test_two_identical_teachers_teach_as_one(tiny_demo, tmp_path, one_thread):
    """--teacher D --teacher D (a saved demo teacher) trains the student as --teacher D does: the same metrics up to
    float rounding; eval scores against the ensemble."""
    import main
    import utils
    from config import parse_config
    from registry import build_task
    common = ["--mode", "train", *FAST, "--dataset", tiny_demo, "--cache-dir", str(tmp_path / "cache"), "--epochs",
              "1", "--teacher-precision", "float32"]
    cfg = parse_config(common)
    utils.seed_everything(cfg.seed)
    task = build_task(cfg)
    task.teacher.save_pretrained(tmp_path / "teacher")
    task.teacher_processor.save_pretrained(tmp_path / "teacher")
    teacher = str(tmp_path / "teacher")
    assert main.main([*common, "--teacher", teacher, "--output-dir", str(tmp_path / "one")]) == 0
    assert main.main([*common, "--teacher", teacher, "--teacher", teacher, "--teacher-weights", "1,2",
                      "--output-dir", str(tmp_path / "two")]) == 0
    one, two = (json.loads(open(tmp_path / run / "student_metrics.jsonl").readline()) for run in ("one", "two"))
    for key in ("train_kd", "train_ce", "train_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert two["val_accuracy"] == one["val_accuracy"]
    assert len(list((tmp_path / "cache" / "teacher").glob("*.safetensors"))) == 2  # the ensemble has its own cache
    eval_args = [*common[2:], "--mode", "eval", "--teacher", teacher, "--teacher", teacher]
    assert main.main([*eval_args, "--output-dir", str(tmp_path / "two")]) == 0
    assert 0 <= json.load(open(tmp_path / "two" / "eval.json"))["teacher_agreement"] <= 1


def test_resume_from_a_checkpoint_written_before_classification_read_kd_terms(tiny_demo, tmp_path, one_thread):
    """A page-classification checkpoint from before --kd-terms applied to it recorded kd_terms 'kl' (then the
    default, ignored) and no teacher settings: it resumes as the kd run it was; another term is refused by name."""
    import hashlib

    import checkpoints
    import main
    from config import UserError, parse_config
    argv = ["--mode", "train", *FAST, "--dataset", tiny_demo, "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
            "--output-dir", str(tmp_path / "run")]
    assert main.main(argv) == 0
    checkpoint = torch.load(tmp_path / "run" / "latest_checkpoint.pth", weights_only=True)
    for key in ("extra_teachers", "teacher_weights"):
        checkpoint["settings"].pop(key)
    checkpoint["settings"]["kd_terms"] = "kl"
    old_keys = [k for k in checkpoints.RESUME_KEYS if k in checkpoint["settings"]]
    blob = json.dumps({k: checkpoint["settings"][k] for k in old_keys}, sort_keys=True)
    checkpoint["fingerprint"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    torch.save(checkpoint, tmp_path / "old.pth")
    assert checkpoints.load_checkpoint(str(tmp_path / "old.pth"), parse_config(argv), "student")
    with pytest.raises(UserError, match="kd_terms: 'kd' in checkpoint, 'logit-mse' now"):
        checkpoints.load_checkpoint(str(tmp_path / "old.pth"), parse_config([*argv, "--kd-terms", "logit-mse"]),
                                    "student")


def test_several_teachers_in_flags_config_files_and_the_sweeps_command(tmp_path):
    import shlex

    from modes import sweep
    from config import parse_config
    cfg = parse_config(["--teacher", "a", "--teacher", "b", "--teacher-weights", "1,2"])
    assert (cfg.teacher, cfg.extra_teachers, cfg.teacher_weights) == ("a", ["b"], "1,2")
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps(cfg.to_file()))
    assert parse_config(["--config", str(path)]).extra_teachers == ["b"]
    assert parse_config(["--config", str(path), "--teacher", "c", "--teacher-weights", "1"]).extra_teachers == []
    study = parse_config(["--mode", "sweep", "--sweep", "alpha=0.5,0.7", "--teacher", "a", "--teacher", "b"])
    command = sweep.train_command(study, {"alpha": 0.5}, str(tmp_path / "x"))
    again = parse_config(shlex.split(command)[2:])
    assert (again.teacher, again.extra_teachers) == ("a", ["b"])
