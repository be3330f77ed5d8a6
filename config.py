"""One plain config object: defaults, presets, a config file and command-line overrides.

Precedence: dataclass defaults < preset (a file in presets/) < --config file < flags given on the command line.
Every field is a flag (`--batch-size` for `batch_size`), its help text lives next to it, and --help shows the flags
in the groups of FLAG_GROUPS. Whether a run uses its teacher is decided once, by Config.uses_teacher.
This file is over 400 lines because every flag's help text lives in it.
"""
import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field, fields

import yaml

MODES = ("train", "eval", "info", "teacher", "bench", "demo", "predict", "export", "sweep")
SWEEP_SAMPLERS = ("grid", "tpe")
TASKS = ("sequence-classification", "token-classification", "text-recognition")
# --kd-terms of each task (text recognition: ctc_kd.KD_TERMS; the others: kd_terms.py); the first is the default
CLASSIFICATION_TERMS = ("kd", "logit-mse", "feature", "simkd", "attention")
KD_TERMS = {"text-recognition": ("kl", "seq", "feature_backbone", "feature_encoder", "feature_logits", "simkd"),
            "sequence-classification": CLASSIFICATION_TERMS, "token-classification": CLASSIFICATION_TERMS}
BAD_SAMPLE = ("fail", "skip")
STUDENT_SIZES = ("micro", "small", "tiny", "full")  # shapes in models.STUDENT_SIZES
SCHEDULERS = ("linear", "cosine", "constant")
TRACKERS = ("none", "tensorboard", "mlflow", "wandb", "trackio")
UNPINNED_TRACKERS = ("wandb", "trackio")  # handed to Accelerate when installed; not pinned, not tested here
TEACHER_PRECISIONS = ("auto", "float32", "bf16", "fp16", "int8")
READ_AS = ("auto", "crop", "page")  # --mode predict of a text-recognition student
OCR_ENGINES = ("tesseract", "ppocrv4")  # or the path of a text-recognition student or its rec_ppocr.onnx


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""


