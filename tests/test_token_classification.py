"""Token classification (FUNSD): BIO tags, word alignment across two tokenizers, the per-word loss, metrics,
and real `main.py` teacher -> distil -> eval -> info runs on two generated forms."""
import json
import os
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import wordtags
from conftest import SHARED, run_main
from losses import IGNORE_INDEX, DistillationLoss

FORM = [  # FUNSD annotation: entities in order, each with its words
    {"label": "header", "words": [{"text": "RESEARCH", "box": [10, 10, 90, 30]},
                                  {"text": "REQUEST", "box": [95, 10, 170, 30]}]},
    {"label": "question", "words": [{"text": "DATE:", "box": [10, 50, 60, 70]}, {"text": " ", "box": [0, 0, 1, 1]}]},
    {"label": "answer", "words": [{"text": "12/05/1996", "box": [70, 50, 160, 70]}]},
    {"label": "other", "words": [{"text": "Page", "box": [10, 90, 50, 110]}, {"text": "1", "box": [55, 90, 65, 110]}]},
    {"label": "question", "words": [{"text": "Co-operative", "box": [10, 130, 110, 150]},
                                    {"text": "Café", "box": [115, 130, 160, 150]},
                                    {"text": "No.", "box": [165, 130, 195, 150]}]},
    {"label": "answer", "words": [{"text": "1234567890", "box": [10, 170, 120, 190]},
                                  {"text": "naïve", "box": [125, 170, 170, 190]}]},
]
TRICKY = ["1234567890", "Co-operative", "Café", "naïve", "DATE:", "12/05/1996", "x"]


def test_bio_tags_of_a_hand_made_form():
    words, boxes, tags = wordtags.bio_tags(FORM)
    assert words == ["RESEARCH", "REQUEST", "DATE:", "12/05/1996", "Page", "1", "Co-operative", "Café", "No.",
                     "1234567890", "naïve"]  # the blank word is dropped
    assert tags == ["B-HEADER", "I-HEADER", "B-QUESTION", "B-ANSWER", "O", "O", "B-QUESTION", "I-QUESTION",
                    "I-QUESTION", "B-ANSWER", "I-ANSWER"]
    assert boxes[3] == [70, 50, 160, 70]


def write_funsd(root, forms_per_split=2):
    """Generated forms in the original FUNSD folder layout; returns the root."""
    for s, folder in enumerate(("training_data", "testing_data")):
        os.makedirs(os.path.join(root, folder, "images"))
        os.makedirs(os.path.join(root, folder, "annotations"))
        for k in range(forms_per_split):
            page = Image.new("L", (200, 200), 255)
            draw = ImageDraw.Draw(page)
            for entity in FORM:
                for word in entity["words"]:
                    draw.text(tuple(word["box"][:2]), word["text"].strip() or "-", fill=0)
            name = f"form{s}{k}"
            page.save(os.path.join(root, folder, "images", name + ".png"))
            form = [{**e, "words": e["words"][k % 2:] or e["words"]} for e in FORM]  # two different forms
            with open(os.path.join(root, folder, "annotations", name + ".json"), "w") as f:
                json.dump({"form": form}, f)
    return str(root)


def test_funsd_folder_and_hub_layout_load_the_same(tmp_path):
    folder = wordtags.load_funsd_folder(write_funsd(tmp_path / "funsd"))
    assert {name: len(split) for name, split in folder.items()} == {"train": 2, "test": 2}
    form = folder["train"][0]
    assert form["boxes"][0] == [50, 50, 450, 150]  # pixels of a 200 x 200 page -> 0-1000
    assert [wordtags.FUNSD_TAGS[t] for t in form["ner_tags"]][:3] == ["B-HEADER", "I-HEADER", "B-QUESTION"]
    # the hub's layout (nielsr/funsd-layoutlmv3): tokens, bboxes (0-1000), ner_tags as a ClassLabel, image
    hub_features = datasets.Features({
        "id": datasets.Value("string"), "tokens": datasets.Sequence(datasets.Value("string")),
        "bboxes": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=wordtags.FUNSD_TAGS)), "image": datasets.Image()})
    hub = datasets.DatasetDict({name: datasets.Dataset.from_dict(
        {"id": split["id"], "tokens": split["words"], "bboxes": split["boxes"], "ner_tags": split["ner_tags"],
         "image": split["image"]}, features=hub_features) for name, split in folder.items()})
    converted, tags = wordtags.from_hub_layout(hub)
    assert tags == wordtags.FUNSD_TAGS
    for name in folder:
        for column in ("id", "words", "boxes", "ner_tags"):
            assert converted[name][column] == folder[name][column]


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "data", "funsd")), reason="../shared/data/funsd absent")
def test_real_funsd_folder():
    data = wordtags.load_funsd_folder(wordtags.funsd_root(os.path.join(SHARED, "data", "funsd")))
    assert (len(data["train"]), len(data["test"])) == (149, 50)
    form = data["test"][0]
    assert len(form["words"]) == len(form["boxes"]) == len(form["ner_tags"]) > 0
    assert all(0 <= v <= 1000 for box in form["boxes"] for v in box)


