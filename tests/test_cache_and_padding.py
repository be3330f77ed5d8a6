"""Teacher-logit cache (reuse, invalidation, equality with live logits) and lean padding."""

import pytest
import torch
from accelerate import Accelerator

import collate
import dataset
import teacher_cache
from config import parse_config


@pytest.fixture(scope="module")
def task(tiny_demo, tmp_path_factory):
    from registry import build_task
    root = tmp_path_factory.mktemp("cache")
    cfg = parse_config(["--preset", "demo", "--dataset", tiny_demo, "--max-length", "96", "--student-image-size", "64",
                        "--output-dir", str(root / "out"), "--cache-dir", str(root / "cache")])
    return build_task(cfg)


def build(task, teacher, split="train"):
    return teacher_cache.build(Accelerator(cpu=True), teacher, task.teacher_logits, task.splits[split], task.collator,
                               8, task.cfg.cache_dir)


def test_cached_logits_equal_live_logits(task):
    teacher = task.teacher.eval()
    cache = build(task, teacher)
    loader = torch.utils.data.DataLoader(task.splits["train"], batch_size=5, collate_fn=task.collator, shuffle=True)
    batch = next(iter(loader))
    with torch.no_grad():
        live = task.teacher_logits(teacher, batch)
    assert torch.allclose(cache(batch), live, atol=1e-5)


def test_cache_reused_when_nothing_changed(task, caplog):
    build(task, task.teacher.eval())
    with caplog.at_level("INFO", logger="docdistill"):
        build(task, task.teacher.eval())
    assert "reused" in caplog.text


def test_changed_teacher_or_split_gets_a_fresh_cache(task):
    teacher = task.teacher.eval()
    key = teacher_cache.cache_key(teacher, task.splits["train"])
    assert teacher_cache.cache_key(teacher, task.splits["train"]) == key
    assert teacher_cache.cache_key(teacher, task.splits["validation"]) != key
    assert teacher_cache.cache_key(teacher, task.splits["train"].select(range(5))) != key
    changed = type(teacher)(teacher.config).eval()
    changed.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        changed.classifier.bias[0] += 1e-3
    assert teacher_cache.cache_key(changed, task.splits["train"]) != key
    batch = task.collator([task.splits["train"][i] for i in range(3)])
    assert not torch.allclose(build(task, changed)(batch), build(task, teacher)(batch))


def test_changed_preprocessing_gets_a_fresh_cache(task):
    split = task.documents["train"]
    spec = dataset.image_spec(task.teacher_processor)
    other = dict(spec, size=[48, 48])
    a = dataset.preprocess_key(split, tokenizer="t", max_length=96, student=spec, teacher=spec)
    b = dataset.preprocess_key(split, tokenizer="t", max_length=96, student=spec, teacher=other)
    assert a != b


def test_dynamic_padding_gives_the_same_predictions_as_padding_to_512(task):
    student = task.student.eval()
    docs = [task.splits["validation"][i] for i in range(6)]
    lean = task.collator(docs)
    full = collate.ClassificationCollator(
        task.tokenizer.pad_token_id, task.collator.student_spec, task.collator.teacher_spec, pad_to=512)(docs)
    assert lean["input_ids"].shape[1] < full["input_ids"].shape[1] == 512
    with torch.no_grad():
        a, b = task.student_logits(student, lean), task.student_logits(student, full)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