def _help(text, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class Config:
    mode: str = _help("what to do: train (distil the student), eval (score a saved student), info (describe data "
                      "and models), teacher (fine-tune/train the teacher), bench (speed and size of both), demo (teacher, "
                      "baseline, distilled student and the comparison table, with --preset demo), sweep (a study over --sweep "
                      "axes, one training run per trial, scored on validation; sweep.py)",
                      default="train")
    preset: str = _help("named set of defaults, a file presets/NAME.yaml read like --config: rvlcdip, demo, funsd, "
                        "funsd-words, sroie-lines; --config and flags given explicitly still win", default="rvlcdip")
    config: str = _help("JSON or YAML (.yaml/.yml) file of settings, keys named like the flags (batch_size or "
                        "batch-size); the *_config.json every training run writes is one, so --config "
                        "runs/x/train_config.json repeats that run; flags given on the command line win, and the "
                        "file wins over --preset", default="")
    task: str = _help("sequence-classification (one label per page), token-classification (one per word) or "
                      "text-recognition (a transcript per word or line crop, CTC)",
                      default="sequence-classification")
    teacher: str = _help("teacher: hub id or local directory of a Hugging Face model (a directory with only "
                         "config.json gives random weights); 'demo-dit' builds the small demo DiT; 'demo-layoutlmv3' a "
                         "4x128 LayoutLMv3 from random weights, 'demo-minilm' a LayoutLMv3 with MiniLM-L6's "
                         "pretrained text weights (needs --tokenizer minilm), both reading words, boxes and a "
                         "128-px page; for "
                         "token-classification a LayoutLMv3 model whose directory also holds its tokenizer; for "
                         "text-recognition 'ppocrv4' (PP-OCRv4's recogniser from rapidocr-onnxruntime), a CTC "
                         "recogniser .onnx with its charset in the `character` metadata, a JSONL of transcripts "
                         "{key, text} from any engine, or a TrOCR directory or hub id (a VisionEncoderDecoder "
                         "config.json, model.safetensors, tokenizer, optional preprocessor_config.json, e.g. "
                         "microsoft/trocr-large-printed: its greedy transcripts teach with --kd-terms seq only)",
                         default="microsoft/dit-large-finetuned-rvlcdip")
    extra_teachers: list = _help("the teachers after the first, sequence- and token-classification: give --teacher "
                                 "several times (--teacher A --teacher B) and their soft targets are averaged in "
                                 "probability space at --temperature, weighted by --teacher-weights "
                                 "(kd_terms.TeacherEnsemble); each must read the first one's inputs (its tokenizer and "
                                 "page size); --kd-terms kd only; a --config file lists them here",
                                 default_factory=list)
    teacher_weights: str = _help("weights of the teachers, comma-separated in --teacher order (normalised to sum 1; "
                                 "default: equal)", default="")
    student_config: str = _help("hub id or directory whose config the student is derived from (its embeddings/"
                                "positions are kept, the size is set by --student-size); builtin:layoutlmv3-base "
                                "and builtin:distilbert-base-uncased need no network; text-recognition: a directory or "
                                "hub id with a VisionEncoderDecoder config.json (TrOCR-style, e.g. "
                                "microsoft/trocr-small-printed) trains that student instead of the CRNN (random "
                                "init, or its model.safetensors; its tokenizer, or a character-level one over the "
                                "ASCII charset when it has none), with --kd-terms seq",
                                default="microsoft/layoutlmv3-base")
    student_size: str = _help("the student's shape, named for every task in models.STUDENT_SIZES (random weights): "
                              "micro (hidden 64, 2 layers, 2 heads, intermediate 256), small (hidden 128, 2 layers, "
                              "2 heads, intermediate 512), tiny (hidden 256, 4 layers, 4 heads, intermediate 1024), or "
                              "full (config as is; starts from the pretrained weights when --student-config is a hub "
                              "id or a directory that has them, e.g. distilbert-base-uncased); text-recognition: the "
                              "CRNN's size, micro (0.08M parameters), small (0.29M), tiny (1.0M) or full (2.6M)",
                              default="tiny")
    student_image_size: int = _help("image side the student's visual patch embedding sees (224 in LayoutLMv3; "
                                    "the demo uses 112 to fit 2 CPU cores)", default=224)
    tokenizer: str = _help("student tokenizer: hub id or local directory ('demo' = the one built from the demo "
                           "corpus, 'minilm' = MiniLM-L6's uncased WordPiece with word boxes)", default="microsoft/layoutlmv3-base")
    dataset: str = _help("hub id, save_to_disk directory, parquet/JSON file(s), folder of images with one "
                         "sub-folder per class, or 'demo' (the built-in generated corpus); for token-classification "
                         "a FUNSD folder (training_data/, testing_data/) or data with tokens, bboxes, ner_tags "
                         "(BIO) and image columns, as nielsr/funsd-layoutlmv3", default="dvgodoy/rvl_cdip_mini")
    unlabeled: str = _help("unlabelled documents for distillation: any source --dataset accepts for the task (its "
                           "'train' split, or its only split; labels or tags, if present, are ignored; "
                           "'demo-unlabeled' = the demo's pool; token-classification: a FUNSD folder or the hub "
                           "layout, ner_tags optional). They join the training split and are taught by the teacher "
                           "alone: the CE is averaged over labelled documents (words), the KD term over all of them, "
                           "an unlabelled form's over its real words (see --unlabeled-weight); text-recognition: "
                           "every crop of any source --dataset accepts (all its splits; transcripts ignored), taught "
                           "by the teacher's terms alone; mode train with alpha > 0 only; every task", default="")
    labeled_fraction: float = _help("keep the labels of this seeded share of the training split's documents (word "
                                    "crops for text recognition; 1 = all, 0 = none: the student learns from the "
                                    "teacher alone) and hide the others' labels: those are taught by the teacher "
                                    "alone, as --unlabeled documents are; with --alpha 0 (no teacher) they are left "
                                    "out, so the student trains on the same labelled share alone (0 then leaves "
                                    "nothing and is refused). To measure what distillation gives when only part of "
                                    "the data is labelled; mode train; every task", default=1.0)
    unlabeled_weight: float = _help("weight of an unlabelled document's KD term relative to a labelled one's: "
                                    "KD = (sum of labelled KL + w * sum of unlabelled KL) / all documents",
                                    default=1.0)
    train_split: str = _help("split to train on", default="train")
    eval_split: str = _help("split used for validation each epoch and by --mode eval", default="validation")
    max_samples: int = _help("use at most this many documents per split (0 = all); for quick trials", default=0)
    output_dir: str = _help("where checkpoints, metrics, plots and the resolved config go",
                            default="runs/rvlcdip")
    cache_dir: str = _help("where preprocessed data, OCR results and generated demo data are cached "
                           "(default: OUTPUT_DIR/../cache)", default="")
    epochs: int = _help("training epochs", default=6)
    batch_size: int = _help("documents per optimizer step per process, before accumulation", default=16)
    grad_accum: int = _help("gradient accumulation steps (effective batch = batch size x this x processes)",
                            default=1)
    lr: float = _help("peak learning rate of AdamW", default=3e-4)
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    scheduler: str = _help("learning-rate schedule after the warm-up (transformers' get_scheduler): linear (decay to "
                           "0), cosine (half a cosine down to 0) or constant (stay at --lr)", default="linear")
    warmup_ratio: float = _help("share of optimizer steps spent warming the learning rate up linearly from 0 to "
                                "--lr before --scheduler takes over", default=0.1)
    early_stopping_patience: int = _help("stop training after this many epochs in a row without a validation "
                                         "improvement (of the task's metric) larger than --early-stopping-min-delta; "
                                         "the best epoch's model is the one kept (0 = off, train all --epochs)",
                                         default=0)
    early_stopping_min_delta: float = _help("smallest rise of the validation metric that counts as an improvement "
                                            "for --early-stopping-patience", default=0.0)
    alpha: float = _help("weight of the distillation (KL) term: loss = alpha*T^2*KL(teacher||student) + "
                         "(1-alpha)*CE(student, labels); 0 = no distillation (plain fine-tuning), 1 = KL only; "
                         "it weighs every term of --kd-terms",
                         default=0.7)
    temperature: float = _help("softmax temperature T applied to both teacher and student logits in the KL term",
                               default=4.0)
    max_length: int = _help("token limit of the student; longer documents are truncated and the share is "
                            "reported", default=512)
    kd_terms: str = _help("distillation terms that --alpha weighs, comma-separated (default: kd, text-recognition kl). "
                          "sequence- and token-classification (kd_terms.py): kd (alpha*T^2*KL), logit-mse (MSE of the "
                          "logits), feature (MSE between the student's features through a learned linear projection "
                          "and the teacher's: the pooled representation of a page, the first sub-token of a word), "
                          "simkd (the student's head becomes a learned projection to the teacher's features and the "
                          "teacher's frozen head, saved with the student; MSE between projected and teacher features), "
                          "attention (KL(teacher || student) of the last layer's attention rows, averaged over heads, "
                          "between words' first sub-tokens, or a page's text tokens when the teacher reads the "
                          "student's tokens (not a DiT teacher), each row renormalised over the real positions); "
                          "loss = (1-alpha)*CE + alpha*(kd + logit-mse + feature-weight*(feature + simkd + "
                          "attention)); feature and simkd exclude each other. text-recognition: kl (per "
                          "time-step KL x T^2 on the CTC distributions, teacher folded onto the student's charset), "
                          "seq (CTC on the teacher's greedy transcript), feature_backbone and feature_encoder (MSE "
                          "between the student's backbone / BiLSTM features, through learned linear projections to the "
                          "teacher's widths, and PP-OCRv4's backbone / SVTR-neck outputs, standardised per step), "
                          "feature_logits (MSE of per-step log(p + 1e-4)), simkd (the CRNN's head becomes a learned "
                          "projection to the teacher's encoder width and the ONNX teacher's frozen linear head, folded "
                          "onto the student's charset, saved with the student; MSE between the projected BiLSTM "
                          "features and the teacher's SVTR-neck output, raw); loss = (1-alpha)*CTC(labels) + alpha*"
                          "(kl + seq + feature-weight*(feature terms, simkd)). With feature or attention terms the "
                          "teacher cache holds the teacher's features or its word x word / text x text maps too "
                          "(float16)", default="")
    feature_weight: float = _help("lambda, the weight of the feature terms of --kd-terms (feature, simkd, attention; "
                                  "text-recognition: feature_*, simkd) inside the alpha-weighted distillation part",
                                  default=1.0)
    blank_weight: float = _help("text-recognition: weight of the time steps whose most likely teacher class is "
                                "the CTC blank in the kl term (the others weigh 1)", default=0.1)
    label_conventions: bool = _help("text-recognition, distilling with labelled crops: measure how the labels write "
                                    "what the teacher reads (letter case, spaces inside lines, trailing punctuation; "
                                    "on up to 300 labelled training crops), log it, save it with the student, and "
                                    "teach the teacher's distribution in the labels' convention: its letters folded to "
                                    "the labels' case, and no per-step KL at a space of a label that the teacher does "
                                    "not read (textrec/conventions.py); --no-label-conventions teaches the teacher as "
                                    "it reads", default=True)
    mute_teacher_disagreements: bool = _help("text-recognition, distilling with labelled crops: on a labelled crop the "
                                             "per-step KL is silent around every character of the transcript that "
                                             "the teacher does not read (the transcript aligned to the teacher's "
                                             "distribution by CTC Viterbi; the teacher's probability of that "
                                             "character under 0.5 there), so the labels alone teach where teacher and "
                                             "labels disagree (--label-conventions does this for the conventions "
                                             "it finds only)", default=False)
    augment: bool = _help("text-recognition: augment the student's training crops, a fresh draw each epoch (a pure "
                          "function of --seed, the epoch and the crop, so a resumed run draws the same): each of "
                          "contrast and brightness, blur, noise, a lower resolution, JPEG and a small vertical shift "
                          "with probability 0.5; nothing moves a character sideways, so the student's time steps stay "
                          "the teacher's, who reads the clean crop; validation and eval crops are never augmented",
                          default=False)
    max_new_tokens: int = _help("text-recognition with a TrOCR (VisionEncoderDecoder) teacher or student: the most "
                                "tokens a greedy generate() writes per crop", default=64)
    student_height: int = _help("text-recognition: height in pixels of the student's input crops", default=32)
    max_text_width: int = _help("text-recognition: widest teacher input in pixels at height 48 (wider crops are "
                                "squeezed to it); time steps = max(320, width) / 8", default=640)
    degrade_height: int = _help("text-recognition: the student reads its crop downscaled to this height in pixels "
                                "and back up (0 = no downscaling); the teacher always reads the clean crop",
                                default=0)
    degrade_blur: float = _help("text-recognition: Gaussian blur radius in pixels on the student's crop", default=0.0)
    degrade_noise: float = _help("text-recognition: standard deviation of Gaussian pixel noise (0-255 scale) on "
                                 "the student's crop", default=0.0)
    degrade_jpeg: int = _help("text-recognition: JPEG quality the student's crop is compressed at (0 = none)",
                              default=0)
    lora_r: int = _help("rank of LoRA adapters (peft) on --lora-target-modules, in --mode teacher for the teacher and "
                        "in --mode train (and sweep) for a student that starts from pretrained weights (--student-size "
                        "full and a --student-config hub id or directory with weights; refused for a student from "
                        "random weights); the model's own weights stay frozen, the adapters and its classification "
                        "head train, and the saved model has the adapters merged in, a plain model that eval, "
                        "predict and export load as any other (they ignore this flag; 0 = off: the whole model "
                        "trains)",
                        default=0)
    lora_alpha: float = _help("LoRA scaling: the adapters' output is multiplied by lora_alpha / lora_r", default=16.0)
    lora_dropout: float = _help("dropout on the LoRA adapters' input", default=0.05)
    lora_target_modules: str = _help("comma-separated names of the linear layers that get LoRA adapters (default by "
                                     "architecture, the attention's query and value: q_proj,v_proj for DiT/BEiT and "
                                     "ViT, query,value for LayoutLMv3, q_lin,v_lin for DistilBERT)", default="")
    report_to: str = _help("experiment tracker, through Accelerate: none, tensorboard (event files in "
                           "OUTPUT_DIR/tracking/NAME, NAME student or teacher) or mlflow (an MLflow SQLite store, "
                           "OUTPUT_DIR/tracking/mlflow.db, experiment NAME, a run per start or resume; written by the "
                           "pinned mlflow-skinny, viewed with the full mlflow package's mlflow ui --backend-store-uri "
                           "sqlite:///OUTPUT_DIR/tracking/mlflow.db, see README): the config, every step's loss terms "
                           "and learning rate, every epoch's metrics; local files only. Also wandb (offline: files in "
                           "OUTPUT_DIR/tracking, unless WANDB_MODE says otherwise) and trackio, handed to Accelerate "
                           "when you have installed them (not pinned, not tested here)", default="none")
    seed: int = _help("seed for data order, initialisation and dropout", default=42)
    amp: str = _help("mixed precision: no, bf16 or fp16 (fp16 needs CUDA); the loss is always float32",
                     default="no")
    checkpoint: str = _help("resume training from this latest_checkpoint.pth", default="")
    overwrite: bool = _help("train (or --mode teacher) into an --output-dir that already holds a run, replacing it; "
                            "its files are replaced only as the new run saves its own. Without it such a directory "
                            "is refused unless --checkpoint resumes its run. The same for --mode predict "
                            "(predictions.jsonl/.csv) and export (OUTPUT_DIR/onnx/: only the export's own files are "
                            "replaced, any other file there is kept)", default=False)
    model: str = _help("student to evaluate, predict with or export (a student_model.pth or save_pretrained "
                       "directory; default: the best one in OUTPUT_DIR); --mode predict also takes the .onnx file "
                       "written by --mode export", default="")
    input: list = _help("--mode predict: image files (png, jpg, multi-page tif...), PDFs, folders (searched "
                        "recursively) or globs; several may follow the flag", default_factory=list)
    read_as: str = _help("--mode predict with a text-recognition student: auto (an image whose sides are both at "
                         "least 256 px, every PDF page among them, is a page: PP-OCRv4's text detector finds its lines "
                         "and the student reads them; a smaller image is one crop), crop (every image is one crop) or "
                         "page (every image is a page)", default="auto")
    ocr_engine: str = _help("the OCR of page classification and word tagging, for data without OCR columns and for "
                            "--mode predict: tesseract; ppocrv4 (PP-OCRv4's text detector and recogniser from "
                            "rapidocr-onnxruntime); or PP-OCRv4's detector with a distilled recogniser: a saved "
                            "text-recognition student (its student/ directory or student_model.pth) or its "
                            "rec_ppocr.onnx from --mode export. Lines are split into words at spaces, each word's box "
                            "interpolated by character position. Cached under CACHE_DIR/ocr per page and engine",
                            default="tesseract")
    top_k: int = _help("--mode predict: how many of the most likely classes (page classification) to write per "
                       "page, with their probabilities", default=3)
    pdf_dpi: int = _help("--mode predict and export: resolution PDF pages are rendered at (pypdfium2) before OCR; a "
                         "page that would have more pixels than images may have (PIL's limit, 89,478,485) is "
                         "rendered at the resolution that fits, with a warning (an image over that limit is refused "
                         "as PIL refuses it)", default=200)
    sweep: list = _help("--mode sweep: the axes of the study, one NAME=V1,V2,... per axis, several after the flag, "
                        "e.g. --sweep temperature=1,2,4,8 alpha=0,0.5,0.9 student_size=tiny,small (NAME is a flag's "
                        "name with _ or -: any setting that shapes a training run, e.g. lr, epochs, batch_size, "
                        "kd_terms; not seed, see --seeds). Each trial is a --mode train run in OUTPUT_DIR/trial-NNN scored on "
                        "--eval-split; the test split is read once at the end, for the best setting and alpha 0",
                        default_factory=list)
    sweep_sampler: str = _help("--mode sweep: grid (every combination, optuna GridSampler) or tpe (optuna's TPE "
                               "sampler, --sweep-trials trials over the axes' values)", default="grid")
    sweep_trials: int = _help("--mode sweep: number of trials of the study with --sweep-sampler tpe (0 = as many as "
                              "the grid has); ignored by grid, which runs every combination once", default=0)
    sweep_storage: str = _help("--mode sweep: Optuna storage URL of the study (default: sqlite:///OUTPUT_DIR/"
                               "sweep.db); a shared database (e.g. postgresql://... or an sqlite file on a shared "
                               "disk) lets several machines run trials of the same study with the same command",
                               default="")
    seeds: int = _help("--mode sweep: train the best setting and its alpha-0 baseline with this many seeds "
                       "(--seed, --seed+1, ...) and report the test mean and std of each; with student_size an "
                       "axis, also each size's best distilled setting and its alpha-0 baseline (validation)",
                       default=1)
    baseline_epochs: int = _help("--mode sweep: epochs of every alpha-0 run (trials and baselines; 0 = --epochs). "
                                 "Without the teacher, unlabelled documents (--unlabeled, --labeled-fraction) are "
                                 "left out, so an alpha-0 run has fewer steps per epoch and may need more epochs",
                                 default=0)
    group_by_length: bool = _help("batch documents of similar token length together (less padding, faster)",
                                  default=True)
    teacher_cache: bool = _help("compute the teacher's logits once per split and reuse them across epochs and runs "
                                "(keyed by teacher weights, data, preprocessing and --teacher-precision); training "
                                "batches then leave the teacher's pixels out (neither read nor normalised); off = "
                                "teacher runs every step, on batches that carry its pixels", default=True)
    teacher_precision: str = _help("precision the teacher fills the teacher-logit cache in (the cached logits are "
                                   "stored in float32 either way): auto, float32, bf16 or fp16 (torch.autocast), or "
                                   "int8 (CPU: the teacher's linear layers dynamically quantised). auto tries bf16 "
                                   "where the CPU computes it natively (AVX512-BF16 or AMX) or on a CUDA GPU with "
                                   "bf16 (fp16 without it), and int8 on a CPU, and keeps the fastest that passes the "
                                   "check (timed on the check's own pages), float32 when none does; the log says "
                                   "what it picked and why. The check: each reduced precision runs on the first 2 "
                                   "batches of the training split (those outputs become their cache rows) and float32 "
                                   "on as few of those pages as the decision needs; the KL divergence at "
                                   "--temperature between the two teachers' distributions, per prediction, must stay "
                                   "below teacher_cache.KL_TOLERANCE (1e-3 nats) with 3 standard errors to spare, or "
                                   "the precision is refused with a warning. The precision used is part of the "
                                   "cache key; an existing cache of a precision tried, or of float32, is reused and "
                                   "nothing is checked again. A teacher that is not a torch model (text recognition's "
                                   "ONNX or transcript teachers) always gives float32. Not for --no-teacher-cache: a "
                                   "live teacher runs in --amp's precision (float32 by default)", default="auto")
    teacher_top_k: int = _help("text-recognition: how the teacher cache stores the per-step distributions (96 classes "
                               "after folding): 0 = every class, each log-probability in 8 bits (4x smaller than "
                               "float32; the KL term within 0.2 percent and 2e-5 nats a step of float32's, "
                               "measured on FUNSD); K = only the K most likely classes and the probability left, "
                               "shared evenly on lookup (K 8: 15x smaller, but the KL term at T 2 moves by 60 "
                               "percent: the teacher's tail matters); 96 or more = float32, every class "
                               "(docs/results/textrec-funsd.md)", default=0)
    save_every: int = _help("also save latest_checkpoint.pth every N optimizer steps (0 = only at epoch ends)",
                            default=0)
    on_bad_sample: str = _help("what to do with a document that cannot be used (unreadable image, word boxes "
                               "inverted or over 2 percent of the page outside it, a malformed text-recognition row): "
                               "fail (stop and name it) or skip (leave it out, count it and report the count). A page "
                               "without OCR words is not one: it is read from its image alone, and counted",
                               default="fail")
    num_workers: int = _help("DataLoader worker processes", default=0)
    num_proc: int = _help("processes that preprocess the data (tokenising, resizing pages) and run OCR where a "
                          "dataset has no OCR columns; the result is the same for any number (1 = this process only)",
                          default=1)
    log_every: int = _help("update the progress bar's loss every N steps", default=10)
    debug: bool = _help("show full tracebacks instead of one-line errors", default=False)

    def validate(self, given=()):
        """The config, or a UserError naming every problem. given: the flags given on the command line, refused
        where they do not apply to the task or the mode (not_applicable)."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.task not in TASKS:
            problems.append(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name in ("alpha", "temperature", "lr", "weight_decay", "warmup_ratio", "unlabeled_weight",
                     "labeled_fraction", "early_stopping_min_delta", "lora_alpha", "lora_dropout"):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{flag(name)} must be a finite number, got {getattr(self, name)}")
        problems += [problem for name, bounds in NUMERIC_BOUNDS.items()
                     if (problem := out_of_bounds(flag(name), getattr(self, name), *bounds))]
        problems += self.kd_terms_problems()
        if self.student_height % 16:
            problems.append(f"--student-height must be a multiple of 16, got {self.student_height}")
        if not 0 <= self.degrade_jpeg <= 95:
            problems.append(f"--degrade-jpeg must be in [0, 95], got {self.degrade_jpeg}")
        if self.unlabeled and self.mode == "train" and not self.uses_teacher:
            problems.append("--unlabeled needs --alpha > 0: unlabelled documents only add the distillation term")
        if self.labeled_fraction == 0 and self.mode == "train" and not self.uses_teacher:
            problems.append("--labeled-fraction 0 keeps no labels, and with --alpha 0 nothing teaches the student: "
                            "give --alpha > 0 (the teacher alone teaches) or a fraction > 0")
        problems += self.teachers_problems()
        if self.scheduler not in SCHEDULERS:
            problems.append(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.lora_r and self.mode == "demo":
            problems.append("--lora-r is for --mode teacher, train or sweep: the demo trains its models in full")
        elif self.lora_r and self.mode in ("train", "sweep"):  # the modes that read a saved model ignore it
            if reason := why_random_student(self.student_config, self.student_size, self.task):
                problems.append(f"--lora-r needs a student that starts from pretrained weights, and {reason}: use "
                                f"--student-size full with a --student-config that has weights (hub id or "
                                f"directory), or leave --lora-r out to train the student in full")
        if self.report_to not in TRACKERS:
            problems.append(f"--report-to must be one of {', '.join(TRACKERS)}, got {self.report_to!r}")
        elif self.report_to in UNPINNED_TRACKERS and importlib.util.find_spec(self.report_to) is None:
            problems.append(f"--report-to {self.report_to}: the {self.report_to} package is not installed (it is "
                            f"not one of docdistill's pinned requirements): pip install {self.report_to}, or use "
                            f"--report-to tensorboard or mlflow")
        if self.teacher_precision not in TEACHER_PRECISIONS:
            problems.append(f"--teacher-precision must be one of {', '.join(TEACHER_PRECISIONS)}, got "
                            f"{self.teacher_precision!r}")
        if self.amp not in ("no", "bf16", "fp16"):
            problems.append(f"--amp must be no, bf16 or fp16, got {self.amp!r}")
        if self.student_size not in STUDENT_SIZES:
            problems.append(f"--student-size must be one of {', '.join(STUDENT_SIZES)}, got {self.student_size!r}")
        if self.sweep_sampler not in SWEEP_SAMPLERS:
            problems.append(f"--sweep-sampler must be one of {', '.join(SWEEP_SAMPLERS)}, got {self.sweep_sampler!r}")
        if self.sweep and self.mode != "sweep":
            problems.append("--sweep gives the axes of --mode sweep: add --mode sweep, or leave --sweep out")
        if self.mode == "sweep" and not self.sweep:
            problems.append("--mode sweep needs its axes: --sweep NAME=V1,V2 [NAME=V1,V2 ...], e.g. --sweep "
                            "temperature=1,2,4 alpha=0,0.5,0.9")
        if self.on_bad_sample not in BAD_SAMPLE:
            problems.append(f"--on-bad-sample must be skip or fail, got {self.on_bad_sample!r}")
        if self.read_as not in READ_AS:
            problems.append(f"--read-as must be one of {', '.join(READ_AS)}, got {self.read_as!r}")
        if self.ocr_engine not in OCR_ENGINES and not os.path.exists(self.ocr_engine):
            problems.append(f"--ocr-engine {self.ocr_engine}: not {' or '.join(OCR_ENGINES)} and no such file or "
                            f"directory (a text-recognition student or its rec_ppocr.onnx)")
        for name in ("checkpoint", "model"):  # checked now rather than after an hour of preprocessing
            if getattr(self, name) and not os.path.exists(getattr(self, name)):
                problems.append(f"--{name} {getattr(self, name)}: no such file or directory")
        for name in ("output_dir", "cache_dir"):
            if os.path.isfile(getattr(self, name)):
                problems.append(f"{flag(name)} {getattr(self, name)} is a file, not a directory")
        problems += [problem for name in given if (problem := self.not_applicable(name))
                     and not any(flag(name) in earlier for earlier in problems)]  # said already, more precisely
        if problems:
            raise UserError("; ".join(problems))
        return self

    def not_applicable(self, name):
        """Why the flag `name`, given with a value other than its default, does not apply to this run's task or mode
        (FLAG_TASKS, FLAG_MODES), or ""."""
        if getattr(self, name) == defaults()[name]:
            return ""
        tasks, modes = FLAG_TASKS.get(name, TASKS), FLAG_MODES.get(name, MODES)
        if self.task in TASKS and self.task not in tasks and self.mode not in ("predict", "export"):  # those: the
            # saved student's task, whatever --task says
            return f"{flag(name)} is for --task {' or '.join(tasks)}, not {self.task}: leave it out"
        if self.mode in MODES and self.mode not in modes:
            return f"{flag(name)} is for --mode {' or '.join(modes)}, not {self.mode}: leave it out"
        return ""

    @property
    def uses_teacher(self):
        """Whether this run distils: the teacher's outputs enter the loss (--mode train with alpha > 0). The one
        place this is decided; --mode teacher trains the teacher on labels, alpha 0 trains the student alone."""
        return self.mode == "train" and self.alpha > 0

    def teachers_problems(self):
        """Several teachers: for distilling and scoring a classification student, one weight > 0 each."""
        teachers = 1 + len(self.extra_teachers)
        try:
            weights = [float(w) for w in self.teacher_weights.split(",")] if self.teacher_weights else [1.0]
        except ValueError:
            weights = []
        if self.teacher_weights and (len(weights) != teachers or not all(0 < w < math.inf for w in weights)):
            return [f"--teacher-weights must be {teachers} numbers > 0, one per --teacher, got {self.teacher_weights!r}"]
        if teachers > 1 and (self.task == "text-recognition" or self.mode in ("teacher", "demo")):
            return [f"several teachers (--teacher given {teachers} times) are for distilling (--mode train, eval, info, "
                    f"sweep) page or word classification, not --task {self.task} --mode {self.mode}"]
        return []

    def kd_terms_problems(self):
        """--kd-terms: empty means the task's default; each term one of the task's; feature and simkd apart."""
        allowed = KD_TERMS.get(self.task, ())
        self.kd_terms = self.kd_terms or ",".join(allowed[:1])
        terms = [t for t in self.kd_terms.split(",") if t]
        if any(t not in allowed for t in terms):
            return [f"--kd-terms for --task {self.task} must be a comma-separated subset of {', '.join(allowed)}, "
                    f"got {self.kd_terms!r}"]
        if "simkd" in terms and "feature" in terms:
            return ["--kd-terms: choose feature or simkd, not both (simkd's projection replaces feature's)"]
        if self.extra_teachers and terms != ["kd"]:
            return [f"--kd-terms {self.kd_terms}: with several teachers only kd (their soft targets averaged)"]
        if "simkd" in terms and self.lora_r:
            return ["--kd-terms simkd trains a new head before the teacher's: not with --lora-r"]
        return []

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_file(self):
        """The settings as a --config file that repeats this run. How the run was started is left out (the file it
        read, the checkpoint it resumed, --overwrite): repeating it must not resume the finished run or replace it
        without being asked to."""
        return {**self.to_dict(), "config": "", "checkpoint": "", "overwrite": False}

    def fingerprint(self, keys):
        """Short hash of the settings that must not change across a resume."""
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def has_weights(source):
    """Whether a model source has weights: a hub id (asked when loaded), or a directory holding WEIGHT_FILES."""
    return not os.path.isdir(source) or any(os.path.exists(os.path.join(source, f)) for f in WEIGHT_FILES)


def why_random_student(config_source, size, task="sequence-classification"):
    """Why the student of these flags starts from random weights (a --student-size shape, a builtin: config, a
    directory without weights, the CRNN of text recognition), or "" when it loads pretrained ones."""
    if task == "text-recognition":
        return "the text-recognition student (a CRNN) is built from random weights"
    if size != "full":
        return f"--student-size {size} builds the student from random weights"
    if config_source.startswith("builtin:"):
        return f"--student-config {config_source} is a config only: the student gets random weights"
    if not has_weights(config_source):
        return (f"--student-config {config_source} holds no weights ({', '.join(WEIGHT_FILES)}): the student gets "
                f"random weights")
    return ""


def defaults():
    """Every setting's default value, by name."""
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default for f in fields(Config)}


