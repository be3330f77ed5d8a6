"""A TrOCR-style student for --task text-recognition: a VisionEncoderDecoderModel trained with cross-entropy on the
tokenised transcript (teacher forcing), and sequence-level KD on the teacher's transcript.

--student-config DIR (or a hub id) holds a VisionEncoderDecoder config.json, with model.safetensors to start from
those weights (random init otherwise) and the tokenizer files; without tokenizer files a character-level tokenizer
over the student's ASCII charset is built (`tokenizers` WordLevel, as a PreTrainedTokenizerFast) and saved with the
student. The student reads the degraded crop (--degrade-*) at its image processor's size (trocr.image_spec).

    loss = (1 - alpha) * CE(labels) + alpha * CE(teacher's transcript)        (--kd-terms seq; alpha 0: CE alone)

CE is the mean over target tokens (the transcript's tokens, then eos) of -log p(token | image, previous tokens),
over the crops that have a transcript; the teacher's term covers every crop (unlabelled ones only get it). The
teacher's transcript is the greedy path of its folded per-step distribution (any text-recognition teacher: PP-OCR,
transcripts, TrOCR), so this works across different tokenizers (TrOCR-large -> TrOCR-small). Predictions are greedy
generate() (--max-new-tokens), decoded, folded, and scored by the same CER/WER as the CRNN's.

Hooks for the generic loop: student_outputs -> {"logits", "forced", "decode"}: "forced" the teacher-forced logits on
the labels, "decode" a function scoring other targets with the same encoder pass, "logits" what is scored (the forced
logits while training, the greedy token ids [B, L] in eval mode); student_logits -> the greedy token ids.
"""
import json
import logging
import os

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

import config
import models
import saved
from config import UserError
from losses import DistillationLoss, logits_of
from textrec import ctc_kd, data, task, trocr

log = logging.getLogger("docdistill")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def char_tokenizer():
    """A character-level tokenizer over the student's ASCII charset: <pad> <s> </s> <unk>, then the characters."""
    vocab = {token: i for i, token in enumerate(list(SPECIALS) + list(data.STUDENT_CHARS))}
    tokenizer = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # every character is a token
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def student_source(cfg):
    """The directory or hub id of this run's VisionEncoderDecoder student, or None (the CRNN student).

    eval and bench read the saved student (--model, default OUTPUT_DIR/student_model.pth); training reads
    --student-config (its default, a LayoutLMv3 hub id for the other tasks, is never asked about)."""
    if cfg.mode in ("eval", "bench", "info"):
        directory = saved.student_directory(cfg.model or os.path.join(cfg.output_dir, "student_model.pth"))
        if os.path.isdir(directory) and trocr.is_vision_encoder_decoder(directory):
            return directory
    if cfg.student_config != config.Config.student_config and trocr.is_vision_encoder_decoder(cfg.student_config):
        return cfg.student_config
    return None


def load_student_tokenizer(source):
    """The tokenizer saved with the student, or the character-level one when the directory has none."""
    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, f)) for f in TOKENIZER_FILES):
        log.info("%s has no tokenizer files: a character-level tokenizer over the student's %d ASCII characters",
                 source, len(data.STUDENT_CHARS))
        return char_tokenizer()
    return trocr.load_tokenizer(source)


def special_ids(model, tokenizer):
    """decoder start, pad and eos ids: the model's own where set, else the tokenizer's (bos, pad, eos)."""
    cfg = model.config
    start = next((i for i in (cfg.decoder_start_token_id, tokenizer.bos_token_id, tokenizer.cls_token_id,
                              tokenizer.eos_token_id) if i is not None), None)
    pad = next((i for i in (tokenizer.pad_token_id, cfg.pad_token_id) if i is not None), None)
    eos = next((i for i in (tokenizer.eos_token_id, tokenizer.sep_token_id, cfg.eos_token_id) if i is not None), None)
    if None in (start, pad, eos):
        raise UserError("the student's tokenizer and config give no decoder start, pad or eos token: a "
                        "VisionEncoderDecoder student needs all three")
    return start, pad, eos


