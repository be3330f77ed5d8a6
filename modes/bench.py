"""`--mode bench`: teacher and student side by side on this machine.

Parameters, size on disk, latency per page at batch 1 (p50/p95), throughput at a larger batch and peak memory,
for the teacher, the float32 student and the int8 (dynamically quantised) student, with each student's
accuracy on the evaluation split. Inputs are real preprocessed pages of that split. The teacher may be built
from a config alone (random weights), e.g. ../shared/models/dit-large-finetuned-rvlcdip: timing needs shape,
not knowledge. Writes OUTPUT_DIR/bench.json and bench.md.
"""
import copy
import logging
import os
import tempfile
import threading
import time

import numpy as np
import psutil
import torch
from safetensors.torch import save_model
from torch.utils.data import DataLoader

import models
import registry
import saved
import scoring
import utils
from modes import export, predict

log = logging.getLogger("docdistill")
LATENCY_PAGES = 30
THROUGHPUT_BATCH = 16


def size_on_disk_mb(model):
    """Bytes of the saved weights: safetensors for float models, torch.save for quantised ones."""
    if hasattr(model, "onnx_mb"):  # a teacher that runs in onnxruntime: its .onnx file
        return model.onnx_mb
    if getattr(model, "weights_mb", None):  # a teacher read from its model.safetensors (TrOCR): that file
        return model.weights_mb
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights")
        state = model.state_dict()
        if all(isinstance(t, torch.Tensor) and not t.is_quantized for t in state.values()):
            save_model(model, path)  # tied weights (TrOCR's output projection and embeddings) stored once
        else:
            torch.save(state, path)
        return os.path.getsize(path) / 1e6


class PeakMemory:
    """Peak memory while the block runs: CUDA's allocator peak, or on CPU the process RSS polled every 5 ms,
    above what it was when the block started (the weights, already loaded, are not counted)."""

    def __init__(self, device):
        self.device, self.peak_mb = device, 0.0

    def _poll(self):
        process = psutil.Process()
        while not self._done.is_set():
            self._peak = max(self._peak, process.memory_info().rss)
            self._done.wait(0.005)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._peak = psutil.Process().memory_info().rss
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._start) / 1e6
        else:
            self._done.set()
            self._thread.join()
            self.peak_mb = (self._peak - self._start) / 1e6


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_model(forward, model, split, collator, device, amp_dtype):
    """p50/p95 latency at batch 1 and pages/s at THROUGHPUT_BATCH, on real pages of the split."""
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    pages = [split[i] for i in range(min(LATENCY_PAGES, len(split)))]
    to_device = lambda batch: {k: v.to(device) for k, v in batch.items()}  # noqa: E731
    with autocast, PeakMemory(device) as memory:
        for page in pages[:3]:  # warm-up: lazy initialisation, allocator, kernels
            forward(model, to_device(collator([page])))
        latencies = []
        for page in pages:
            batch = to_device(collator([page]))
            sync(device)
            start = time.perf_counter()
            forward(model, batch)
            sync(device)
            latencies.append(time.perf_counter() - start)
        batches = [to_device(b) for b in DataLoader(split, batch_size=THROUGHPUT_BATCH, collate_fn=collator)][:4]
        forward(model, batches[0])
        sync(device)
        start = time.perf_counter()
        for batch in batches:
            forward(model, batch)
        sync(device)
        seconds = time.perf_counter() - start
    return {"latency_ms_p50": 1e3 * float(np.percentile(latencies, 50)),
            "latency_ms_p95": 1e3 * float(np.percentile(latencies, 95)),
            "throughput_pages_per_s": sum(len(b["labels"]) for b in batches) / seconds,
            "peak_memory_mb": memory.peak_mb}


def onnx_variants(student, split, collator, directory, forward):
    """The student exported to ONNX (float32, and int8 by quantize_dynamic), run by onnxruntime on the CPU."""
    if student.config.model_type == "vision-encoder-decoder":  # generate() in a loop: not exported to ONNX here
        log.info("the VisionEncoderDecoder student is not exported to ONNX: no onnxruntime rows")
        return []
    names = export.input_names(student.config)
    batch = collator([split[i] for i in range(min(4, len(split)))])
    fp32, int8 = os.path.join(directory, "model.onnx"), os.path.join(directory, "model.int8.onnx")
    if student.config.model_type == "crnn-ctc":  # text recognition: exported and run as predict/export do
        student = predict.CTCModel(student)
        forward = lambda model, batch: model(pixel_values=batch["pixel_values"]).logits  # noqa: E731
    export.export_onnx(copy.deepcopy(student).cpu().eval(), names, {n: batch[n] for n in names}, fp32)
    export.quiet_quantize(fp32, int8)
    cpu = torch.device("cpu")
    return [("student onnxruntime fp32", predict.OrtModel(fp32), forward, cpu),
            ("student onnxruntime int8", predict.OrtModel(int8), forward, cpu)]