def flag(name):
    return "--" + name.replace("_", "-")


# Allowed range of every numeric flag: (minimum, maximum or None, whether the minimum itself is excluded).
NUMERIC_BOUNDS = {
    "alpha": (0, 1, False), "temperature": (0, None, True), "lr": (0, None, True), "weight_decay": (0, None, False),
    "warmup_ratio": (0, 1, False), "batch_size": (1, None, False), "grad_accum": (1, None, False),
    "epochs": (1, None, False), "max_length": (4, None, False),  # room for the special tokens and a word
    "save_every": (0, None, False), "max_samples": (0, None, False), "num_workers": (0, None, False),
    "num_proc": (1, None, False),
    "log_every": (1, None, False), "seed": (0, 2**32 - 1, False),  # NumPy's seed range
    "student_image_size": (16, None, False),  # at least one 16-pixel patch
    "student_height": (16, None, False), "max_new_tokens": (1, None, False), "max_text_width": (48, None, False),
    "degrade_height": (0, None, False),
    "degrade_blur": (0, None, False), "degrade_noise": (0, None, False), "blank_weight": (0, 1, False),
    "unlabeled_weight": (0, None, False), "early_stopping_patience": (0, None, False),
    "early_stopping_min_delta": (0, None, False), "lora_r": (0, None, False), "lora_alpha": (0, None, True),
    "lora_dropout": (0, 1, False), "sweep_trials": (0, None, False), "seeds": (1, None, False),
    "baseline_epochs": (0, None, False), "top_k": (1, None, False), "pdf_dpi": (1, None, False),
    "feature_weight": (0, None, False), "labeled_fraction": (0, 1, False),  # 0: no labels at all (needs a teacher)
    "teacher_top_k": (0, None, False),
}


