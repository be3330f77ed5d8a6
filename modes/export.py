"""`--mode export`: the student as ONNX, checked against PyTorch, and an int8 copy for CPUs.

    python main.py --mode export --model runs/demo/distilled/student [--input some/scans]   -> OUTPUT_DIR/onnx/

Writes OUTPUT_DIR/onnx/model.onnx (float32; dynamic batch and sequence axes; the legacy TorchScript exporter,
which needs no onnxscript), model.int8.onnx (onnxruntime.quantization.quantize_dynamic: int8 weights of the
MatMuls, activations quantised on the fly), the student's config, tokenizer and image processor (so
`--mode predict --model OUTPUT_DIR/onnx/model.onnx` needs nothing else) and export.json.

The float32 model is checked against PyTorch on real preprocessed documents: the pages of --input (OCR'd as
--mode predict does) or else the first documents of --eval-split of --dataset, as one padded batch and one by
one. Above TOLERANCE (max absolute difference of the logits) the export is refused and nothing is written. The
int8 model is approximate by design: its difference and its top-1 agreement with PyTorch are reported.
A text-recognition student (CRNN) is exported with dynamic batch and width axes and checked on --input crops
(required for it), and also as rec_ppocr.onnx, a drop-in recogniser with PaddleOCR's contract (input [N, 3, 48, W]
BGR crops normalised as PP-OCR does, output per-step probabilities with blank at 0, the charset in the `character`
metadata: textrec/dropin.py), which RapidOCR(rec_model_path=...) or PaddleOCR's own inference reads as their own
recogniser. It is checked against the same wrapper in PyTorch (max |probability difference| <= TOLERANCE, else
refused) and its greedy texts against the PyTorch student's on its own preprocessing (reported).
"""
import json
import logging
import os
import shutil
import time

import numpy as np
import torch

import ocr
import registry
import saved
import utils
from config import UserError
from modes import predict
from textrec import dropin, pages

log = logging.getLogger("docdistill")
TOLERANCE = 1e-3  # max |logit difference|, float32 ONNX against PyTorch
PARITY_DOCUMENTS = 8
OPSET = 17
PPOCR_FILE = "rec_ppocr.onnx"  # the drop-in recogniser of a text-recognition student (PaddleOCR's contract)


def quiet_quantize(fp32, int8):
    """quantize_dynamic to int8 weights, without its per-tensor lines and advice on the root logger."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # heavy: only when exporting
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # also its advice to pre-process the model first
    try:
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def input_names(config):
    """The student's inputs: words, boxes and page (LayoutLMv3) or words only (a text model)."""
    if config.model_type == "crnn-ctc":  # text recognition: grey crops [B, 1, H, W]
        return ["pixel_values"]
    if config.model_type == "layoutlmv3":
        return ["input_ids", "attention_mask", "bbox", "pixel_values"]
    return ["input_ids", "attention_mask"]


