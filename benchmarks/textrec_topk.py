"""How many of the teacher's classes the text-recognition teacher cache must keep (--teacher-top-k): size on disk and
the distillation loss with the top-k cache against the full one, on the same crops and student.

    python benchmarks/textrec_topk.py --model runs/x/student_model.pth -- --preset funsd-words --max-samples 4000 \
        --cache-dir runs/cache

Everything after `--` is main.py's flags for the training split (its teacher cache of all classes is read, or filled
once, float32). For each storage (compact_logits.CompactLogits: every class in 8 bits, or the top K classes and the
rest; every class in float16 for comparison): the bytes of the cached per-step distributions (safetensors), and over every training batch the kl term (at
the run's T and --blank-weight), seq's target transcripts and KL(full teacher || top-k teacher) per step at T, each
against the full cache's. Prints a markdown table.
"""
import argparse
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import registry  # noqa: E402
import compact_logits  # noqa: E402
import teacher_cache  # noqa: E402
import train  # noqa: E402
from config import parse_config  # noqa: E402
from recipe import make_accelerator  # noqa: E402
from textrec import ctc_kd, data  # noqa: E402


def file_bytes(tables):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.safetensors")
        save_file(tables, path)
        return os.path.getsize(path)


class Float16:
    """Every class kept, log-probabilities stored as float16 (for comparison)."""

    def __init__(self, table):
        self.values = torch.log_softmax(table.float(), -1).half()

    def __getitem__(self, index):
        return self.values[index].float()

    def tables(self, name):
        return {name: self.values}


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="", help="a trained student (else a random-weight one)")
    parser.add_argument("--ks", default="1,2,3,4,6,8,12,16")
    args, rest = parser.parse_known_args()
    cfg = parse_config(["--mode", "train", "--teacher-top-k", "96", *[a for a in rest if a != "--"]])
    task = registry.build_task(cfg)
    task.teacher_top_k = None  # the float32 table of every class, under the key it always had
    accelerator = make_accelerator(cfg)
    full = train.cached_teacher(accelerator, task, task.teacher, task.teacher_outputs, cfg)
    table = full.logits if not isinstance(full.logits, dict) else full.logits["logits"]
    student = registry.load_student(args.model) if args.model else task.student.eval()
    loader = torch.utils.data.DataLoader(task.splits[cfg.train_split], batch_size=cfg.batch_size,
                                         collate_fn=task.collator)
    batches = [{k: v for k, v in b.items() if k != "teacher_pixel_values"} for b in loader]
    outputs = [student(b["pixel_values"]) for b in batches]
    loss = ctc_kd.CTCDistillationLoss(0.5, cfg.temperature, ["kl", "seq"], cfg.blank_weight, True)

    def terms(cache):
        kl = seq = 0.0
        paths = []
        for batch, out in zip(batches, outputs):
            teacher = cache(batch)
            got = loss(out, teacher, batch)
            kl, seq = kl + got["kl"].item(), seq + got["seq"].item()
            paths += ctc_kd.greedy_targets(teacher, batch["step_mask"].sum(1))[2]
        return kl / len(batches), seq / len(batches), paths

    base_kl, base_seq, base_paths = terms(full)
    steps = int(sum(b["step_mask"].sum() for b in batches))
    print(f"{len(task.splits[cfg.train_split])} crops, {steps} real time steps (table padded to {table.shape[1]} "
          f"steps), T {cfg.temperature}, blank weight {cfg.blank_weight}; student: {args.model or 'random weights'}\n")
    print("| --teacher-top-k | cache MB (logits) | x smaller | kl term | relative change | seq term | same teacher transcripts | "
          "KL(full || top-k) per step at T, nats |")
    print("|---|---|---|---|---|---|---|---|")
    size = file_bytes({"logits": table.contiguous()})
    print(f"| 96: all, float32 | {size / 1e6:.1f} | 1.0 | {base_kl:.5f} | - | {base_seq:.5f} | - | 0 |")
    variants = [("all, float16", Float16(table)), ("all, 8 bits (--teacher-top-k 0)",
                                                   compact_logits.CompactLogits.of(table, 0))]
    variants += [(k, compact_logits.CompactLogits.of(table, int(k))) for k in args.ks.split(",")]
    for k, top in variants:
        cache = teacher_cache.TeacherCache(top)
        kl, seq, paths = terms(cache)
        drift = 0.0
        for batch in batches:
            exact = torch.log_softmax(full(batch) / cfg.temperature, -1)
            approx = torch.log_softmax(cache(batch) / cfg.temperature, -1)
            per_step = (exact.exp() * (exact - approx)).sum(-1)
            drift += float(per_step[batch["step_mask"]].sum())
        bytes_k = file_bytes(top.tables("logits"))
        print(f"| {k} | {bytes_k / 1e6:.1f} | {size / bytes_k:.1f} | {kl:.5f} | {(kl - base_kl) / base_kl:+.2e} | "
              f"{seq:.5f} | {sum(a == b for a, b in zip(paths, base_paths)) / len(paths):.4f} | {drift / steps:.2e} |")


if __name__ == "__main__":
    main()