def out_of_bounds(name, value, minimum, maximum, exclusive):
    """What is wrong with a numeric flag's value, or "" (non-finite numbers are reported separately)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if maximum is not None:
        low = "(" if exclusive else "["
        inside = (minimum < value if exclusive else minimum <= value) and value <= maximum
        return "" if inside else f"{name} must be in {low}{minimum}, {maximum}], got {value}"
    if exclusive:
        return "" if value > minimum else f"{name} must be > {minimum}, got {value}"
    return "" if value >= minimum else f"{name} must be >= {minimum}, got {value}"


PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")


def preset_names():
    """The presets: the .yaml files of presets/, by name."""
    return sorted(name[:-5] for name in os.listdir(PRESET_DIR) if name.endswith(".yaml"))


def preset_settings(name):
    """A preset's settings, read and checked as a --config file is."""
    if name not in preset_names():
        raise UserError(f"--preset must be one of {', '.join(preset_names())}, got {name!r}")
    return read_config_file(os.path.join(PRESET_DIR, f"{name}.yaml"))


# Flags that mean something for some tasks or modes only (the others: every one); given for another, refused.
CLASSIFICATION = ("sequence-classification", "token-classification")
TEXT_RECOGNITION = ("text-recognition",)
FLAG_TASKS = {
    **dict.fromkeys(("blank_weight", "max_new_tokens", "student_height", "max_text_width", "degrade_height",
                     "degrade_blur", "degrade_noise", "degrade_jpeg", "label_conventions", "augment",
                     "mute_teacher_disagreements"), TEXT_RECOGNITION),
    **dict.fromkeys(("tokenizer", "max_length", "teacher_weights", "unlabeled_weight", "lora_r", "lora_alpha",
                     "lora_dropout", "lora_target_modules"), CLASSIFICATION),
    **dict.fromkeys(("student_image_size", "top_k"), ("sequence-classification",)),
    "read_as": TEXT_RECOGNITION, "ocr_engine": CLASSIFICATION, "teacher_top_k": TEXT_RECOGNITION,
}
FLAG_MODES = {
    **dict.fromkeys(("input", "pdf_dpi"), ("predict", "export")), **dict.fromkeys(("top_k", "read_as"), ("predict",)),
    **dict.fromkeys(("sweep_sampler", "sweep_trials", "sweep_storage", "seeds", "baseline_epochs"), ("sweep",)),
    "model": ("eval", "bench", "predict", "export"), "checkpoint": ("train", "teacher"),
    # distillation's data: the teacher trains on labels only (--mode teacher)
    "unlabeled": ("train", "sweep", "info"), "labeled_fraction": ("train", "sweep"),
    **dict.fromkeys(("label_conventions", "augment", "mute_teacher_disagreements"), ("train", "sweep")),
}

