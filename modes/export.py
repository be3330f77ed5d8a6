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
(required for it).
"""
import json
import logging
import os
import shutil
import time

import torch

import ocr
import registry
import saved
import utils
from config import UserError
from modes import predict

log = logging.getLogger("docdistill")
TOLERANCE = 1e-3  # max |logit difference|, float32 ONNX against PyTorch
PARITY_DOCUMENTS = 8
OPSET = 17


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
    if cfg.input:
        files, _ = predict.expand_inputs(cfg.input)
        predictor = predict.PREDICTORS[task_name](directory, config, cfg)
        items = []
        for path in files:
            try:
                for page in predict.read_pages(path, cfg.pdf_dpi):
                    words = ocr.cached_page_ocr(page, os.path.join(cfg.cache_dir, "ocr")) if predictor.needs_ocr \
                        else None
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
    elif task_name == "text-recognition":
        raise UserError("--mode export of a text-recognition student needs --input: a few crop images to check it on")
    else:
        task = registry.build_task(cfg, model_labels=saved.label_names(directory))
        split = task.splits[cfg.eval_split]
        items = [split[i] for i in range(min(PARITY_DOCUMENTS, len(split)))]
        collate = task.collator
    keep = lambda batch: {n: batch[n] for n in names}  # noqa: E731
    return [keep(collate(items))] + [keep(collate([item])) for item in items]


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