class Logits(torch.nn.Module):
    """model(**named inputs).logits with positional inputs, as the tracer passes them."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args))).logits


def export_onnx(model, names, sample, path):
    token_level = "ForTokenClassification" in type(model).__name__
    axes = {name: {0: "batch", 1: "sequence"} for name in names if name != "pixel_values"}
    if "pixel_values" in names:
        axes["pixel_values"] = {0: "batch"}
    axes["logits"] = {0: "batch", 1: "sequence"} if token_level else {0: "batch"}
    if names == ["pixel_values"]:  # the CRNN: any crop width, logits per time step
        axes = {"pixel_values": {0: "batch", 3: "width"}, "logits": {0: "batch", 1: "steps"}}
    wrapper = Logits(model, names).eval()
    torch.onnx.export(wrapper, tuple(sample[n] for n in names), path, input_names=names, output_names=["logits"],
                      dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    model.eval()  # the exporter puts the wrapper (and so the model) back in the mode it found: keep eval


@torch.no_grad()
def max_difference(model, onnx_model, batches):
    """Largest |logit difference| and top-1 agreement (over real positions) of an ONNX model against PyTorch."""
    worst, agree, total = 0.0, 0, 0
    for batch in batches:
        reference = model(**batch).logits.float()
        got = onnx_model(**batch).logits.float()
        if reference.dim() == 3 and "attention_mask" in batch:  # token logits: only the real tokens count
            keep = batch["attention_mask"].bool()
            reference, got = reference[keep], got[keep]
        elif reference.dim() == 3:  # CTC logits per time step: all of them
            reference, got = reference.flatten(0, 1), got.flatten(0, 1)
        if not torch.isfinite(got).all():
            return float("inf"), 0.0
        worst = max(worst, float((reference - got).abs().max()))
        agree += int((reference.argmax(-1) == got.argmax(-1)).sum())
        total += reference.shape[0]
    return worst, agree / max(total, 1)


def sample_batches(cfg, model, directory, config, names):
    """Real preprocessed documents: one padded batch of up to PARITY_DOCUMENTS, and each of them alone."""
    task_name = registry.task_name_of(config.to_dict(), directory)
    if task_name == "text-recognition":  # every --input image read as one crop
        items = [pages.crop_item(crop, config.height, cfg.max_text_width) for crop in input_crops(cfg)]
        if not items:
            raise UserError("--mode export of a text-recognition student needs --input: a few crop images to check it "
                            "on" + (f" (none of {' '.join(cfg.input)} could be read)" if cfg.input else ""))
        collate = lambda chosen: {"pixel_values": pages.crop_batch(chosen, config.height)}  # noqa: E731
    elif cfg.input:
        files, _ = predict.expand_inputs(cfg.input)
        predictor = predict.PREDICTORS[task_name](directory, config, cfg, model)
        engine = pages.ocr_engine(cfg.ocr_engine) if predictor.needs_ocr else None
        items = []
        for path in files:
            try:
                for page in predict.read_pages(path, cfg.pdf_dpi):
                    words = ocr.cached_page_ocr(page, os.path.join(cfg.cache_dir, "ocr"), engine) \
                        if predictor.needs_ocr else None
                    items.append(predictor.encode(page, words))
                    if len(items) >= PARITY_DOCUMENTS:
                        break
            except Exception as e:  # noqa: BLE001 - unreadable inputs are skipped here; predict reports them
                log.warning("export check: skipping %s (%s)", path, utils.first_line(e))
            if len(items) >= PARITY_DOCUMENTS:
                break
        if not items:
            raise UserError(f"--input {' '.join(cfg.input)}: no readable page to check the export on")
        collate = predictor.collate
    else:
        task = registry.build_task(cfg, model_labels=saved.label_names(directory))
        split = task.splits[cfg.eval_split]
        items = [split[i] for i in range(min(PARITY_DOCUMENTS, len(split)))]
        collate = task.collator
    keep = lambda batch: {n: batch[n] for n in names}  # noqa: E731
    return [keep(collate(items))] + [keep(collate([item])) for item in items]


def input_crops(cfg, limit=PARITY_DOCUMENTS):
    """Up to `limit` crops (RGB) of --input, turned upright as predict turns them, for the drop-in check."""
    files, crops = predict.expand_inputs(cfg.input)[0], []
    for path in files:
        try:
            crops += [pages.upright(page) for page in predict.read_pages(path, cfg.pdf_dpi)][:limit - len(crops)]
        except Exception:  # noqa: BLE001 - unreadable inputs are skipped here, as in sample_batches
            continue
        if len(crops) >= limit:
            break
    return crops


@torch.no_grad()
def export_ppocr(model, crops, directory, cfg):
    """rec_ppocr.onnx: the student behind PaddleOCR's recogniser contract (textrec/dropin.py), checked against the
    same wrapper in PyTorch on `crops` (one padded batch and each alone: max |probability difference|, refused
    above TOLERANCE) and, crop by crop, its greedy texts against the PyTorch student's own (predict's) reading."""
    import onnxruntime as ort  # heavy: only when exporting
    student = model.crnn
    path = os.path.join(directory, PPOCR_FILE)
    batch = torch.from_numpy(dropin.ppocr_batch(crops, cfg.max_text_width))
    wrapper = dropin.export(student, path, batch, OPSET)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    difference, texts = 0.0, []
    for pixels in [batch] + [torch.from_numpy(dropin.ppocr_batch([c], cfg.max_text_width)) for c in crops]:
        got = session.run(None, {"x": pixels.numpy()})[0]
        difference = max(difference, float(np.abs(wrapper(pixels).numpy() - got).max()))
        if len(pixels) == 1:
            texts.append(dropin.greedy_texts(got, student.config.chars)[0])
    reader = pages.StudentReader(student, student.config.chars, student.config.height, cfg.max_text_width)
    agree = sum(reading["text"] == text for reading, text in zip(reader(crops), texts))
    print(f"{PPOCR_FILE} (PaddleOCR's recogniser contract): max abs probability difference to PyTorch "
          f"{difference:.3e} (tolerance {TOLERANCE:.0e}); same text as the PyTorch student on {agree} of {len(crops)} "
          f"crops")
    if not difference <= TOLERANCE:
        raise UserError(f"{PPOCR_FILE} differs from the PyTorch wrapper by {difference:.3e} (> {TOLERANCE:.0e}): not "
                        f"written; report it with --debug output")
    return {"file": PPOCR_FILE, "input": "[N, 3, 48, W] BGR, (x / 255 - 0.5) / 0.5", "output": "[N, W / 8, 96] "
            "probabilities, blank first, `character` metadata order, space last", "max_abs_difference": difference,
            "crops_checked": len(crops), "same_text_as_pytorch_student": agree / max(len(crops), 1),
            "size_mb": os.path.getsize(path) / 1e6}


def run(cfg):
    path = cfg.model or os.path.join(cfg.output_dir, "student")
    if path.endswith(".onnx"):
        raise UserError(f"--model {path} is already ONNX: give the student/ directory or student_model.pth")
    out_dir = os.path.join(cfg.output_dir, "onnx")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not cfg.overwrite:  # before any slow work
        raise UserError(f"{out_dir} already holds an export ({', '.join(sorted(os.listdir(out_dir))[:4])}...): "
                        f"replace it with --overwrite (files that are not the export's own are kept), or choose "
                        f"another --output-dir")
    model, directory, config = predict.load_model(path)
    names = input_names(config)
    batches = sample_batches(cfg, model, directory, config, names)
    documents = int(batches[0][names[0]].shape[0])
    log.info("checking the export on %d real documents (%s)", documents,
             "--input" if cfg.input else f"{cfg.dataset} {cfg.eval_split}")
    report = {}

    def write(tmp):
        for name in os.listdir(directory):  # config, tokenizer, image processor; not the PyTorch weights
            if not name.endswith((".safetensors", ".bin", ".md")) and name != saved.CHECKSUMS and \
                    os.path.isfile(os.path.join(directory, name)):
                shutil.copy2(os.path.join(directory, name), tmp)
        fp32, int8 = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "model.int8.onnx")
        start = time.perf_counter()
        export_onnx(model, names, batches[0], fp32)
        difference, agreement = max_difference(model, predict.OrtModel(fp32), batches)
        log.info("ONNX float32 against PyTorch: max |logit difference| %.2e (tolerance %.0e), top-1 agreement %.3f",
                 difference, TOLERANCE, agreement)
        print(f"onnx float32: max abs difference to PyTorch {difference:.3e} (tolerance {TOLERANCE:.0e})")
        if not difference <= TOLERANCE:
            raise UserError(f"the ONNX export differs from PyTorch by {difference:.3e} (> {TOLERANCE:.0e}) on real "
                            f"documents: not written; report it with --debug output")
        quiet_quantize(fp32, int8)
        int8_difference, int8_agreement = max_difference(model, predict.OrtModel(int8), batches)
        print(f"onnx int8: max abs difference to PyTorch {int8_difference:.3e}, top-1 agreement {int8_agreement:.3f}")
        if names == ["pixel_values"]:  # a CRNN: also the drop-in recogniser with PaddleOCR's contract
            report["ppocr"] = export_ppocr(model, input_crops(cfg), tmp, cfg)
        report.update({"model": path, "opset": OPSET, "inputs": names, "tolerance": TOLERANCE,
                       "documents_checked": documents,
                       "float32": {"max_abs_difference": difference, "top1_agreement": agreement,
                                   "size_mb": os.path.getsize(fp32) / 1e6},
                       "int8": {"max_abs_difference": int8_difference, "top1_agreement": int8_agreement,
                                "size_mb": os.path.getsize(int8) / 1e6},
                       "seconds": time.perf_counter() - start})
        with open(os.path.join(tmp, "export.json"), "w") as f:
            json.dump(report, f, indent=2)

    utils.atomic_files(out_dir, write)
    log.info("exported to %s: model.onnx %.1f MB, model.int8.onnx %.1f MB", out_dir, report["float32"]["size_mb"],
             report["int8"]["size_mb"])
    return 0
