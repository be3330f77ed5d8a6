"""--mode eval for text recognition (TextRecognition.evaluate): CER, WER, exact words, ms per crop, the worst errors as a PNG page.

The teacher is scored as it reads on its own: greedy CTC over its full charset, then folded onto ASCII (so
`，` counts as `,`). Its transcripts of a split are cached (keyed by the teacher's file and the split's crops).
Speed: ms per crop at batch 1 (median over up to LATENCY_CROPS crops, preprocessing excluded) on this
machine's threads, and crops per second over the whole batched pass.
"""
import hashlib
import io
import json
import logging
import os
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

import models
import scoring
import teacher_cache
import utils
from textrec import data, teachers, trocr

log = logging.getLogger("docdistill")
LATENCY_CROPS = 200
WORST = 24


def batch_latency_ms(run, batches):
    """Median milliseconds of run(batch) over single-crop batches (after 3 warm-up calls)."""
    for batch in batches[:3]:
        run(batch)
    times = []
    for batch in batches:
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), 1e3 * float(np.percentile(times, 95))


def teacher_transcripts(task, cfg, split, loader):
    """The teacher's folded transcripts of the split, computed once and cached."""
    blob = json.dumps([teacher_cache.weights_fingerprint(task.teacher)]
                      + [os.path.basename(f["filename"]) for f in split.cache_files] + [len(split)])
    path = os.path.join(cfg.cache_dir, "teacher", "read-" + hashlib.sha256(blob.encode()).hexdigest()[:24] + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    start, texts = time.perf_counter(), []
    for batch in loader:
        if isinstance(task.teacher, (teachers.OnnxRecognizer, trocr.TrOCRTeacher)):  # its own charset, then folded
            texts += task.teacher.read(batch["teacher_pixel_values"], batch["teacher_width"])
        else:  # transcripts: the folded texts, spelled as CTC paths
            logp = task.teacher_logits(task.teacher, batch)
            texts += [data.decode(data.ctc_greedy(b, int(n))) for b, n in
                      zip(logp.argmax(-1).tolist(), batch["step_mask"].sum(1))]
    result = {"texts": texts, "seconds": time.perf_counter() - start}
    utils.atomic_json(result, path)
    return result


@torch.no_grad()
def evaluate(task, cfg, student, path):
    """The student scored on cfg.eval_split (scoring.score), the teacher's own readings of the same crops, both
    models' milliseconds per crop at batch 1; eval_predictions.jsonl and worst_errors.png beside eval.json."""
    split = task.splits[cfg.eval_split]
    scored = scoring.score(task, student, cfg.eval_split, cfg, device=torch.device("cpu"), desc="student")
    texts = lambda rows: [data.decode([c for c in row if c >= 0]) for row in rows.tolist()]  # noqa: E731
    preds, truths, seconds = texts(scored.preds), texts(scored.labels), scored.model_seconds
    teacher = teacher_transcripts(task, cfg, split, DataLoader(split, batch_size=cfg.batch_size,
                                                               collate_fn=task.collator))
    singles = [task.collator([split[i]]) for i in range(min(LATENCY_CROPS, len(split)))]
    student_ms = batch_latency_ms(lambda b: task.student_logits(student, b), singles)
    if isinstance(task.teacher, teachers.OnnxRecognizer):
        teacher_ms = batch_latency_ms(lambda b: task.teacher.probs(b["teacher_pixel_values"].numpy()), singles)
    elif isinstance(task.teacher, trocr.TrOCRTeacher):  # preprocessed crop -> generate -> decoded text
        teacher_ms = batch_latency_ms(lambda b: task.teacher.read(b["teacher_pixel_values"]), singles)
    else:  # transcripts from another engine: nothing runs
        teacher_ms = (float("nan"), float("nan"))
    result = {"model": path, "split": cfg.eval_split, "crops": len(split), "teacher": task.cfg.teacher,
              "reference": "the teacher's readings (the split has no transcripts)" if task.teacher_referenced
              else "transcripts",
              "degradation": {k: getattr(cfg, k) for k in ("degrade_height", "degrade_blur", "degrade_noise",
                                                           "degrade_jpeg")},
              "student": data.text_metrics(truths, preds),
              "teacher_scores": data.text_metrics(truths, teacher["texts"]),
              "student_parameters": models.count_parameters(student),
              "teacher_parameters": models.count_parameters(task.teacher),
              "student_ms_per_crop": student_ms[0], "student_ms_per_crop_p95": student_ms[1],
              "teacher_ms_per_crop": teacher_ms[0], "teacher_ms_per_crop_p95": teacher_ms[1],
              "student_crops_per_second": len(split) / max(seconds, 1e-9),
              "teacher_crops_per_second": len(split) / max(teacher["seconds"], 1e-9),
              "threads": torch.get_num_threads(),
              "teacher_agreement": float(np.mean([p == t for p, t in zip(preds, teacher["texts"])])) if preds else 0.0}
    result["char_accuracy"] = data.char_accuracy(result["student"]["cer"])
    result["speedup_batch1"] = result["teacher_ms_per_crop"] / result["student_ms_per_crop"]
    write_predictions(split["key"], truths, preds, teacher["texts"], os.path.join(cfg.output_dir, "eval_predictions.jsonl"))
    worst_errors(split, truths, preds, teacher["texts"], os.path.join(cfg.output_dir, "worst_errors.png"))
    s, t = result["student"], result["teacher_scores"]
    log.info("%s on %s (%d crops): student CER %.4f WER %.4f exact %.4f (%.2f ms/crop); teacher CER %.4f WER %.4f "
             "exact %.4f (%.2f ms/crop); %.1fx faster", path, cfg.eval_split, len(split), s["cer"], s["wer"],
             s["exact"], result["student_ms_per_crop"], t["cer"], t["wer"], t["exact"], result["teacher_ms_per_crop"],
             result["speedup_batch1"])
    return result


def write_predictions(keys, truths, preds, teacher, path):
    """One JSON row per crop: key, truth, student and teacher readings, and each one's character edits (so two
    students can be compared crop by crop: benchmarks/textrec_table.py's paired bootstrap)."""
    rows = [{"key": k, "truth": t, "student": p, "teacher": r, "student_edits": data.char_errors(t, p),
             "teacher_edits": data.char_errors(t, r)} for k, t, p, r in zip(keys, truths, preds, teacher)]
    utils.atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def worst_errors(split, truths, preds, teacher, path):
    """A page of the crops the student gets most wrong (character errors / length, then length)."""
    import matplotlib  # heavy: only for this page
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scored = [(data.char_errors(t, p) / max(len(t), 1), len(t), i) for i, (t, p) in enumerate(zip(truths, preds))
              if t and t != p]
    worst = [i for *_, i in sorted(scored, reverse=True)[:WORST]]
    fig, axes = plt.subplots(max(len(worst), 1), 1, figsize=(8, 0.9 * max(len(worst), 1) + 0.5))
    axes = np.atleast_1d(axes)
    for ax, i in zip(axes, worst):
        ax.imshow(Image.open(io.BytesIO(split[i]["image"])).convert("L"), cmap="gray", aspect="equal")
        ax.set_title(f"truth {truths[i]!r}   student {preds[i]!r}   teacher {teacher[i]!r}", fontsize=8, loc="left")
        ax.axis("off")
    for ax in axes[len(worst):]:
        ax.axis("off")
    fig.tight_layout()
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
