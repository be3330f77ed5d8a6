"""Where a distillation step's time goes: torch.profiler over the pieces of epoch 1, naive loop and docdistill's.

Profiled on one batch of real preprocessed pages (after a warm-up run of each), each piece on its own:

  teacher float32          the naive loop's teacher forward (every step, every epoch), and the float32 side of
                           docdistill's precision check
  teacher <precision>      docdistill's teacher-cache fill (--teacher-precision, resolved as a run resolves it)
  student step, naive      forward, loss, backward and AdamW step of the student, batch padded to --max-length
  student step, docdistill the same on a lean batch padded to its longest document (no teacher pixels)

For each piece: milliseconds per document (the profiled wall time / batch size) and its top operators by self CPU
time (CUDA time too on a GPU). The table goes to OUTPUT_DIR/profile_step.md, the operator tables to
OUTPUT_DIR/profile_step.json.

    OMP_NUM_THREADS=2 python benchmarks/profile_step.py --preset demo \
        --teacher ../shared/models/dit-large-finetuned-rvlcdip --tokenizer ../shared/models/layoutlmv3-base \
        --student-config ../shared/models/layoutlmv3-base --student-image-size 224 --max-samples 32 \
        --output-dir runs/profile-step

Any main.py flag is accepted (--batch-size sets the profiled batch).
"""
import copy
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import collate  # noqa: E402
import models  # noqa: E402
import teacher_cache  # noqa: E402
import utils  # noqa: E402
from config import parse_config  # noqa: E402
from train import make_optimizer  # noqa: E402

TOP_OPS = 8


def profiled(fn, device, runs=2):
    """fn() warmed up once, then profiled over `runs` calls: (seconds per call, top operators by self time)."""
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(runs):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / runs
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPS]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    ops = [{"op": e.key, "self_cpu_share": e.self_cpu_time_total / total, "calls": e.count // runs,
            "self_cpu_ms": e.self_cpu_time_total / 1e3 / runs} for e in events]
    return seconds, ops


def main(argv=None):
    cfg = parse_config(argv if argv is not None else sys.argv[1:])
    utils.setup_logging()
    cfg.cache_dir = cfg.cache_dir or os.path.join(cfg.output_dir, "cache")  # as main.py, never the working dir
    from registry import build_task
    utils.seed_everything(cfg.seed)
    task = build_task(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    split = task.splits[cfg.train_split]
    rows = [split[i] for i in range(min(cfg.batch_size, len(split)))]
    to_device = lambda batch: {k: v.to(device) for k, v in batch.items()}  # noqa: E731
    full = to_device(task.collator(rows))
    teacher = models.freeze(task.teacher).to(device)  # as train.fit does
    precision = teacher_cache.resolve_precision(cfg.teacher_precision, teacher, device)
    with torch.no_grad():
        cached = teacher_cache.run_teacher(teacher, task.teacher_logits, full, precision)["logits"]

    student = task.student.to(device).train()
    criterion = task.make_loss(cfg).to(device)
    optimizer = make_optimizer(cfg, student, criterion)

    def step(batch):
        out = task.student_outputs(student, batch)
        loss = criterion(out, cached, batch)["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    naive_collator = copy.copy(task.collator)  # as the naive loop of train_throughput.py: padded to --max-length
    naive_collator.pad_to = cfg.max_length
    naive = to_device(naive_collator(rows))
    lean_rows = collate.without_teacher_pixel_columns(split).select(range(len(rows)))
    lean = to_device(collate.without_teacher_pixels(task.collator)([lean_rows[i] for i in range(len(rows))]))
    pieces = {
        "teacher float32": lambda: teacher_cache.run_teacher(teacher, task.teacher_logits, full, "float32"),
        f"teacher {precision}": lambda: teacher_cache.run_teacher(teacher, task.teacher_logits, full, precision),
        f"student step, naive (padded to {cfg.max_length})": lambda: step(naive),
        f"student step, docdistill (padded to {lean['input_ids'].shape[1] if 'input_ids' in lean else '-'})":
            lambda: step(lean),
    }
    results, lines = {}, ["| piece | ms per document | top operators by self CPU time (share) |", "|---|---|---|"]
    for name, fn in pieces.items():
        seconds, ops = profiled(fn, device)
        results[name] = {"ms_per_document": 1e3 * seconds / len(rows), "ops": ops}
        top = ", ".join(f"{o['op']} {o['self_cpu_share']:.0%}" for o in ops[:5])
        lines.append(f"| {name} | {results[name]['ms_per_document']:.0f} | {top} |")
        print(lines[-1], flush=True)
    lines += ["", f"batch {len(rows)}; machine: {utils.device_info()}"]
    os.makedirs(cfg.output_dir, exist_ok=True)
    utils.atomic_json({"batch": len(rows), "pieces": results, "machine": utils.device_info()},
                      os.path.join(cfg.output_dir, "profile_step.json"))
    utils.atomic_text("\n".join(lines) + "\n", os.path.join(cfg.output_dir, "profile_step.md"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