def run(cfg):
    path = cfg.model or os.path.join(cfg.output_dir, "student_model.pth")
    trained = os.path.exists(path)
    # timing needs shape: a teacher head for other labels is re-initialised; a trained student is scored in its
    # own label space (the data may hold a subset of its classes)
    task = registry.build_task(cfg, model_labels=saved.label_names(path) if trained else None)
    student = registry.load_student(path, task) if trained else task.student
    if not trained:
        log.info("no trained student at %s: timing a freshly initialised one (accuracy not meaningful)", path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    split, collator = task.splits[cfg.eval_split], task.collator
    int8 = models.quantize_int8(student)
    onnx_dir = tempfile.TemporaryDirectory()
    variants = [("student fp32", student.eval(), task.student_logits, device),
                ("student int8 (dynamic)", int8, task.student_logits, torch.device("cpu")),
                *onnx_variants(student, split, collator, onnx_dir.name, task.student_logits),
                ("teacher", models.freeze(task.teacher), task.teacher_logits, device)]

    rows = []
    for name, model, forward, where in variants:
        log.info("benchmarking %s on %s", name, where)
        model.to(where)
        row = {"model": name, "device": str(where), "parameters": models.count_parameters(
                   task.teacher if name == "teacher" else student),  # int8 keeps the same weights, packed
               "size_mb": os.path.getsize(model.path) / 1e6 if hasattr(model, "session") else size_on_disk_mb(model),
               **time_model(forward, model, split, collator, where, amp_dtype if where.type == "cuda" else None)}
        if name.startswith("student"):  # scored as every model is (scoring.score), on this variant's device
            row[task.metric_name] = scoring.score(task, model, cfg.eval_split, cfg, forward, device=where).metrics[
                task.metric_name] if trained else None
        rows.append(row)
        model.to("cpu")
    teacher_row, student_row = rows[-1], rows[0]
    summary = {"student_speedup_batch1": teacher_row["latency_ms_p50"] / student_row["latency_ms_p50"],
               "int8_student_size_ratio": teacher_row["size_mb"] / rows[1]["size_mb"],
               "throughput_ratio": student_row["throughput_pages_per_s"] / teacher_row["throughput_pages_per_s"]}
    result = {"machine": utils.device_info(), "teacher": cfg.teacher, "student": path if trained else "untrained",
              "split": cfg.eval_split, "amp": cfg.amp, "rows": rows, "summary": summary}
    onnx_dir.cleanup()
    utils.atomic_json(result, os.path.join(cfg.output_dir, "bench.json"))
    table = bench_table(result, task.metric_name, task.item)
    utils.atomic_text(table + "\n", os.path.join(cfg.output_dir, "bench.md"))
    print(table)
    return 0


def bench_table(result, metric, item="page"):
    """The bench.md table; `item` is what one input is (a page, a form, a crop)."""
    lines = [f"| model | device | params | size on disk | p50 ms/{item} (batch 1) | p95 ms | {item}s/s (batch "
             f"{THROUGHPUT_BATCH}) | peak memory MB | {metric} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        score = "-" if r.get(metric) is None else f"{r[metric]:.3f}"
        lines.append(f"| {r['model']} | {r['device']} | {r['parameters'] / 1e6:.1f}M | {r['size_mb']:.1f} MB | "
                     f"{r['latency_ms_p50']:.1f} | {r['latency_ms_p95']:.1f} | {r['throughput_pages_per_s']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} | {score} |")
    s = result["summary"]
    lines.append(f"\nstudent {s['student_speedup_batch1']:.1f}x faster per {item} than the teacher at batch 1, "
                 f"{s['throughput_ratio']:.1f}x the throughput; int8 student {s['int8_student_size_ratio']:.1f}x "
                 f"smaller on disk than the teacher.")
    return "\n".join(lines)
