"""Scoring a model on a split: the one pass over a split that training's validation, --mode eval, sweep, the demo,
bench and text recognition's eval all make.

score(task, model, split, cfg) runs `forward(model, batch)` (the student's logits by default) over every document of
task.splits[split] in order, turns each batch's logits into predictions with task.predictions(logits, batch), and
scores them with task.metrics. Several processes (accelerate launch) each score their shard; the predictions are
gathered, duplicates from uneven sharding dropped. Per-position tasks have a different number of positions per
batch: rows are padded with IGNORE_INDEX to the longest before they are stacked, and IGNORE_INDEX is never scored.
"""
import dataclasses
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import collate
import recipe
from losses import IGNORE_INDEX, logits_of


@dataclasses.dataclass
class Scored:
    preds: torch.Tensor  # [N] or [N, L], IGNORE_INDEX-padded
    labels: torch.Tensor  # the same shape
    metrics: dict  # task.metrics(preds, labels)
    seconds: float  # the whole pass, batching included
    model_seconds: float  # the forward passes alone
    finite: bool  # whether every logit was finite (a model that gives NaN is not worth saving)
    main_process: bool  # whether this process writes the results (the others hold the same ones)


def pad_rows(rows):
    """[N_i, L_i] tensors (or [N_i]) -> one [sum N_i, max L_i] tensor padded with IGNORE_INDEX."""
    if rows[0].dim() == 1:
        return torch.cat(rows)
    width = max(x.shape[1] for x in rows)
    return torch.cat([F.pad(x, (0, width - x.shape[1]), value=IGNORE_INDEX) for x in rows])


@torch.no_grad()
def predict(task, model, loader, forward, accelerator=None, device=None, desc="score"):
    """(predictions, labels, finite, seconds of the forward passes) of a whole loader, gathered across processes.
    Without an accelerator, one process on `device` (bench's CPU-only variants)."""
    model.eval()
    preds, labels, finite, model_seconds = [], [], True, 0.0
    main = accelerator is None or accelerator.is_main_process
    for batch in tqdm(loader, desc=desc, leave=False, disable=not main):
        if accelerator is None:
            batch = {k: v.to(device) for k, v in batch.items()}
        start = time.perf_counter()
        if accelerator is not None:
            with accelerator.autocast():
                logits = logits_of(forward(model, batch)).float()
        else:
            logits = logits_of(forward(model, batch)).float()
        model_seconds += time.perf_counter() - start
        finite = finite and bool(torch.isfinite(logits).all())
        batch_preds, batch_labels = task.predictions(logits, batch)
        if accelerator is not None:
            if batch_labels.dim() > 1:  # rows of different widths on each process
                batch_preds = accelerator.pad_across_processes(batch_preds, dim=1, pad_index=IGNORE_INDEX)
                batch_labels = accelerator.pad_across_processes(batch_labels, dim=1, pad_index=IGNORE_INDEX)
            batch_preds, batch_labels = accelerator.gather_for_metrics((batch_preds, batch_labels))
        preds.append(batch_preds.cpu())
        labels.append(batch_labels.cpu())
    if accelerator is not None:
        everywhere = accelerator.reduce(torch.tensor(float(finite), device=accelerator.device), reduction="sum")
        finite = int(everywhere.item()) == accelerator.num_processes
    return pad_rows(preds), pad_rows(labels), finite, model_seconds


def score(task, model, split, cfg, forward=None, accelerator=None, loader=None, device=None, desc=None):
    """`model` scored on task.splits[split]: Scored(predictions, labels, task.metrics, seconds...).

    forward(model, batch) -> logits (default: task.student_logits). accelerator and loader: those of a training run
    (model and loader already prepared); without them the run's Accelerator is made and the model moved to its
    device, unless `device` is given (one process, no Accelerator: bench's CPU-only variants)."""
    forward = forward or task.student_logits
    if loader is None:
        loader = collate.make_loader(task, split, cfg, shuffle=False)
        if device is None:
            accelerator = accelerator or recipe.make_accelerator(cfg)
            loader = accelerator.prepare(loader)
            model = model.to(accelerator.device)
    start = time.perf_counter()
    preds, labels, finite, model_seconds = predict(task, model, loader, forward, accelerator, device,
                                                   desc=desc or f"score {split}")
    seconds = time.perf_counter() - start
    metrics = task.metrics(preds.numpy(), labels.numpy())
    return Scored(preds, labels, metrics, seconds, model_seconds, finite,
                  accelerator is None or accelerator.is_main_process)