def wordpiece(tmp_path, words):
    """A small uncased WordPiece tokenizer (DistilBERT's kind) whose vocabulary splits words into pieces."""
    from transformers import DistilBertTokenizerFast
    pieces = {"12", "##34", "##56", "##7890", "co", "-", "operative", "cafe", "naive", "date", ":", "/", "05",
              "1996", "research", "request", "page", "1", "no", ".", "x"}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(pieces)
    tokenizer = DistilBertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    tokenizer.save_pretrained(tmp_path / "wordpiece")
    return tokenizer, str(tmp_path / "wordpiece")


def byte_bpe(tmp_path):
    """A small byte-level BPE tokenizer (LayoutLMv3's kind), trained on the form's words."""
    import demo_corpus as demo
    from transformers import LayoutLMv3TokenizerFast
    corpus = datasets.Dataset.from_dict({"ocr_words": [wordtags.bio_tags(FORM)[0]] * 3})
    path = demo.train_demo_tokenizer(corpus, str(tmp_path / "bpe"), vocab_size=300)
    return LayoutLMv3TokenizerFast.from_pretrained(path), path


def check_first_subtokens(positions, word_ids, n_words):
    for w, p in enumerate(positions):
        if p < 0:
            assert w not in word_ids
            continue
        assert word_ids[p] == w and w not in word_ids[:p]  # the word's first sub-token, not a later one


def both_tokenizers(tmp_path):
    tokenizers = [wordpiece(tmp_path, TRICKY)[0], byte_bpe(tmp_path)[0]]
    real = os.path.join(SHARED, "models")
    if os.path.isdir(real):  # the real DistilBERT and LayoutLMv3 tokenizers, where ../shared is present
        from transformers import AutoTokenizer, LayoutLMv3TokenizerFast
        tokenizers += [AutoTokenizer.from_pretrained(os.path.join(real, "distilbert-base-uncased")),
                       LayoutLMv3TokenizerFast.from_pretrained(os.path.join(real, "layoutlmv3-base"))]
    return tokenizers


def encode(tokenizer, words, **kw):
    if "boxes" in tokenizer.model_input_names or "bbox" in tokenizer.model_input_names:
        return tokenizer(words, boxes=[[1, 2, 3, 4]] * len(words), **kw)
    return tokenizer(words, is_split_into_words=True, **kw)


def test_first_subtoken_alignment_across_tokenizers(tmp_path):
    tokenizers = both_tokenizers(tmp_path)
    student, teacher = tokenizers[:2]
    s, t = encode(student, TRICKY), encode(teacher, TRICKY)
    s_pos = wordtags.first_subtokens(s.word_ids(), len(TRICKY))
    t_pos = wordtags.first_subtokens(t.word_ids(), len(TRICKY))
    # WordPiece: [CLS] 12 ##34 ##56 ##7890 | co - operative | cafe | naive | date : | 12 / 05 / 1996 | x
    assert s_pos == [1, 5, 8, 9, 10, 12, 17]
    assert student.convert_ids_to_tokens(s["input_ids"])[8:10] == ["cafe", "naive"]  # accents stripped
    assert s_pos != t_pos  # the two tokenizers split these words differently
    for tokenizer in tokenizers:
        enc = encode(tokenizer, TRICKY)
        check_first_subtokens(wordtags.first_subtokens(enc.word_ids(), len(TRICKY)), enc.word_ids(), len(TRICKY))
    # beyond the token limit a word has no position: it is dropped, not read at a wrong token
    short = encode(student, TRICKY, truncation=True, max_length=8)
    assert wordtags.first_subtokens(short.word_ids(), len(TRICKY)) == [1, 5, -1, -1, -1, -1, -1]