# --help shows the flags in these groups, in this order (every field in exactly one).
FLAG_GROUPS = {
    "what to run": ("mode", "task", "preset", "config"),
    "data": ("dataset", "unlabeled", "labeled_fraction", "train_split", "eval_split", "max_samples", "max_length",
             "on_bad_sample", "ocr_engine"),
    "models": ("teacher", "extra_teachers", "teacher_weights", "student_config", "student_size", "student_image_size",
               "tokenizer", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"),
    "distillation": ("alpha", "temperature", "kd_terms", "feature_weight", "unlabeled_weight"),
    "training": ("epochs", "batch_size", "grad_accum", "lr", "weight_decay", "scheduler", "warmup_ratio",
                 "early_stopping_patience", "early_stopping_min_delta", "seed", "checkpoint", "save_every"),
    "text recognition": ("blank_weight", "label_conventions", "mute_teacher_disagreements", "augment",
                         "max_new_tokens", "student_height", "max_text_width", "degrade_height", "degrade_blur",
                         "degrade_noise", "degrade_jpeg"),
    "output and runs": ("output_dir", "cache_dir", "overwrite", "model", "input", "top_k", "read_as", "pdf_dpi",
                        "report_to", "sweep", "sweep_sampler", "sweep_trials", "sweep_storage", "seeds",
                        "baseline_epochs",
                        "log_every", "debug"),
    "speed": ("amp", "teacher_cache", "teacher_precision", "teacher_top_k", "group_by_length", "num_workers",
              "num_proc"),
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="docdistill: distil a large document model (teacher) into a small one (student).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    titles = {name: title for title, names in FLAG_GROUPS.items() for name in names}
    groups = {title: parser.add_argument_group(title) for title in FLAG_GROUPS}
    for f in fields(Config):
        group = groups[titles[f.name]]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.type in (bool, "bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{help_text} (default: {f.default})")
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            if f.name == "teacher":  # --teacher A --teacher B: the first is the teacher, the others extra_teachers
                group.add_argument(flag, action="append", default=argparse.SUPPRESS,
                                   help=f"{help_text}; give it several times for several teachers (default: "
                                        f"{f.default!r})")
                continue
            if f.type is list:  # several values after one flag
                group.add_argument(flag, nargs="+", default=argparse.SUPPRESS, help=f"{help_text} (default: none)")
                continue
            choices = {"mode": MODES, "task": TASKS, "preset": tuple(preset_names()), "on_bad_sample": BAD_SAMPLE,
                       "scheduler": SCHEDULERS, "report_to": TRACKERS, "sweep_sampler": SWEEP_SAMPLERS,
                       "teacher_precision": TEACHER_PRECISIONS, "read_as": READ_AS}.get(f.name)
            group.add_argument(flag, type=kind, choices=choices, default=argparse.SUPPRESS,
                               help=f"{help_text} (default: {f.default!r})")
    return parser


class DuplicateKey(ValueError):
    """A key given twice in a config file: which value was meant is not known, so the file is refused."""


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that run code), refusing a mapping that gives a key twice."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise DuplicateKey(f"{', '.join(twice)} given twice (line {node.start_mark.line + 1})")
        return super().construct_mapping(node, deep)


def unique_pairs(pairs):
    """json.load's object_pairs_hook: a dict, refusing a key given twice."""
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise DuplicateKey(f"{', '.join(twice)} given twice")
    return dict(pairs)


def read_config_file(path):
    """The settings in a --config file (JSON, or YAML by its extension), checked against Config's fields; a key
    given twice is refused."""
    is_yaml = path.endswith((".yaml", ".yml"))
    try:
        with open(path) as f:
            settings = yaml.load(f, Loader=UniqueKeyLoader) if is_yaml else json.load(f, object_pairs_hook=unique_pairs)
    except DuplicateKey as e:
        raise UserError(f"--config {path}: {e}: keep one") from e
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror}") from e
    except (ValueError, yaml.YAMLError) as e:  # ValueError: json.JSONDecodeError, or not UTF-8
        raise UserError(f"--config {path} is not valid {'YAML' if is_yaml else 'JSON'}: "
                        f"{str(e).splitlines()[0]}") from e
    if not isinstance(settings, dict):
        raise UserError(f"--config {path} must hold a mapping of settings (flag names to values)")
    settings = {str(key).replace("-", "_"): value for key, value in settings.items()}
    types = {f.name: f.type for f in fields(Config)}
    unknown = sorted(set(settings) - set(types))
    if unknown:
        raise UserError(f"--config {path}: unknown setting{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
                        f"(the keys are the flags' names, see --help)")
    for key, value in settings.items():
        settings[key] = as_type(value, types[key])
        if settings[key] is None:
            raise UserError(f"--config {path}: {key} must be {TYPE_NAMES[types[key]]}, got {value!r}")
        if key == "preset" and value not in preset_names():
            raise UserError(f"--config {path}: preset must be one of {', '.join(preset_names())}, got {value!r}")
    return settings


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list of strings"}


