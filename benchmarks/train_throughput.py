"""Training throughput: the naive distillation loop against docdistill's, measured in one run.

(a) naive:     the teacher runs on every step of every epoch, every batch is padded to 512 tokens, random order
(b) docdistill: teacher logits computed once and cached, each batch padded to its longest document,
               documents of similar length batched together

Same student initialisation, data, seed and hyper-parameters; documents per second of training (validation
excluded) for epoch 1 and for the later epochs, their ratio, and the validation accuracy both reach.

    python benchmarks/train_throughput.py --preset demo --teacher ../shared/models/dit-large-finetuned-rvlcdip \
        --max-samples 96 --epochs 3 --student-image-size 224

Any main.py flag can be given; --output-dir holds both runs (naive/ and docdistill/).
"""
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from config import parse_config  # noqa: E402
from tasks import build_task  # noqa: E402
from train import fit  # noqa: E402


def run(cfg, naive):
    utils.seed_everything(cfg.seed)  # the same student initialisation for both runs
    task = build_task(cfg)
    if naive:
        task.collator.pad_to = cfg.max_length
    fit(cfg, task, task.student, task.student_logits, teacher=task.teacher, teacher_forward=task.teacher_logits)
    return utils.read_jsonl(os.path.join(cfg.output_dir, "student_metrics.jsonl"))


def summarise(rows):
    later = rows[1:] or rows
    return {"epoch1_docs_per_s": rows[0]["train_docs_per_s"],
            "later_docs_per_s": sum(r["train_docs_per_s"] for r in later) / len(later),
            "total_train_seconds": sum(r["train_seconds"] for r in rows),
            "final_val_accuracy": rows[-1]["val_accuracy"]}


def main(argv=None):
    base = parse_config(argv)
    utils.setup_logging()
    base.cache_dir = base.cache_dir or os.path.join(base.output_dir, "cache")
    results = {}
    for name, naive in (("naive", True), ("docdistill", False)):
        cfg = dataclasses.replace(base, output_dir=os.path.join(base.output_dir, name),
                                  teacher_cache=not naive, group_by_length=not naive)
        os.makedirs(cfg.output_dir, exist_ok=True)
        results[name] = summarise(run(cfg, naive))
    naive, ours = results["naive"], results["docdistill"]
    results["speedup_epoch1"] = ours["epoch1_docs_per_s"] / naive["epoch1_docs_per_s"]
    results["speedup_later_epochs"] = ours["later_docs_per_s"] / naive["later_docs_per_s"]
    results["machine"] = utils.device_info()
    utils.atomic_json(results, os.path.join(base.output_dir, "train_throughput.json"))
    print("\n| loop | epoch 1 docs/s | later epochs docs/s | train seconds | final val accuracy |")
    print("|---|---|---|---|---|")
    for name in ("naive", "docdistill"):
        r = results[name]
        print(f"| {name} | {r['epoch1_docs_per_s']:.2f} | {r['later_docs_per_s']:.2f} | "
              f"{r['total_train_seconds']:.0f} | {r['final_val_accuracy']:.3f} |")
    print(f"\nspeed-up: {results['speedup_epoch1']:.2f}x in epoch 1, {results['speedup_later_epochs']:.2f}x in later "
          f"epochs\n{json.dumps(results['machine'])}")


if __name__ == "__main__":
    main()
