import os

import datasets
import pytest

import demo_corpus as demo
from config import parse_config
from modes import demo as demo_run

SIZES = dict(train_per_class=2, val_per_class=1, test_per_class=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demo") / "corpus")
    return path, demo.generate_demo_dataset(path, seed=0, **SIZES)


def raw(ds):
    """Rows with the image as its encoded PNG bytes, so pages can be compared byte for byte."""
    return ds.cast_column("image", datasets.Image(decode=False)).to_list()


def test_deterministic(corpus, tmp_path):
    _, ds = corpus
    again = demo.generate_demo_dataset(str(tmp_path / "again"), seed=0, **SIZES)
    for split in demo.SPLITS:
        assert raw(again[split]) == raw(ds[split])
    other = demo.generate_demo_dataset(str(tmp_path / "other"), seed=1, **SIZES)
    a, b = raw(ds["train"]), raw(other["train"])
    assert [r["ocr_words"] for r in a] != [r["ocr_words"] for r in b]
    assert [r["image"]["bytes"] for r in a] != [r["image"]["bytes"] for r in b]


def test_schema_and_labels(corpus):
    _, ds = corpus
    assert set(ds) == {"train", "validation", "test"}
    assert [len(ds[s]) for s in demo.SPLITS] == [32, 16, 16]
    features = ds["train"].features
    assert features["label"].names == demo.RVLCDIP_LABELS
    assert set(features) == {"image", "width", "height", "category", "ocr_words", "word_boxes", "ocr_paragraphs",
                             "paragraph_boxes", "label"}
    assert isinstance(features["image"], datasets.Image)
    for row in ds["validation"]:
        assert row["image"].mode == "L" and row["image"].size == (row["width"], row["height"]) == (demo.W, demo.H)
        assert row["category"] == demo.RVLCDIP_LABELS[row["label"]]


def test_every_class_in_every_split(corpus):
    _, ds = corpus
    for split in demo.SPLITS:
        assert set(ds[split]["label"]) == set(range(len(demo.RVLCDIP_LABELS)))


def test_words_boxes_paragraphs(corpus):
    _, ds = corpus
    for row in ds["train"]:
        words, boxes = row["ocr_words"], row["word_boxes"]
        assert len(words) == len(boxes) > 0 and all(words)
        for x0, y0, x1, y1 in boxes + row["paragraph_boxes"]:
            assert 0 <= x0 < x1 < row["width"] and 0 <= y0 < y1 < row["height"]
        # paragraphs are the OCR words of a block, in reading order
        assert " ".join(row["ocr_paragraphs"]).split() == words
        assert len(row["ocr_paragraphs"]) == len(row["paragraph_boxes"])


def test_tokenizer(corpus, tmp_path):
    from transformers import LayoutLMv3TokenizerFast
    _, ds = corpus
    out = demo.train_demo_tokenizer(ds, str(tmp_path / "tok"), vocab_size=500)
    assert sorted(os.listdir(out)) == ["merges.txt", "vocab.json"]
    tok = LayoutLMv3TokenizerFast.from_pretrained(out)
    assert [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.mask_token_id == len(tok) - 1
    row = ds["test"][0]
    boxes = [[min(1000, v) for v in box] for box in row["word_boxes"]]
    enc = tok(row["ocr_words"], boxes=boxes)
    ids = enc["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert len(enc["bbox"]) == len(ids) and enc["bbox"][1] == boxes[0]
    assert tok.unk_token_id not in tok(["Invoice", "MEMORANDUM", "tobacco"], boxes=[[1, 2, 3, 4]] * 3)["input_ids"]
    # same corpus, same tokenizer
    again = demo.train_demo_tokenizer(ds["train"], str(tmp_path / "tok2"), vocab_size=500)
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(out, name)) as a, open(os.path.join(again, name)) as b:
            assert a.read() == b.read()


def test_load_if_complete(corpus, monkeypatch):
    path, ds = corpus
    meta = os.path.join(path, "demo_meta.json")
    mtime = os.path.getmtime(meta)

    def fail(*args):
        raise AssertionError("regenerated a complete corpus")

    with monkeypatch.context() as m:
        m.setattr(demo, "make_page", fail)
        again = demo.generate_demo_dataset(path, seed=0, **SIZES)
        assert raw(again["test"]) == raw(ds["test"])
        with pytest.raises(AssertionError):  # other arguments: the corpus on disk doesn't fit, so it is rebuilt
            demo.generate_demo_dataset(path, seed=0, train_per_class=1, val_per_class=1, test_per_class=1)
    assert os.path.getmtime(meta) == mtime  # a failed rebuild leaves the old corpus in place
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".demo-tmp-")]


def test_parallel_generation_equals_serial(tmp_path):
    layout = {"train": ("unlabeled", 5)}  # 80 pages: two chunks, so two workers really share the work
    serial = demo.generate_pages(str(tmp_path / "serial"), layout, seed=0, workers=1)
    parallel = demo.generate_pages(str(tmp_path / "parallel"), layout, seed=0, workers=2)
    assert raw(serial["train"]) == raw(parallel["train"])