def build_student(source):
    """(model, tokenizer): weights from model.safetensors when the source has them, else random init (the decoder's
    vocabulary sized to the tokenizer); decoder start, pad and eos set in its config and generation config."""
    model_config = models.load_pretrained_config(source)
    tokenizer = load_student_tokenizer(source)
    if trocr.has_safetensors(source):
        model, _ = trocr.load_model(source, model_config)
        if model.config.decoder.vocab_size < len(tokenizer):
            raise UserError(f"the student {source}'s decoder has {model.config.decoder.vocab_size} tokens and its "
                            f"tokenizer {len(tokenizer)}: give the tokenizer its weights were trained with")
    else:
        trocr.refuse_pickled_weights(source)
        model_config.decoder.vocab_size = len(tokenizer)
        model = VisionEncoderDecoderModel(model_config)
    start, pad, eos = special_ids(model, tokenizer)
    for target in (model.config, model.generation_config):
        target.decoder_start_token_id, target.pad_token_id, target.eos_token_id = start, pad, eos
    return model, tokenizer


def token_ce(logits, targets):
    """Mean over the target tokens (not IGNORE_INDEX) of -log softmax(logits)[target]; 0 without any."""
    if not bool((targets != data.IGNORE_INDEX).any()):
        return logits.sum() * 0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=data.IGNORE_INDEX)


