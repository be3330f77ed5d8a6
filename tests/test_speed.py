"""Speed II: the teacher's precision for the teacher-logit cache, lean training batches with a cached teacher,
peak memory per phase (issue #11)."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

import collate
import teacher_cache
import train
import wordtags
from config import parse_config

SPEC = {"size": [8, 8], "resample": 2, "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(scope="module")
def task(tiny_demo, tmp_path_factory):
    from registry import build_task
    root = tmp_path_factory.mktemp("speed")
    cfg = parse_config(["--preset", "demo", "--dataset", tiny_demo, "--max-length", "64", "--student-image-size", "64",
                        "--batch-size", "8", "--epochs", "1", "--output-dir", str(root / "out"),
                        "--cache-dir", str(root / "cache")])
    return build_task(cfg)


def first_batch(task, n=8):
    return task.collator([task.splits["train"][i] for i in range(n)])


def build(task, cache_dir, precision):
    return teacher_cache.build(Accelerator(cpu=True), task.teacher.eval(), task.teacher_logits, task.splits["train"],
                               task.collator, 8, str(cache_dir), precision=precision, temperature=4.0)


# ----------------------------------------------------------------------------------------- teacher precision

def test_bf16_teacher_logits_are_within_the_tolerance_of_float32(task):
    batch = first_batch(task)
    with torch.no_grad():
        exact = teacher_cache.run_teacher(task.teacher.eval(), task.teacher_logits, batch, "float32")["logits"]
        reduced = teacher_cache.run_teacher(task.teacher.eval(), task.teacher_logits, batch, "bf16")["logits"]
    assert exact.dtype == torch.float32 and reduced.dtype == torch.bfloat16  # autocast did run in bf16
    total, count = teacher_cache.precision_kl(exact, reduced, temperature=4.0)
    assert count == 8 and 0 <= total / count <= teacher_cache.KL_TOLERANCE
    # the same number, written out: sum_c p32 (log p32 - log p16) per document, averaged
    p, q = (torch.softmax(x.float() / 4.0, -1) for x in (exact, reduced))
    assert total / count == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), abs=1e-6)
    assert torch.allclose(exact, reduced.float(), atol=0.1)


def test_per_word_kl_counts_only_real_words():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(2, 3, 5, generator=g)
    reduced = exact.clone()
    reduced[1, 2, 0] += 10  # a padding word of the second form: differs, and must not count
    positions = torch.tensor([[True, True, True], [True, True, False]])
    assert teacher_cache.precision_kl(exact, reduced, 2.0, positions) == (0.0, 5)
    total, count = teacher_cache.precision_kl(exact, reduced, 2.0)
    assert count == 6 and total > 0.1


def test_the_cache_key_differs_by_teacher_precision(task):
    teacher, split = task.teacher, task.splits["train"]
    keys = {p: teacher_cache.cache_key(teacher, split, "x", p) for p in ("float32", "bf16", "fp16")}
    assert len(set(keys.values())) == 3
    assert teacher_cache.cache_key(teacher, split, "x") not in keys.values()  # a teacher without a precision
    assert teacher_cache.cache_key(teacher, split, "x", "bf16") == keys["bf16"]


def test_auto_precision_by_device_and_teacher(task):
    cpu = torch.device("cpu")
    expected = "bf16" if teacher_cache.cpu_has_native_bf16() else "float32"
    assert teacher_cache.resolve_precision("auto", task.teacher, cpu) == expected
    assert teacher_cache.resolve_precision("float32", task.teacher, cpu) == "float32"
    assert teacher_cache.resolve_precision("fp16", task.teacher, cpu) == "fp16"
    onnx_like = torch.nn.Module()  # no floating weights (the ONNX and transcript teachers): float32, always
    assert teacher_cache.resolve_precision("bf16", onnx_like, cpu) == "float32"


def test_a_bf16_cache_is_checked_logged_and_keyed_by_its_precision(task, tmp_path, caplog):
    with caplog.at_level("INFO", logger="docdistill"):
        cache = build(task, tmp_path, "bf16")
    assert "teacher precision bf16: KL(float32 || bf16) at T=4" in caplog.text and "within the tolerance" in caplog.text
    key = teacher_cache.cache_key(task.teacher, task.splits["train"], precision="bf16")
    assert os.listdir(tmp_path / "teacher") == [key + ".safetensors"]
    batch = first_batch(task)
    with torch.no_grad():
        live = task.teacher_logits(task.teacher.eval(), batch)
    cached = cache(batch)
    assert cached.dtype == torch.float32 and not torch.equal(cached, live)  # bf16 numbers, stored in float32
    assert torch.allclose(cached, live, atol=0.1)


def test_above_the_tolerance_the_cache_falls_back_to_float32(task, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(teacher_cache, "KL_TOLERANCE", 1e-15)
    with caplog.at_level("INFO", logger="docdistill"):
        cache = build(task, tmp_path, "bf16")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "teacher precision bf16 refused" in warnings[0].message
    assert "filled in float32" in warnings[0].message
    key = teacher_cache.cache_key(task.teacher, task.splits["train"], precision="float32")
    assert os.listdir(tmp_path / "teacher") == [key + ".safetensors"]
    batch = first_batch(task)
    with torch.no_grad():
        live = task.teacher_logits(task.teacher.eval(), batch)
    assert torch.allclose(cache(batch), live, atol=1e-5)
    # a float32 cache, the reference, is reused whatever precision is asked for next
    caplog.clear()
    with caplog.at_level("INFO", logger="docdistill"):
        build(task, tmp_path, "bf16")
    assert "reused" in caplog.text and "(teacher precision float32)" in caplog.text and "KL" not in caplog.text


def test_non_finite_reduced_precision_outputs_are_computed_in_float32(task, tmp_path, caplog):
    """fp16 can overflow: inf logits in the checked sample refuse the precision; in a later batch, that batch is
    computed again in float32."""
    def overflowing(after):
        calls = []

        def forward(teacher, batch):
            out = task.teacher_logits(teacher, batch)
            if torch.is_autocast_enabled("cpu"):
                calls.append(1)
                if len(calls) > after:
                    out = out.clone()
                    out[0, 0] = float("inf")
            return out
        return forward

    def build_with(forward, cache_dir):
        return teacher_cache.build(Accelerator(cpu=True), task.teacher.eval(), forward, task.splits["train"],
                                   task.collator, 8, str(cache_dir), precision="bf16", temperature=4.0)

    with caplog.at_level("INFO", logger="docdistill"):
        cache = build_with(overflowing(after=0), tmp_path / "a")  # from the first batch of the sample on
    assert "teacher precision bf16 refused" in caplog.text and " is inf nats" in caplog.text
    assert torch.isfinite(cache.logits).all() and os.listdir(tmp_path / "a" / "teacher") == [
        teacher_cache.cache_key(task.teacher, task.splits["train"], precision="float32") + ".safetensors"]
    caplog.clear()
    with caplog.at_level("INFO", logger="docdistill"):
        cache = build_with(overflowing(after=teacher_cache.SAMPLE_BATCHES), tmp_path / "b")  # the sample passes
    assert "within the tolerance" in caplog.text
    assert "gave non-finite outputs on 2 batches after the check" in caplog.text  # 32 documents: batches 3, 4
    assert torch.isfinite(cache.logits).all()


def test_the_check_decides_early_when_the_kl_is_far_from_the_tolerance():
    tiny, near = torch.full((4,), 1e-6), torch.full((4,), 1e-3)
    assert teacher_cache.check_verdict([tiny]) == "pass"  # 4 pages of bf16-sized KL: decided
    assert teacher_cache.check_verdict([near + torch.tensor([1e-5, -1e-5, 2e-5, -2e-5])]) == ""  # at the tolerance
    assert teacher_cache.check_verdict([torch.full((4,), 1e-2)]) == "refuse"
    assert teacher_cache.check_verdict([tiny, torch.tensor([math.inf])]) == "refuse"  # fp16 overflowed


def test_auto_races_int8_only_where_bf16_has_no_amx(monkeypatch):
    cpu = torch.device("cpu")
    teacher = torch.nn.Linear(2, 2)
    monkeypatch.setattr(teacher_cache, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(teacher_cache, "cpu_has_int8", lambda: True)
    monkeypatch.setattr(teacher_cache, "cpu_has_amx_bf16", lambda: True)
    assert teacher_cache.candidate_precisions("auto", teacher, cpu) == ["bf16"]
    assert teacher_cache.candidate_precisions("int8", teacher, cpu) == ["int8"]  # asked for: checked, used
    monkeypatch.setattr(teacher_cache, "cpu_has_amx_bf16", lambda: False)
    assert teacher_cache.candidate_precisions("auto", teacher, cpu) == ["bf16", "int8"]


def test_auto_changes_the_soft_targets_only_for_a_clear_gain():
    """A precision is kept over a more exact one only when it is RACE_MARGIN faster (a few batches' timings are
    noisy: on a busy machine the demo's race once gave float32 0.0849, bf16 0.086, int8 0.0835 s a page)."""
    kls = {"float32": 0.0, "bf16": 6e-6, "int8": 9.85e-4}
    busy = {"float32": 0.0849, "bf16": 0.086, "int8": 0.0835}
    assert teacher_cache.race_winner(busy, kls, ["bf16", "int8"]) == "float32"
    quiet = {"float32": 0.071, "bf16": 0.0399, "int8": 0.172}
    assert teacher_cache.race_winner(quiet, kls, ["bf16", "int8"]) == "bf16"
    assert teacher_cache.race_winner({**quiet, "int8": 0.03}, kls, ["bf16", "int8"]) == "int8"  # 1.33x faster
    assert teacher_cache.race_winner({**quiet, "int8": 0.03}, kls, ["bf16"]) == "bf16"  # int8 did not pass


def test_a_precision_the_sample_cannot_show_within_the_tolerance_is_refused(task, tmp_path, caplog, monkeypatch):
    """At the tolerance, 3 standard errors are never cleared: at the sample's end it is refused, not passed on its
    mean."""
    monkeypatch.setattr(teacher_cache, "check_verdict", lambda kls: "")
    with caplog.at_level("INFO", logger="docdistill"):
        cache = build(task, tmp_path, "bf16")
    assert "teacher precision bf16 refused" in caplog.text and "not below by 3 standard errors" in caplog.text
    assert os.listdir(tmp_path / "teacher") == [
        teacher_cache.cache_key(task.teacher, task.splits["train"], precision="float32") + ".safetensors"]
    assert torch.isfinite(cache.logits).all()


def test_the_float32_reference_runs_on_as_few_pages_as_the_decision_needs(task, tmp_path):
    """Speed III: the check's float32 pages are CHECK_PAGES (bf16's KL is far below the tolerance), not the whole
    sample; the reduced precision's sample outputs are the cache's rows."""
    float32_pages = []

    def forward(teacher, batch):
        if not torch.is_autocast_enabled("cpu"):
            float32_pages.append(len(batch["index"]))
        return task.teacher_logits(teacher, batch)
    teacher_cache.build(Accelerator(cpu=True), task.teacher.eval(), forward, task.splits["train"], task.collator, 8,
                        str(tmp_path), precision="bf16", temperature=4.0)
    assert float32_pages == [teacher_cache.CHECK_PAGES]


def test_an_int8_teacher_is_checked_like_bf16_and_keyed_by_its_precision(task, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(teacher_cache, "KL_TOLERANCE", 1e9)  # a random teacher: int8 moves its soft targets a lot
    with caplog.at_level("INFO", logger="docdistill"):
        cache = build(task, tmp_path, "int8")
    assert "teacher precision int8: KL(float32 || int8) at T=4" in caplog.text
    key = teacher_cache.cache_key(task.teacher, task.splits["train"], precision="int8")
    assert os.listdir(tmp_path / "teacher") == [key + ".safetensors"]
    batch = first_batch(task)
    with torch.no_grad():
        live = task.teacher_logits(task.teacher.eval(), batch)
    assert not torch.equal(cache(batch), live) and torch.isfinite(cache(batch)).all()  # int8 numbers


def test_auto_keeps_the_fastest_precision_that_passes(task, tmp_path, caplog, monkeypatch):
    """auto races the candidates it checks: here int8 is made the fastest (the others sleep), and all pass."""
    import time as clock
    monkeypatch.setattr(teacher_cache, "KL_TOLERANCE", 1e9)
    monkeypatch.setattr(teacher_cache, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(teacher_cache, "cpu_has_amx_bf16", lambda: False)  # AVX512-BF16 only: int8 is raced too

    def forward(teacher, batch):
        if not any("quantized" in type(m).__module__ for m in teacher.modules()):  # int8: no sleep
            clock.sleep(0.06 * len(batch["index"]))
        return task.teacher_logits(teacher, batch)
    with caplog.at_level("INFO", logger="docdistill"):
        teacher_cache.build(Accelerator(cpu=True), task.teacher.eval(), forward, task.splits["train"],
                            task.collator, 8, str(tmp_path), precision="auto", temperature=4.0)
    assert "teacher precision auto: int8, the fastest that passed" in caplog.text
    assert os.listdir(tmp_path / "teacher") == [
        teacher_cache.cache_key(task.teacher, task.splits["train"], precision="int8") + ".safetensors"]


# ----------------------------------------------------------------------------------------- lean batches

def classification_docs():
    return [{"input_ids": [0, 5, 6, 2], "bbox": [[0, 0, 0, 0], [1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0]],
             "student_pixels": np.zeros((3, 8, 8), np.uint8), "teacher_pixels": np.full((3, 8, 8), 255, np.uint8),
             "label": 1, "index": 0},
            {"input_ids": [0, 7, 2], "bbox": [[0, 0, 0, 0], [9, 9, 9, 9], [0, 0, 0, 0]],
             "student_pixels": np.zeros((3, 8, 8), np.uint8), "teacher_pixels": np.zeros((3, 8, 8), np.uint8),
             "label": 0, "index": 1}]


def word_docs():
    pixels = np.zeros((3, 8, 8), np.uint8)
    return [dict(index=0, ner_tags=[1, 2], input_ids=[2, 5, 6, 3], word_pos=[1, 2], teacher_input_ids=[0, 5, 6, 2],
                 bbox=[[0, 0, 0, 0]] + [[1, 2, 3, 4]] * 2 + [[0, 0, 0, 0]], teacher_word_pos=[1, 2],
                 teacher_pixels=pixels),
            dict(index=1, ner_tags=[0], input_ids=[2, 5, 3], word_pos=[1], teacher_input_ids=[0, 9, 2],
                 bbox=[[0, 0, 0, 0], [5, 6, 7, 8], [0, 0, 0, 0]], teacher_word_pos=[1], teacher_pixels=pixels)]


def crop_items():
    from textrec import data as textrec
    return [{"image": textrec.png(Image.new("RGB", (width, 48), "white")), "width": width, "labels": [1],
             "has_label": True, "index": i, "key": f"k{i}", "n_tokens": textrec.padded_width(width) // 8}
            for i, width in enumerate((40, 400))]


def collators():
    """(name, task collator, documents) for each task: classification (also wrapped to relabel), words, crops."""
    from tasks import RelabelledCollator
    from textrec.task import Collator
    crop_cfg = type("C", (), dict(student_height=32, seed=0, degrade_height=0, degrade_blur=0.0, degrade_noise=0.0,
                                  degrade_jpeg=0, augment=False))()
    classify = collate.ClassificationCollator(1, SPEC, SPEC)
    return [("classification", classify, classification_docs()),
            ("classification relabelled", RelabelledCollator(classify, [1, 0]), classification_docs()),
            ("token classification", wordtags.WordCollator(0, 1, SPEC), word_docs()),
            ("text recognition", Collator(crop_cfg), crop_items())]


@pytest.mark.parametrize("name, collator, docs", collators(), ids=[c[0] for c in collators()])
def test_lean_batches_hold_no_teacher_pixels_and_the_same_rest(name, collator, docs):
    full = collator(docs)
    lean = collate.without_teacher_pixels(collator)(docs)
    assert "teacher_pixel_values" in full and "teacher_pixel_values" not in lean
    assert set(full) - set(lean) == {"teacher_pixel_values"}
    assert all(torch.equal(full[k], lean[k]) for k in lean)
    assert "teacher_pixel_values" in collator(docs)  # the task's own collator is left as it was


def test_training_with_a_cached_teacher_reads_lean_batches_and_logs_peak_memory(task, tmp_path, caplog):
    """One epoch of the real loop: training batches without teacher pixels (cached teacher), validation batches
    with them (the task's collator), peak memory logged per phase and in the metrics row. Without the cache the
    training batches keep the teacher's pixels."""
    seen = {True: [], False: []}

    def forward(model, batch):
        seen[model.training].append("teacher_pixel_values" in batch)
        return task.student_logits(model, batch)

    cfg = dataclasses.replace(task.cfg, output_dir=str(tmp_path / "cached"))  # --teacher-precision auto
    with caplog.at_level("INFO", logger="docdistill"):
        train.fit(cfg, task, task.student, forward)
    if teacher_cache.cpu_has_native_bf16():  # auto: bf16, checked against float32 at the run's temperature
        assert f"teacher precision bf16: KL(float32 || bf16) at T={cfg.temperature:g}" in caplog.text
    assert seen[True] and not any(seen[True])  # training: lean
    assert seen[False] and all(seen[False])  # validation: the task's collator
    for phase in ("preprocessing", "the teacher cache", "epoch 1 training", "epoch 1 evaluation"):
        assert f"peak memory after {phase}" in caplog.text, phase
    row = json.loads(open(tmp_path / "cached" / "student_metrics.jsonl").readline())
    assert row["peak_rss_mb"] > 10
    # epoch 1's row says what filling the cache cost (its seconds are in train_seconds too), and the log says it
    assert 0 < row["teacher_cache_seconds"] <= row["train_seconds"]
    checked = teacher_cache.cpu_has_native_bf16()  # only a reduced precision is checked against float32
    assert (0 < row["precision_check_seconds"] < row["teacher_cache_seconds"]) if checked else \
        row["precision_check_seconds"] == 0
    assert f"teacher logits computed once for {len(task.splits['train'])} documents" in caplog.text
    # a run that reuses the cache filled nothing: no such keys
    train.fit(dataclasses.replace(cfg, output_dir=str(tmp_path / "reused")), task, task.student, forward)
    row = json.loads(open(tmp_path / "reused" / "student_metrics.jsonl").readline())
    assert "teacher_cache_seconds" not in row and "precision_check_seconds" not in row



def test_lean_loader_reads_no_teacher_pages_in_the_same_order(task):
    """make_loader(lean=True), what fit() trains on with a cached teacher: the teacher pages are not even read
    from the preprocessed split, and the batches come in the same order; without the cache (lean=False) the
    training batches keep the teacher's pixels."""
    full = collate.make_loader(task, "train", task.cfg, shuffle=True)
    lean = collate.make_loader(task, "train", task.cfg, shuffle=True, lean=True)
    assert "teacher_pixels" in full.dataset.column_names and "teacher_pixels" not in lean.dataset.column_names
    for epoch in (0, 1):
        full.sampler.set_epoch(epoch)
        lean.sampler.set_epoch(epoch)
        a, b = list(full), list(lean)
        assert [x["index"].tolist() for x in a] == [x["index"].tolist() for x in b]
        assert all("teacher_pixel_values" in x and "teacher_pixel_values" not in y for x, y in zip(a, b))
        assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b))


def test_the_token_classification_teacher_reads_its_page_as_teacher_pixel_values():
    """The word collator's page is the teacher's (the student reads text only): it is teacher_pixel_values, so a
    live teacher reads it from the task's batches and lean batches leave it out like the other tasks'."""
    import types

    from transformers import LayoutLMv3Config, LayoutLMv3ForTokenClassification

    import classification as tasks
    config = LayoutLMv3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              input_size=8, patch_size=4, num_labels=5, vocab_size=20, coordinate_size=6, shape_size=4)
    teacher = LayoutLMv3ForTokenClassification(config).eval()
    collator = wordtags.WordCollator(0, 1, SPEC)
    owner, order = types.SimpleNamespace(), list(range(5))
    with torch.no_grad():
        logits = tasks.TokenClassification.one_teacher_logits(owner, teacher, order, collator(word_docs()))
        assert logits.shape == (2, 2, 5)
        with pytest.raises(KeyError, match="teacher_pixel_values"):
            lean = collate.without_teacher_pixels(collator)(word_docs())
            tasks.TokenClassification.one_teacher_logits(owner, teacher, order, lean)


def test_peak_memory_counts_every_process_the_command_starts(tmp_path):
    """benchmarks/peak_memory.py: a parent holding ~50 MiB starts a child holding ~200 MiB while it waits; the
    largest process is the child's, the sum over both is above either, the exit code comes back."""
    import subprocess
    import sys
    child = "import time; x = bytearray(200 * 2**20); time.sleep(1.5)"
    parent = (f"import subprocess, sys; y = bytearray(50 * 2**20); "
              f"sys.exit(subprocess.call([sys.executable, '-c', {child!r}]) + 3)")
    out = tmp_path / "peaks.json"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "peak_memory.py")
    done = subprocess.run([sys.executable, script, "--out", str(out), "--", sys.executable, "-c", parent],
                          capture_output=True, text=True)
    assert done.returncode == 3, done.stderr  # the command's own exit code
    peaks = json.load(open(out))
    assert peaks["exit_code"] == 3 and peaks["processes_seen"] >= 2
    assert 200 <= peaks["peak_single_process_mib"] < 400
    assert peaks["peak_sum_mib"] >= peaks["peak_single_process_mib"] + 50
    assert 250 <= peaks["peak_pss_sum_mib"] <= peaks["peak_sum_mib"]  # shared pages counted once
    assert "largest process" in done.stdout and "PSS sum" in done.stdout