def token_batch():
    """Two forms as the collator sees them: student/teacher tokens, word positions (-1 = dropped), tags."""
    pixels = np.zeros((3, 4, 4), np.uint8)
    docs = [dict(index=0, ner_tags=[1, 2, 0, 3], input_ids=[2, 5, 6, 7, 8, 9, 3], word_pos=[1, 2, 4, 5],
                 teacher_input_ids=[0, 5, 6, 7, 2], bbox=[[0, 0, 0, 0]] + [[1, 2, 3, 4]] * 3 + [[0, 0, 0, 0]],
                 teacher_word_pos=[1, 2, 3, -1], teacher_pixels=pixels),
            dict(index=1, ner_tags=[4, 0], input_ids=[2, 5, 6, 3], word_pos=[1, 2],
                 teacher_input_ids=[0, 9, 10, 11, 12, 2], bbox=[[0, 0, 0, 0]] + [[5, 6, 7, 8]] * 4 + [[0, 0, 0, 0]],
                 teacher_word_pos=[1, 3], teacher_pixels=pixels)]
    spec = {"size": [4, 4], "resample": 2, "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3}
    return wordtags.WordCollator(0, 1, spec)(docs)


def test_collator_masks_padding_and_dropped_words():
    batch = token_batch()
    assert batch["input_ids"].shape == (2, 7) and batch["teacher_input_ids"].shape == (2, 6)
    assert batch["labels"].tolist() == [[1, 2, 0, IGNORE_INDEX], [4, 0, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["teacher_attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0]
    assert batch["bbox"][1, 4].tolist() == [5, 6, 7, 8] and batch["bbox"][0, 5].tolist() == [0, 0, 0, 0]


def test_word_level_loss_against_independent_formula():
    batch = token_batch()
    g = torch.Generator().manual_seed(0)
    C, T, alpha = 7, 2.0, 0.6
    student_tokens = torch.randn(2, 7, C, generator=g) * 2
    teacher_tokens = torch.randn(2, 6, C, generator=g) * 2
    student = wordtags.at_words(student_tokens, batch["word_pos"])
    teacher = wordtags.at_words(teacher_tokens, batch["teacher_word_pos"])
    out = DistillationLoss(T, alpha)(student, teacher, batch["labels"])
    # by hand: every (student position, teacher position, tag) of a real word in both tokenisations
    words = [(0, 1, 1, 1), (0, 2, 2, 2), (0, 4, 3, 0), (1, 1, 1, 4), (1, 2, 3, 0)]
    kl = ce = 0.0
    for b, s_pos, t_pos, tag in words:
        s, t = student_tokens[b, s_pos].double(), teacher_tokens[b, t_pos].double()
        p_t, log_p_s = torch.softmax(t / T, -1), torch.log_softmax(s / T, -1)
        kl += float((p_t * (torch.log(p_t) - log_p_s)).sum())
        ce += float(-torch.log_softmax(s, -1)[tag])
    kd, ce = T * T * kl / len(words), ce / len(words)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["total"].item() == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5)
    # later sub-tokens, special tokens and padding do not count
    noisy_student, noisy_teacher = student_tokens.clone(), teacher_tokens.clone()
    noisy_student[0, [0, 3, 6]] = 1e3
    noisy_student[1, 3:] = -1e3
    noisy_teacher[0, 4:] = 1e3
    again = DistillationLoss(T, alpha)(wordtags.at_words(noisy_student, batch["word_pos"]),
                                       wordtags.at_words(noisy_teacher, batch["teacher_word_pos"]), batch["labels"])
    assert again["total"].item() == pytest.approx(out["total"].item(), rel=1e-6)


def test_strict_iob2_metrics():
    tags = wordtags.FUNSD_TAGS  # O B-HEADER I-HEADER B-QUESTION I-QUESTION B-ANSWER I-ANSWER
    labels = np.array([[3, 4, 5, 6, 0, IGNORE_INDEX], [1, 2, 0, 5, IGNORE_INDEX, IGNORE_INDEX]])
    preds = np.array([[3, 4, 5, 0, 0, 5], [2, 2, 0, 5, 0, 0]])
    scores = wordtags.tag_metrics(preds, labels, tags)
    # true entities: QUESTION(0:2), ANSWER(2:4), HEADER(0:2), ANSWER(3); predicted: QUESTION(0:2) right,
    # ANSWER(2) cut short, I-HEADER without B- (not an entity in strict mode), ANSWER(3) right
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert scores["accuracy"] == pytest.approx(7 / 9) and scores["words"] == 9
    assert scores["per_class"]["HEADER"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 1.0}
    assert scores["per_class"]["QUESTION"]["f1-score"] == 1.0


def test_pretrained_student_loaded_only_when_full(tmp_path):
    from transformers import AutoModelForTokenClassification, BertConfig, BertModel
    import models
    BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "encoder")
    saved = BertModel.from_pretrained(tmp_path / "encoder").embeddings.word_embeddings.weight
    full = models.build_student(AutoModelForTokenClassification, str(tmp_path / "encoder"), ["O", "B-X"], "full", 50)
    assert torch.equal(full.bert.embeddings.word_embeddings.weight, saved) and full.num_labels == 2
    tiny = models.build_student(AutoModelForTokenClassification, str(tmp_path / "encoder"), ["O", "B-X"], "tiny", 50)
    assert tiny.config.hidden_size == 256


def tiny_teacher_dir(tmp_path, tokenizer_dir, vocab_size):
    """A tiny LayoutLMv3 config (random weights) next to its tokenizer files."""
    from transformers import LayoutLMv3Config
    path = tmp_path / "teacher-config"
    os.makedirs(path)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tokenizer_dir, name), path / name)
    LayoutLMv3Config(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, coordinate_size=8, shape_size=16, input_size=32,
                     max_position_embeddings=514, type_vocab_size=1).save_pretrained(path)
    return str(path)