def as_type(value, kind):
    """A value read from a config file as a Config field of type `kind`, or None where it does not fit.

    An int is a fine float, and so is a string such as "3e-4" (YAML 1.1, PyYAML's, reads 3e-4 as a string).
    """
    if isinstance(value, bool) or kind is bool:  # bool is an int in Python, but not a number here
        return value if isinstance(value, bool) and kind is bool else None
    if kind is list:
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None
    if kind is float and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:  # a string that is no number
            return None
    return value if isinstance(value, kind) else None


def parse_config(argv=None):
    """Defaults, then the preset, then (eval, bench, export, predict) the saved student's own settings, then the
    --config file, then whatever was given on the command line."""
    given = vars(build_parser().parse_args(argv))
    if "teacher" in given:
        given["teacher"], *extra = given["teacher"]
        given.setdefault("extra_teachers", extra)
    from_file = read_config_file(given["config"]) if given.get("config") else {}
    preset = given.get("preset", from_file.get("preset", Config.preset))
    values = {**preset_settings(preset), **from_file, **given}
    values.update(saved_student_settings(values, chosen={**from_file, **given}))
    return Config(**values).validate(given=[key for key in given if key not in ("teacher", "extra_teachers")])


# What a saved student was trained with and must be read with: its task and the preprocessing of its inputs.
STUDENT_SETTINGS = ("task", "tokenizer", "max_length", "student_image_size", "student_config", "student_size",
                    "student_height", "max_text_width")
