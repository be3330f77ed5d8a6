"""Preprocessing at scale: --num-proc gives the same cached split as one process; no pages for a teacher that
reads none."""
import os

import datasets
import pytest

import dataset
import models
from config import UserError, parse_config

SPEC = {"size": [32, 32], "resample": 2, "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3}


def test_two_processes_preprocess_the_same_split_as_one(tiny_demo, tmp_path):
    from classification import load_tokenizer
    split = datasets.load_from_disk(tiny_demo)["train"]  # 32 pages
    tokenizer = load_tokenizer("minilm", str(tmp_path))
    prepared = {n: dataset.preprocess_classification(split, tokenizer, SPEC, SPEC, 64, str(tmp_path / f"p{n}"),
                                                     desc="test", num_proc=n) for n in (1, 2)}
    one, two = (prepared[n].with_format(None) for n in (1, 2))
    assert two.features == one.features
    assert two.to_dict() == one.to_dict()
    assert [os.path.basename(f["filename"]) for f in prepared[2].cache_files] == \
        [os.path.basename(f["filename"]) for f in prepared[1].cache_files]  # one file, same name: same teacher cache
    assert sorted(os.listdir(tmp_path / "p2" / "preprocessed")) == [os.path.basename(prepared[2].cache_files[0]
                                                                                     ["filename"])]


def test_num_proc_below_one_is_one_line(tmp_path):
    with pytest.raises(UserError, match="--num-proc must be >= 1, got 0"):
        parse_config(["--num-proc", "0", "--output-dir", str(tmp_path)])


def test_a_teacher_that_reads_no_page_gets_no_teacher_pages(tiny_demo, tmp_path):
    from registry import build_task
    cfg = parse_config(["--preset", "demo", "--dataset", tiny_demo, "--teacher", "demo-minilm", "--tokenizer", "minilm",
                        "--max-length", "64", "--student-image-size", "32", "--output-dir", str(tmp_path / "out"),
                        "--cache-dir", str(tmp_path / "cache")])
    task = build_task(cfg)
    assert not models.reads_page(task.teacher)
    assert "teacher_pixels" not in task.splits["train"].column_names
    batch = task.collator([task.splits["train"][i] for i in range(2)])
    assert "teacher_pixel_values" not in batch and batch["pixel_values"].shape[-1] == 32
    assert task.teacher_logits(task.teacher.eval(), batch).shape == (2, len(task.labels))