def test_teacher_distil_eval_info_on_two_forms(tmp_path):
    data = write_funsd(tmp_path / "funsd")
    _, student_tokenizer = wordpiece(tmp_path, TRICKY)
    teacher_tokenizer, bpe_dir = byte_bpe(tmp_path)
    teacher_config = tiny_teacher_dir(tmp_path, bpe_dir, len(teacher_tokenizer))
    common = ["--task", "token-classification", "--dataset", data, "--eval-split", "test", "--tokenizer",
              student_tokenizer, "--student-config", "builtin:distilbert-base-uncased", "--student-size", "tiny",
              "--cache-dir", tmp_path / "cache", "--batch-size", "2", "--lr", "1e-3"]
    teacher = run_main("--mode", "teacher", *common, "--teacher", teacher_config, "--epochs", "2",
                       "--output-dir", tmp_path / "t")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    trained = tmp_path / "t" / "teacher"
    student = run_main("--mode", "train", *common, "--teacher", trained, "--epochs", "2", "--alpha", "0.5",
                       "--output-dir", tmp_path / "s")
    assert student.returncode == 0, student.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "s" / "student_metrics.jsonl")]
    assert len(rows) == 2 and all(r["train_kd"] > 0 and 0 <= r["val_f1"] <= 1 for r in rows)
    result = run_main("--mode", "eval", *common, "--teacher", trained, "--output-dir", tmp_path / "s")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.load(open(tmp_path / "s" / "eval.json"))
    test_words = sum(len(w) for w in wordtags.load_funsd_folder(data)["test"]["words"])
    assert scores["documents"] == 2 and scores["words"] == test_words  # every word scored: none truncated
    for key in ("f1", "precision", "recall", "accuracy", "teacher_f1", "teacher_agreement"):
        assert 0.0 <= scores[key] <= 1.0, key
    assert set(scores["per_class"]) == {"ANSWER", "HEADER", "QUESTION"}
    assert scores["student_words_per_second"] > 0 and scores["teacher_parameters"] > 0
    assert "| QUESTION |" in open(tmp_path / "s" / "per_class.md").read()
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "s" / "student")
    assert type(model).__name__ == "DistilBertForTokenClassification" and model.config.id2label[1] == "B-HEADER"
    assert len(AutoTokenizer.from_pretrained(trained)) == len(teacher_tokenizer)
    info = run_main("--mode", "info", *common, "--teacher", trained, "--output-dir", tmp_path / "s")
    assert info.returncode == 0, info.stderr[-3000:]
    for text in ("truncated_word_share", "tag_counts", "B-HEADER", "teacher: LayoutLMv3ForTokenClassification",
                 "student: DistilBertForTokenClassification", "sample 0: form"):
        assert text in info.stdout, text