TEACHER_SETTINGS = ("teacher", "extra_teachers", "teacher_weights")  # eval and bench score the run's teacher beside it
READS_A_STUDENT = ("eval", "bench", "export", "predict")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def saved_student_settings(values, chosen):
    """--mode eval, bench, export and predict read a saved student with its own settings: those its run recorded
    in train_config.json beside it (STUDENT_SETTINGS; the tokenizer and config saved in its student/ directory
    itself where it has them), and the run's teacher. A setting chosen on the command line or in --config that
    contradicts the student's is refused in one line (it could only misread the student's inputs); the teacher
    chosen wins. Without a train_config.json (a student written elsewhere) the flags are used as they are."""
    if values.get("mode") not in READS_A_STUDENT:
        return {}
    model = values.get("model") or os.path.join(values.get("output_dir", Config.output_dir), "student_model.pth")
    run = os.path.dirname(os.path.abspath(model))
    if model.endswith(".onnx"):  # OUTPUT_DIR/onnx/model.onnx
        run = os.path.dirname(run)
    path = os.path.join(run, "train_config.json")
    if not os.path.isfile(path):
        return {}
    saved = read_config_file(path)
    student = model if os.path.isdir(model) else os.path.join(run, "student")
    adopted = {}
    for key in STUDENT_SETTINGS:
        if key not in saved:
            continue
        if key in chosen and chosen[key] != saved[key]:
            raise UserError(f"{flag(key)} {chosen[key]!r} contradicts the {saved[key]!r} the student was trained with "
                            f"({path}): leave {flag(key)} out to read the student with its own settings")
        adopted[key] = chosen.get(key, saved[key])
    if "tokenizer" not in chosen and any(os.path.exists(os.path.join(student, f)) for f in TOKENIZER_FILES):
        adopted["tokenizer"] = student  # the tokenizer itself, also where the run named a hub id or built one
    if "student_config" not in chosen and os.path.exists(os.path.join(student, "config.json")):
        adopted["student_config"] = student
    adopted.update({key: saved[key] for key in TEACHER_SETTINGS if key in saved and key not in chosen})
    return adopted