def pad_rows(rows, device):
    labels = torch.full((len(rows), max(1, max(map(len, rows), default=0))), data.IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return labels.to(device)


class Seq2SeqDistillationLoss(DistillationLoss):
    """criterion(student_out, teacher_out, batch) -> {"total", "ce", "seq"}: the skeleton of losses.py with the
    token CE on the labels (crops with a transcript) as the hard term and CE on the teacher's greedy transcript, in
    the student's tokens, as the teacher's term (every crop)."""

    def __init__(self, alpha, terms, with_teacher, tokenize):
        super().__init__(alpha=alpha if with_teacher else 0.0, terms=terms if with_teacher and alpha > 0 else ())
        self.tokenize = tokenize

    def teacher_targets(self, teacher_logp, lengths):
        """The teacher's transcripts (greedy paths of its per-step distributions) as student target ids + eos."""
        paths = ctc_kd.greedy_targets(teacher_logp.float(), lengths)[2]
        return pad_rows([self.tokenize(data.decode(p)) for p in paths], teacher_logp.device)

    def rows(self, batch):
        return batch["has_label"].bool()

    def hard_term(self, student_out, batch, labelled):
        return token_ce(student_out["forced"][labelled], batch["decoder_labels"][labelled])

    def teacher_terms(self, student_out, teacher_out, batch, labelled):
        targets = self.teacher_targets(logits_of(teacher_out), batch["step_mask"].sum(1))
        return {"seq": token_ce(student_out["decode"](targets), targets)}


class TrOCRRecognition(task.TextRecognition):
    """Text recognition with a VisionEncoderDecoder student (data, teacher, metrics and eval: TextRecognition's)."""

    @classmethod
    def accepts(cls, cfg):
        return student_source(cfg) is not None

    def __init__(self, cfg, train_teacher=False, model_labels=None):
        self.source = student_source(cfg)
        terms = [t for t in cfg.kd_terms.split(",") if t and t != "seq"]
        if cfg.uses_teacher and terms:
            raise UserError(f"--kd-terms {','.join(terms)} needs per-time-step CTC outputs, which the "
                            f"VisionEncoderDecoder student {self.source} does not have: use --kd-terms seq "
                            f"(sequence-level KD: cross-entropy on the teacher's transcript)")
        super().__init__(cfg, train_teacher)

    def build_student(self, cfg):
        model, self.tokenizer = build_student(self.source)
        self.spec = trocr.image_spec(self.source, model.config)
        self.start, self.pad, self.eos = special_ids(model, self.tokenizer)
        return model

    def make_collator(self, cfg, **kw):
        return super().make_collator(cfg, student_image=self.spec.array, tokenize=self.tokenize)

    def tokenize(self, text):
        """A transcript as target ids: its tokens (no special tokens), then eos."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos]

    def shift(self, targets):
        """Decoder inputs for teacher forcing: the start token, then the targets but the last (IGNORE_INDEX -> pad)."""
        inputs = torch.full_like(targets, self.pad)
        inputs[:, 0] = self.start
        inputs[:, 1:] = targets[:, :-1].masked_fill(targets[:, :-1] == data.IGNORE_INDEX, self.pad)
        return inputs

    # ------------------------------------------------------------------ forward passes, loss, predictions
    def student_logits(self, student, batch):
        """Greedy generate(): token ids [B, L], the decoder start token first (what eval and bench score)."""
        return trocr.greedy_ids(getattr(student, "module", student), batch["pixel_values"], self.cfg.max_new_tokens)

    def student_outputs(self, student, batch):
        labels = batch["decoder_labels"]
        out = student(pixel_values=batch["pixel_values"], decoder_input_ids=self.shift(labels))
        encoded = out.encoder_last_hidden_state

        def decode(targets):  # the same encoder pass, another target sequence (the teacher's transcript)
            return student(encoder_outputs=(encoded,), decoder_input_ids=self.shift(targets)).logits

        scored = out.logits if student.training else self.student_logits(student, batch)
        return {"logits": scored, "forced": out.logits, "decode": decode}

    def make_loss(self, cfg):
        return Seq2SeqDistillationLoss(cfg.alpha, cfg.kd_terms.split(","), cfg.uses_teacher, self.tokenize)

    def encoded(self, row):
        """Token ids -> student-charset ids of the folded text; a special token (start, pad, unk...) stands as one
        blank (0), so teacher-forced predictions stay aligned with the labels and never match them there."""
        out, run = [], []
        special = set(self.tokenizer.all_special_ids)
        for token in row + [None]:
            if token is not None and token not in special:
                run.append(token)
                continue
            if run:
                out += data.encode(data.fold(self.tokenizer.decode(run)))
                run = []
            if token is not None:
                out.append(data.BLANK)
        return out

    def predictions(self, logits, batch):
        """Generated ids [B, L] (eval: greedy generate) or teacher-forced logits [B, L, V] (training: argmax per
        position) -> student-charset ids [B, L'] and the labels. Each row is cut at its first eos; a generated row
        starts after the decoder start token and is decoded as generate's text is (special tokens skipped, stripped,
        folded); a teacher-forced row keeps one blank per special token, position for position."""
        generated = logits.dim() == 2
        paths = []
        for row in (logits.long() if generated else logits.argmax(-1)).tolist():
            row = row[1:] if generated else row
            row = row[:row.index(self.eos)] if self.eos in row else row
            paths.append(data.encode(data.fold(self.tokenizer.decode(row, skip_special_tokens=True).strip()))
                         if generated else self.encoded(row))
        return task.padded_predictions(paths, batch["labels"])

    # ------------------------------------------------------------------------------ save and load
    def save_pretrained(self, model, directory, role):
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        spec = self.spec
        processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                     "size": {"height": spec.height, "width": spec.width}, "resample": spec.resample,
                     "do_rescale": spec.rescale != 1.0, "rescale_factor": spec.rescale, "do_normalize": spec.normalize,
                     "image_mean": spec.mean, "image_std": spec.std}
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
            json.dump(processor, f, indent=2)

    @classmethod
    def owns_saved(cls, config):
        return config.get("model_type") == trocr.MODEL_TYPE

    @classmethod
    def student_from_saved(cls, config, weights, path):
        """A saved VisionEncoderDecoder student: its student/ directory (safetensors) or student_model.pth; the
        decoder start, pad and eos ids that generate() reads are those its config was saved with."""
        if weights is None:
            model, loaded = trocr.load_model(path)
            if not loaded:
                raise UserError(f"{path} has no model.safetensors: give the student/ directory written by --mode train")
            return model
        model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_dict(config))
        model.generation_config.update(decoder_start_token_id=config["decoder_start_token_id"],
                                       pad_token_id=config["pad_token_id"], eos_token_id=config["eos_token_id"])
        return models.load_student_weights(model, weights, path)

    def check_saved(self, config, path):
        if not self.owns_saved(config):
            raise UserError(f"{path} holds a {config.get('model_type')} model, not a VisionEncoderDecoder student")
