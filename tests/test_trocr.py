"""TrOCR (VisionEncoderDecoder) in --task text-recognition, with tiny random models built here (no pretrained TrOCR
weights are reachable offline): the teacher's transcripts against generate + decode, its image preprocessing, its
refusals (kl, a pickled checkpoint), a main.py distil -> eval run taught by it; the TrOCR-style student's loss against
a written-out cross-entropy, and a main.py run training it (TrOCR teacher -> TrOCR student) -> eval of student/."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import run_main

pytest.importorskip("onnxruntime")
from textrec import ctc_kd  # noqa: E402
from textrec import data as textrec  # noqa: E402
from textrec import trocr  # noqa: E402
from config import UserError  # noqa: E402

CHARS = textrec.STUDENT_CHARS
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer():
    """A character-level tokenizer over printable ASCII (ids: 4 specials, then the characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_ved(path, seed=0, weights=True, scale=0.3, tokenizer=True):
    """A tiny VisionEncoderDecoderModel (ViT 32 hidden, 1 layer, 32 x 64 images, patch 8; TrOCR decoder d_model 32,
    1 layer) with a char tokenizer, saved to `path` (safetensors); weights drawn at `scale` so that it writes text."""
    from transformers import TrOCRConfig, ViTConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel
    encoder = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        image_size=[32, 64], patch_size=8)
    decoder = TrOCRConfig(vocab_size=len(SPECIALS) + len(CHARS), d_model=32, decoder_layers=1,
                          decoder_attention_heads=2, decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    if weights:
        model.save_pretrained(str(path))
    else:
        config.save_pretrained(str(path))
    if tokenizer:
        char_tokenizer().save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_ved(tmp_path_factory.mktemp("trocr") / "teacher")


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Rendered words: train/validation/test JSONL, one training crop without transcript."""
    root = tmp_path_factory.mktemp("crops")
    words = ["form", "date", "total", "name", "Fax", "page"]
    for split, chosen in (("train", words), ("validation", words[:3]), ("test", words[3:])):
        rows = []
        for k, word in enumerate(chosen):
            image = Image.new("RGB", (16 + 9 * len(word), 24), "white")
            ImageDraw.Draw(image).text((6, 6), word, fill="black")
            image.save(root / f"{split}-{k}.png")
            rows.append({"image": f"{split}-{k}.png", "text": None if split == "train" and k == 1 else word})
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(root)


def test_teacher_reads_as_generate_and_decode(teacher_dir):
    from transformers import AutoTokenizer, VisionEncoderDecoderModel
    assert trocr.is_vision_encoder_decoder(teacher_dir) and not trocr.is_vision_encoder_decoder("ppocrv4")
    teacher = trocr.TrOCRTeacher(teacher_dir, max_new_tokens=6)
    assert (teacher.spec.height, teacher.spec.width, teacher.spec.mean) == (32, 64, [0.5] * 3)
    crop = Image.new("RGB", (50, 20), "white")
    ImageDraw.Draw(crop).text((3, 4), "ok", fill="black")
    by_hand = (np.asarray(crop.resize((64, 32), Image.BILINEAR), np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(teacher.spec.array(crop), by_hand.transpose(2, 0, 1), atol=1e-6)

    pixels = torch.randn(3, 3, 32, 64)
    model = VisionEncoderDecoderModel.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    with torch.no_grad():
        ids = model.generate(pixel_values=pixels, max_new_tokens=6, do_sample=False, num_beams=1)
    expected = [textrec.fold(t.strip()) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert teacher.read(pixels) == expected and any(expected)
    # its CTC paths spell exactly those transcripts, each within its crop's own time steps
    logp = teacher(pixels, torch.tensor([40, 12, 40]), 40)
    assert logp.shape == (3, 40, len(CHARS) + 1)
    paths = ctc_kd.greedy_targets(logp, torch.tensor([40, 12, 40]))[2]
    assert [textrec.decode(p) for p in paths] == [expected[0], expected[1][:12], expected[2]]
    assert not logp[1, 12:].argmax(-1).any()  # blank past its own 12 steps


def test_teacher_refuses_pickled_weights(tmp_path):
    source = tiny_ved(tmp_path / "pickled", weights=False)
    from transformers import VisionEncoderDecoderModel
    config = trocr.models.load_pretrained_config(source)
    torch.save(VisionEncoderDecoderModel(config).state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin .* was refused, nothing in it ran"):
        trocr.TrOCRTeacher(source, max_new_tokens=4)


def test_teacher_refuses_kl_in_one_line(teacher_dir, crops, tmp_path):
    done = run_main("--mode", "train", "--task", "text-recognition", "--teacher", teacher_dir, "--dataset", crops,
                    "--output-dir", tmp_path / "run", "--cache-dir", tmp_path / "cache", "--alpha", "0.5",
                    "--kd-terms", "seq,kl")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --kd-terms kl needs per-time-step CTC")


def test_main_distils_from_trocr_teacher_and_scores_it(teacher_dir, crops, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--task", "text-recognition", "--teacher", teacher_dir, "--dataset", crops, "--output-dir", out,
              "--cache-dir", cache, "--batch-size", "3", "--max-new-tokens", "8"]
    done = run_main("--mode", "train", "--epochs", "2", "--alpha", "0.5", "--kd-terms", "seq", "--lr", "1e-3",
                    *common)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "student_metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["train_seq"] > 0
    assert "teacher logits computed once" in done.stderr
    # the cached paths spell the live teacher's transcripts of the training crops
    from safetensors.torch import load_file
    import compact_logits
    [path] = (cache / "teacher").glob("*.safetensors")
    table = compact_logits.with_compact(load_file(path))["logits"]  # 8-bit log-probabilities (--teacher-top-k 0)
    teacher = trocr.TrOCRTeacher(teacher_dir, max_new_tokens=8)
    train_rows = [json.loads(line) for line in open(f"{crops}/train.jsonl")]
    for k, row in enumerate(train_rows):
        image = Image.open(f"{crops}/{row['image']}").convert("RGB")
        clean = textrec.resize_for_teacher(image, 960)
        [text] = teacher.read(torch.from_numpy(teacher.spec.array(clean))[None])
        steps = textrec.padded_width(clean.width) // textrec.STEP
        assert textrec.decode(textrec.ctc_greedy(table[k].argmax(-1).tolist(), steps)) == text[:steps]

    done = run_main("--mode", "eval", "--eval-split", "test", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["crops"] == 3 and result["teacher_ms_per_crop"] > 0
    assert result["teacher_parameters"] == sum(p.numel() for p in teacher.model.parameters())
    assert 0 <= result["teacher_scores"]["cer"] and result["teacher_scores"]["crops"] == 3


# ------------------------------------------------------------------------------------- TrOCR-style student

def test_student_loss_against_written_out_cross_entropy():
    from textrec import teachers as ocr_teacher
    from textrec import trocr_student
    eos, offset = 2, len(SPECIALS)
    tokenize = lambda text: [offset + CHARS.index(c) for c in text] + [eos]  # noqa: E731
    torch.manual_seed(0)
    vocab = offset + len(CHARS)
    labels = trocr_student.pad_rows([tokenize("ab"), [], tokenize("c")], "cpu")
    forced = torch.randn(3, labels.shape[1], vocab)
    teacher_texts = ["ax", "hi!", ""]
    teacher = ocr_teacher.PathTeacher().paths(teacher_texts, 10)
    seen, decoded = [], torch.randn(3, 4, vocab)

    def decode(targets):
        seen.append(targets.clone())
        return decoded[:, :targets.shape[1]]

    batch = {"has_label": torch.tensor([True, False, True]), "decoder_labels": labels,
             "step_mask": torch.ones(3, 10, dtype=torch.bool)}
    alpha = 0.3
    loss = trocr_student.Seq2SeqDistillationLoss(alpha, ["seq"], True, tokenize)
    out = loss({"forced": forced, "decode": decode}, teacher, batch)

    def ce_by_hand(logits, rows):
        terms = []
        for i, row in rows:
            for t, token in enumerate(row):
                p = math_softmax(logits[i, t])
                terms.append(-np.log(p[token]))
        return sum(terms) / len(terms)

    ce = ce_by_hand(forced, [(0, tokenize("ab")), (2, tokenize("c"))])
    seq = ce_by_hand(decoded, [(i, tokenize(t)) for i, t in enumerate(teacher_texts)])
    assert [row[row >= 0].tolist() for row in seen[0]] == [tokenize(t) for t in teacher_texts]
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5) and out["seq"].item() == pytest.approx(seq, rel=1e-5)
    assert out["total"].item() == pytest.approx((1 - alpha) * ce + alpha * seq, rel=1e-5)
    # no crop with a transcript: the teacher's term alone; no teacher: the labels' cross-entropy alone
    batch["has_label"] = torch.tensor([False, False, False])
    assert loss({"forced": forced, "decode": decode}, teacher, batch)["total"].item() == \
        pytest.approx(alpha * seq, rel=1e-5)
    batch["has_label"] = torch.tensor([True, False, True])
    alone = trocr_student.Seq2SeqDistillationLoss(alpha, ["seq"], False, tokenize)
    assert alone({"forced": forced, "decode": decode}, None, batch)["total"].item() == pytest.approx(ce, rel=1e-5)


def math_softmax(logits):
    values = logits.double().numpy()
    e = np.exp(values - values.max())
    return e / e.sum()


def test_char_tokenizer_round_trip():
    from textrec import trocr_student
    tokenizer = trocr_student.char_tokenizer()
    text = "Total: $12.50 (ok)"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_main_trains_trocr_student_and_eval_loads_it(teacher_dir, crops, tmp_path):
    from transformers import AutoTokenizer, VisionEncoderDecoderModel
    # random weights in model.safetensors (so that it writes text), no tokenizer: the char tokenizer is built
    student_config = tiny_ved(tmp_path / "student-config", seed=3, tokenizer=False)
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--task", "text-recognition", "--teacher", teacher_dir, "--dataset", crops, "--output-dir", out,
              "--cache-dir", cache, "--batch-size", "3", "--max-new-tokens", "8"]
    done = run_main("--mode", "train", "--epochs", "2", "--alpha", "0.5", "--kd-terms", "seq", "--lr", "1e-4",
                    "--student-config", student_config, *common)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "student_metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["train_ce"] > 0 and rows[0]["train_seq"] > 0
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "preprocessor_config.json"):
        assert (out / "student" / name).exists(), name
    assert (out / "student_model.pth").exists() and (out / "latest_checkpoint.pth").exists()

    done = run_main("--mode", "eval", "--eval-split", "test", "--model", out / "student", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["crops"] == 3 and result["student_ms_per_crop"] > 0

    # the same scores from the saved files alone: generate on the grey crop at 32 x 64, decode, fold
    model = VisionEncoderDecoderModel.from_pretrained(str(out / "student")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out / "student"))
    truths, preds = [], []
    for row in (json.loads(line) for line in open(f"{crops}/test.jsonl")):
        clean = textrec.resize_for_teacher(Image.open(f"{crops}/{row['image']}").convert("RGB"), 960)
        grey = np.asarray(clean.convert("L").convert("RGB").resize((64, 32), Image.BILINEAR), np.float32)
        pixels = torch.from_numpy(((grey / 255 - 0.5) / 0.5).transpose(2, 0, 1).copy())[None]
        with torch.no_grad():
            ids = model.generate(pixel_values=pixels, max_new_tokens=8, num_beams=1, do_sample=False)[0, 1:].tolist()
        ids = ids[:ids.index(2)] if 2 in ids else ids
        truths.append(row["text"])
        preds.append(textrec.fold(tokenizer.decode(ids, skip_special_tokens=True).strip()))
    assert any(preds) and result["student"] == pytest.approx(textrec.text_metrics(truths, preds))
