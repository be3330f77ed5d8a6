"""The model card of a saved student: student/README.md in the Hugging Face convention (YAML front matter).

Written from the files of the run around it, so it never says more than they do: the run's train_config.json
(teacher, data, alpha, T, schedule), student_metrics.jsonl (the best validation score), the student's
config.json and weights (classes, shape, parameters, size), and, when they exist, eval.json (test scores and
speed, --mode eval rewrites the card), bench.json (--mode bench) and onnx/export.json (--mode export).
"""
import json
import logging
import os

from safetensors import safe_open

import utils
from textrec import conventions

log = logging.getLogger("docdistill")


def _parameters(student_dir):
    """(parameters, MB) of the weights in model.safetensors, read from its header only."""
    path = os.path.join(student_dir, "model.safetensors")
    if not os.path.exists(path):
        return None, None
    count = 0
    with safe_open(path, "np") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            n = 1
            for d in shape:
                n *= d
            count += n
    return count, os.path.getsize(path) / 1e6


def _is_path(value):
    return isinstance(value, str) and (value.startswith(("/", ".", "~")) or os.path.exists(value)
                                       or value.startswith(("demo", "builtin:")))


def build(student_dir, eval_path=None):
    """The card's text."""
    run_dir = os.path.dirname(os.path.abspath(student_dir))
    config = utils.read_json(os.path.join(student_dir, "config.json")) or {}
    train = utils.read_json(os.path.join(run_dir, "train_config.json")) or {}
    history = utils.read_jsonl(os.path.join(run_dir, "student_metrics.jsonl")) \
        if os.path.exists(os.path.join(run_dir, "student_metrics.jsonl")) else []
    scores = utils.read_json(eval_path or os.path.join(run_dir, "eval.json"))
    bench = utils.read_json(os.path.join(run_dir, "bench.json"))
    export = utils.read_json(os.path.join(student_dir, "..", "onnx", "export.json"))
    labels = [config.get("id2label", {}).get(str(i)) for i in range(len(config.get("id2label", {})))]
    arch = (config.get("architectures") or ["?"])[0]
    token_level = arch.endswith("ForTokenClassification")
    metric = (history[-1].get("metric_name") if history else None) or ("f1" if token_level else "accuracy")
    best = max(history, key=lambda r: r.get(f"val_{metric}", -1)) if history else None
    params, size_mb = _parameters(student_dir)
    dataset = train.get("dataset", "?")
    teacher = train.get("teacher", "?")

    front = ["---", "library_name: transformers",
             f"pipeline_tag: {'token-classification' if token_level else 'text-classification'}",
             "tags:", "  - docdistill", "  - knowledge-distillation", "  - document-ai",
             f"  - {config.get('model_type', 'student')}",
             "  - " + ("token-classification" if token_level else "document-classification")]
    if not _is_path(dataset):
        front += ["datasets:", f"  - {dataset}"]
    front += ["metrics:", f"  - {metric}"] + (["  - f1"] if metric != "f1" else [])
    if scores and metric in scores:
        front += ["model-index:", f"  - name: {os.path.basename(os.path.abspath(run_dir))}-student", "    results:",
                  "      - task:", f"          type: {'token-classification' if token_level else 'text-classification'}",
                  "        dataset:", f"          name: {json.dumps(os.path.basename(str(dataset).rstrip('/')))}",
                  f"          type: {json.dumps(str(dataset))}",
                  f"          split: {scores.get('split', '?')}", "        metrics:",
                  f"          - type: {metric}", f"            value: {scores[metric]:.4f}"]
    front.append("---")

    what = "tags every OCR word of a page with a BIO entity tag" if token_level else \
        "classifies a document page from its OCR words, their boxes and the page image"
    lines = [f"# {arch} student distilled with docdistill", "",
             f"A small {config.get('model_type', '')} model that {what}, distilled from the teacher `{teacher}`.",
             f"Classes ({len(labels)}): {', '.join(str(n) for n in labels)}.", "",
             "## Training", "",
             "| setting | value |", "|---|---|",
             f"| teacher | `{teacher}` |", f"| data | `{dataset}` (train split `{train.get('train_split', '?')}`, "
             f"validation `{train.get('eval_split', '?')}`) |",
             f"| distillation | alpha {train.get('alpha', '?')} (weight of the KL term), temperature T "
             f"{train.get('temperature', '?')}; loss = alpha·T²·KL(teacher‖student) + (1-alpha)·CE |",
             f"| student | `{train.get('student_config', '?')}`, size {train.get('student_size', '?')}, "
             f"{config.get('hidden_size', config.get('dim', '?'))} hidden, "
             f"{config.get('num_hidden_layers', config.get('n_layers', '?'))} layers |",
             f"| schedule | {train.get('epochs', '?')} epochs, batch {train.get('batch_size', '?')}, lr "
             f"{train.get('lr', '?')} ({train.get('scheduler', 'linear')} schedule, warm-up "
             f"{train.get('warmup_ratio', '?')}), max length {train.get('max_length', '?')} tokens, seed "
             f"{train.get('seed', '?')} |"]
    if best:
        lines.append(f"| best validation {metric} | {best[f'val_{metric}']:.4f} (epoch {best['epoch']} of "
                     f"{len(history)}) |")
    if config.get("label_conventions"):  # a text-recognition student distilled with --label-conventions
        lines += ["", "## Label conventions", "", "Measured before training (--label-conventions): "
                  + conventions.describe(config["label_conventions"]) + "."]
    lines += ["", "## Evaluation", ""]
    if scores:
        lines += [f"On split `{scores.get('split')}` of `{dataset}` ({scores.get('documents')} documents; "
                  f"`--mode eval`, eval.json):", "",
                  "| metric | student | teacher |", "|---|---|---|",
                  f"| {metric} | {scores[metric]:.4f} | {scores.get('teacher_' + metric, float('nan')):.4f} |"]
        for key in ("macro_f1", "precision", "recall"):
            if key in scores and key != metric:
                lines.append(f"| {key} | {scores[key]:.4f} | |")
        if "teacher_agreement" in scores:
            lines.append(f"| agreement with the teacher | {scores['teacher_agreement']:.4f} | |")
        classes = scores.get("classes") or {}
        if classes.get("not_in_data"):
            lines.append(f"\nThe data held {classes['in_data']} of the {classes['model']} classes; scores are over "
                         f"those (not in the data: {', '.join(classes['not_in_data'])}).")
    else:
        lines.append("Not evaluated on a test split yet: run `python main.py --mode eval --eval-split test ...`; it "
                     "rewrites this card with the scores.")
    lines += ["", "## Size and speed", ""]
    if params:
        lines.append(f"{params / 1e6:.2f}M parameters, {size_mb:.1f} MB of float32 weights (model.safetensors).")
    if scores and scores.get("student_parameters"):
        unit = "words" if token_level else "documents"
        rate = scores.get(f"student_{unit}_per_second")
        if rate:
            lines.append(f"`--mode eval` ran the student at {rate:.1f} {unit}/s (the teacher, "
                         f"{scores.get('teacher_parameters', 0) / 1e6:.1f}M parameters, at "
                         f"{scores.get(f'teacher_{unit}_per_second', 0):.1f}), a whole evaluation pass on the machine "
                         f"that ran it.")
    if bench:
        for row in bench.get("rows", []):
            lines.append(f"- {row['model']} on {row['device']}: p50 {row['latency_ms_p50']:.1f} ms per page at batch 1, "
                         f"{row['throughput_pages_per_s']:.1f} pages/s batched, {row['size_mb']:.1f} MB (`--mode bench`)")
    if export:
        lines.append(f"- ONNX (`--mode export`): float32 {export['float32']['size_mb']:.1f} MB (max |logit difference| "
                     f"to PyTorch {export['float32']['max_abs_difference']:.1e}), int8 {export['int8']['size_mb']:.1f} MB "
                     f"(top-1 agreement {export['int8']['top1_agreement']:.3f})")
        if export.get("ppocr"):
            lines.append(f"- `onnx/{export['ppocr']['file']}`: a drop-in recogniser with PaddleOCR's contract, "
                         f"`RapidOCR(rec_model_path=...)` reads it (max |probability difference| to PyTorch "
                         f"{export['ppocr']['max_abs_difference']:.1e})")
    auto = "AutoModelForTokenClassification" if token_level else "AutoModelForSequenceClassification"
    lines += ["", "## How to use", "", "With plain transformers (this directory holds the weights, the tokenizer"
              + ("" if token_level else " and the image processor") + "):", "", "```python",
              f"from transformers import AutoTokenizer, {auto}", "",
              f"model = {auto}.from_pretrained(\"path/to/student\")",
              "tokenizer = AutoTokenizer.from_pretrained(\"path/to/student\")"]
    if token_level:
        lines += ["words = [\"DATE:\", \"12/05/1996\"]  # OCR words of a page",
                  "enc = tokenizer(words, is_split_into_words=True, truncation=True, return_tensors=\"pt\")",
                  "tags = model(**enc).logits.argmax(-1)[0]  # read each word at its first sub-token (enc.word_ids())"]
    else:
        lines += ["from PIL import Image",
                  "from transformers.models.layoutlmv3.image_processing_pil_layoutlmv3 import "
                  "LayoutLMv3ImageProcessorPil",
                  "processor = LayoutLMv3ImageProcessorPil.from_pretrained(\"path/to/student\")",
                  "page = Image.open(\"page.png\").convert(\"RGB\")",
                  "words, boxes = [\"Invoice\", \"Total\"], [[80, 40, 200, 70], [80, 500, 160, 530]]  # OCR, 0-1000",
                  "enc = tokenizer(words, boxes=boxes, truncation=True, return_tensors=\"pt\")",
                  "pixels = processor(page, return_tensors=\"pt\")[\"pixel_values\"]",
                  "label = model(**enc, pixel_values=pixels).logits.argmax(-1).item()",
                  "print(model.config.id2label[label])"]
    lines += ["```", "", "Or on folders of scans and PDFs, OCR included: `python main.py --mode predict --model "
              "path/to/student --input scans/`; `--mode export` writes ONNX float32 and int8 copies.", ""]
    return "\n".join(front + [""] + lines)


def write(student_dir, eval_path=None):
    """(Re)write student_dir/README.md; a card that cannot be written is a warning, never a failed run."""
    if not os.path.isdir(student_dir):
        return None
    try:
        path = os.path.join(student_dir, "README.md")
        utils.atomic_text(build(student_dir, eval_path), path)
        return path
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("model card not written in %s: %s", student_dir, utils.first_line(e))
        return None