def test_demo_corpora_layout():
    """The teacher sees far more labelled pages than the student; the test split gives a standard error < 1.8."""
    per_class = {name: {split: n for split, (_, n) in layout.items()} for name, layout in demo.CORPORA.items()}
    assert per_class["demo-teacher"]["train"] >= 6 * per_class["demo"]["train"]
    assert per_class["demo-unlabeled"]["train"] >= 5 * per_class["demo"]["train"]
    test_pages = per_class["demo"]["test"] * len(demo.RVLCDIP_LABELS)
    assert test_pages >= 800 and 100 * (0.25 / test_pages) ** 0.5 < 1.8
    streams = [stream for layout in demo.CORPORA.values() for split, (stream, _) in layout.items()]
    # each split draws its own pages; only the validation pages are shared by student and teacher
    assert sorted(streams) == sorted(["train", "validation", "test", "teacher", "validation", "unlabeled"])


def test_streams_give_different_pages():
    pages = {stream: demo.make_page(0, stream, 3) for stream in demo.STREAMS}
    assert len({p["image"]["bytes"] for p in pages.values()}) == len(demo.STREAMS)
    assert len({p["label"] for p in pages.values()}) == 1  # index 3 is the same class in every stream


def test_paired_bootstrap():
    import numpy as np

    import stats
    a = np.zeros(800, dtype=bool)
    a[:400] = True
    b = a.copy()
    b[400:440] = True  # b is right on 40 more pages: +5 points
    s = stats.paired_bootstrap(a, b)
    assert s["difference"] == pytest.approx(0.05) and s["low"] < 0.05 < s["high"] and s["low"] > 0.03
    assert stats.paired_bootstrap(a, b) == s  # seeded
    same = stats.paired_bootstrap(a, a)
    assert same["low"] == same["high"] == 0.0


def test_demo_table_reports_every_row_and_the_spread():
    run = dict(accuracy=0.5, macro_f1=0.4, parameters=1_000_000, labelled_pages=160, unlabeled_pages=0,
               pages_per_second=90.0)
    spread = dict(difference=0.05, low=0.02, high=0.08, resamples=2000, seeds=[42, 43])
    results = {"test_pages": 800, "timings_s": {"total": 600.0},
               "teacher": dict(accuracy=0.7, macro_f1=0.6, parameters=2_000_000, labelled_pages=2048,
                               pages_per_second=40.0, reads="words and boxes", shape="6x384"),
               "runs": {"alone (seed 42)": {**run, "name": "alone"}, "alone (seed 43)": {**run, "name": "alone"},
                        "distilled (seed 42)": {**run, "name": "distilled"},
                        "distilled_unlabeled (seed 42)": {**run, "name": "distilled_unlabeled",
                                                          "unlabeled_pages": 1024, "accuracy": 0.6}},
               "spread": {k: spread for k in ("distilled_unlabeled", "distilled", "teacher")}}
    table = demo_run.demo_table(results)
    assert "800 pages" in table and "| 2048 |" in table and "| 1024 |" in table
    assert "| 90 |" in table and "| 40 |" in table and "6x384" in table
    assert "0.500 (0.500, 0.500)" in table and "+5.0 points [+2.0, +8.0]" in table and "total 600" in table


def test_paired_bootstrap_of_a_ratio_like_cer():
    """(errors, length) rows: the score is errors / length over all items, as CER is over a split."""
    import numpy as np

    import stats
    lengths = np.full(500, 10)
    a = np.stack([np.full(500, 2), lengths], 1)  # CER 0.2
    b = a.copy()
    b[:250, 0] = 1  # half the crops lose one error: CER 0.15
    s = stats.paired_bootstrap(a, b)
    assert s["difference"] == pytest.approx(-0.05) and s["low"] < -0.05 < s["high"] < -0.04
    assert stats.paired_bootstrap(a, a)["low"] == stats.paired_bootstrap(a, a)["high"] == 0.0


def test_demo_student_runs_are_configured_from_the_study_and_their_step(tmp_path):
    """Every student run of --mode demo: the demo's student (STUDENT: T 1, alpha 0.9, the study's best), then its
    step's overrides (alone: alpha 0 with an untrained teacher of the same kind; the others read the fine-tuned
    teacher), each in a folder of its own."""
    cfg = parse_config(["--preset", "demo", "--output-dir", str(tmp_path / "demo")])
    runs = [demo_run.student_config(cfg, *step) for step in demo_run.steps(cfg)]
    assert len({r.output_dir for r in runs}) == len(runs) == 5
    for (name, seed, overrides), run in zip(demo_run.steps(cfg), runs):
        assert run.mode == "train" and run.seed == seed and run.student_size == "small"
        assert run.temperature == 1.0 and run.alpha == (0.0 if name == "alone" else 0.9)
        assert run.teacher == (demo_run.TEACHER["teacher"] if name == "alone" else
                               os.path.join(str(tmp_path / "demo"), "teacher", "teacher"))
        assert run.epochs == overrides["epochs"] and (run.unlabeled == "demo-unlabeled") == (name == "distilled_unlabeled")


def test_demo_workers_fork_from_a_server_that_imported_docdistill():
    """The demo's teacher and student processes start with docdistill's modules already imported (shared with the
    fork server, not imported again in each: about 400 MB a process), in a process of their own."""
    with demo_run.worker_pool(1, None) as pool:
        pid, preloaded = pool.apply(eval, ("__import__('os').getpid(), 'torch' in __import__('sys').modules",))
    assert pid != os.getpid() and preloaded
