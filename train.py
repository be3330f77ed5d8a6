"""The training loop and evaluation: one loop for every task, read top to bottom (checkpoints: checkpoints.py).

fit() trains `model` to match labels and, when a teacher is given, the teacher's softened outputs:
    for each batch:  teacher outputs (frozen, no grad)  ->  student outputs  ->  criterion  ->  step
Outputs are logits, or a dict holding "logits" and whatever else the task's loss reads (features); the loop only
adds up the loss's named terms and scores the logits. A criterion that is an nn.Module with parameters (learned
feature projections) is trained with the model: its parameters are in the optimizer, the gradient clipping and
the checkpoint ("criterion"), and restored on resume; a criterion without parameters changes nothing.
The same loop trains the teacher itself in --mode teacher (no teacher, alpha 0).
"""
import json
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch.utils.data import DataLoader
from tqdm import tqdm

import checkpoints
import collate
import models
import recipe
import teacher_cache
import utils
from config import UserError
from losses import IGNORE_INDEX

log = logging.getLogger("docdistill")
COUNTS = ("batches", "correct", "seen", "docs")  # the running sums that are not loss terms


def make_accelerator(cfg, track=False):
    """With track, the --report-to tracker too (training only)."""
    if cfg.amp == "fp16" and not torch.cuda.is_available():
        raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 on CPU or --amp no")
    # LayoutLMv3 reads its relative position biases under torch.no_grad (as the original implementation does):
    # they never get a gradient, and DDP must not wait for one.
    unused = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[unused], mixed_precision=cfg.amp,
                       gradient_accumulation_steps=cfg.grad_accum,
                       log_with=cfg.report_to if track and cfg.report_to != "none" else None,
                       project_dir=recipe.tracking_dir(cfg))


def logits_of(outputs):
    """The logits of a forward pass: the tensor itself, or the "logits" of a dict of outputs."""
    return outputs["logits"] if isinstance(outputs, dict) else outputs


def criterion_parameters(criterion):
    return list(criterion.parameters()) if isinstance(criterion, torch.nn.Module) else []


def make_optimizer(cfg, model, criterion):
    """AdamW over the model's trainable parameters (with LoRA: the adapters and the head), then the criterion's."""
    return torch.optim.AdamW([*(p for p in model.parameters() if p.requires_grad), *criterion_parameters(criterion)],
                             lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_loader(task, split, cfg, shuffle, lean=False):
    """lean: batches without the teacher's pixels (training with a cached teacher, whose outputs are looked up by
    index): the preprocessed teacher pages are neither read from the split nor collated. The order is the same."""
    data = task.splits[split]
    collator = task.collator
    if lean:
        data, collator = collate.without_teacher_pixel_columns(data), collate.without_teacher_pixels(collator)
    lengths = None
    if cfg.group_by_length and "n_tokens" in data.column_names:
        lengths = [int(n) for n in data.with_format(None)["n_tokens"]]
    sampler = recipe.EpochShuffle(len(data), cfg.seed, cfg.batch_size, lengths) if shuffle else None
    # Its own generator: each new iterator draws a worker base seed, which must not advance the global RNG
    # (a resumed run makes one iterator more than an uninterrupted one, and dropout would drift).
    return DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collator,
                      num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(cfg.seed))


@torch.no_grad()
def predict(accelerator, loader, forward, model, desc="eval", decode=None):
    """Logits and labels for a whole split, gathered across processes (duplicates from uneven sharding dropped).

    Per-word tasks have a different number of words per batch: batches are padded to the longest
    (logits 0, labels IGNORE_INDEX) before they are stacked. With decode (a task's predictions(logits, batch)),
    what is returned in place of the logits are the predictions it gives, [B, L] like the labels.
    """
    model.eval()
    all_logits, all_labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process):
        with accelerator.autocast():
            logits = logits_of(forward(model, batch)).float()
        logits, labels = decode(logits, batch) if decode else (logits, batch["labels"])
        labels = accelerator.pad_across_processes(labels, dim=1, pad_index=IGNORE_INDEX) \
            if labels.dim() > 1 else labels
        if logits.dim() > 2 or decode:
            logits = accelerator.pad_across_processes(logits, dim=1, pad_index=IGNORE_INDEX if decode else 0)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    if all_labels[0].dim() > 1:
        width = max(x.shape[1] for x in all_labels)
        all_labels = [F.pad(x, (0, width - x.shape[1]), value=IGNORE_INDEX) for x in all_labels]
        all_logits = [F.pad(x, (0, width - x.shape[1]), value=IGNORE_INDEX) if decode else
                      F.pad(x, (0, 0, 0, width - x.shape[1])) for x in all_logits]
    return torch.cat(all_logits), torch.cat(all_labels)


def live_teacher(accelerator, teacher, teacher_forward):
    """Teacher logits computed on every batch (the naive way; used when the cache is off)."""
    def logits_of(batch):
        with torch.no_grad(), accelerator.autocast():
            return teacher_forward(teacher, batch)
    return logits_of


@torch.no_grad()
def finite_loss(accelerator, model, forward, criterion, batch, teacher_logits):
    """Whether the current weights give a finite loss on every process's `batch`.

    In eval mode: no dropout, so no random number is drawn and an exact resume stays exact.
    """
    model = accelerator.unwrap_model(model)
    model.eval()
    with accelerator.autocast():
        logits = forward(model, batch)
    model.train()
    finite = torch.isfinite(criterion(logits, teacher_logits, batch)["total"]).float()
    return accelerator.reduce(finite, reduction="sum").item() == accelerator.num_processes


def why_not_saveable(model, optimizer, outputs_finite, criterion=None):
    """Why the current weights are not worth resuming from, or None if they are."""
    if not utils.all_finite([*model.parameters(), *criterion_parameters(criterion)]):
        return "are not finite"
    if not utils.all_finite(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)):
        return "have a non-finite optimizer state"
    if not outputs_finite:
        return "give non-finite outputs"
    return None


def non_finite_loss_cause(teacher_logits):
    tensors = list(teacher_logits.values()) if isinstance(teacher_logits, dict) else [teacher_logits]
    if teacher_logits is not None and not all(bool(torch.isfinite(t).all()) for t in tensors):
        return "the teacher's logits are not finite: check the teacher's weights (--teacher)"
    return "lower --lr, or use --amp no"


def sync_criterion_gradients(accelerator, criterion):
    """The criterion is not wrapped for DDP: average its gradients across processes before the step."""
    if accelerator.num_processes > 1:
        for p in criterion_parameters(criterion):
            if p.grad is not None:
                p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


def stop_requested(accelerator, sigterm):
    """True on every process once any of them got SIGTERM, so that all stop at the same step."""
    if sigterm:
        accelerator.set_trigger()
    return accelerator.check_trigger()


def cache_extra(cfg, task, teacher):
    """What the teacher cache's key holds besides the teacher's weights and the split: the task, both label orders
    and task.teacher_cache_extra (which outputs a task's teacher forward returns, when more than its logits)."""
    return json.dumps([cfg.task, models.label_names(teacher), task.labels, *getattr(task, "teacher_cache_extra", [])])


def cached_teacher(accelerator, task, teacher, teacher_forward, cfg):
    """The frozen teacher's outputs on the training split, computed once and stored (teacher_cache.py)."""
    return teacher_cache.build(
        accelerator, teacher, teacher_forward, task.splits[cfg.train_split], task.collator, cfg.batch_size,
        cfg.cache_dir, extra=cache_extra(cfg, task, teacher), precision=cfg.teacher_precision,
        temperature=cfg.temperature)


def peak_memory(accelerator, phase):
    """The peak memory so far (utils.peak_memory_mb; the largest over processes), logged after `phase` by the
    main process, and returned for the metrics row. Every process must call it (a gather)."""
    peak = utils.peak_memory_mb(accelerator.device)
    values = accelerator.gather(torch.tensor([list(peak.values())], dtype=torch.float64, device=accelerator.device))
    peak = dict(zip(peak, values.reshape(-1, len(peak)).max(0).values.tolist()))
    if accelerator.is_main_process:
        log.info("peak memory after %s: RSS %.0f MiB%s%s", phase, peak["peak_rss_mb"],
                 f", CUDA {peak['peak_cuda_mb']:.0f} MiB" if "peak_cuda_mb" in peak else "",
                 " (largest process)" if accelerator.num_processes > 1 else "")
    return peak


def fit(cfg, task, model, forward, teacher=None, teacher_forward=None, name="student"):
    """Train `model` on task.splits[cfg.train_split]; keep the best one by validation task.metric_name.

    Nothing in --output-dir is written before the first save but --report-to's files; only weights that pass
    why_not_saveable() are saved.
    SIGTERM saves a checkpoint at the next optimizer step (or epoch end) and raises checkpoints.Stopped.
    """
    accelerator = make_accelerator(cfg, track=True)
    out_dir = cfg.output_dir
    criterion = task.make_loss(cfg, with_teacher=teacher is not None)  # -> {"total", and named terms}
    if isinstance(criterion, torch.nn.Module):
        criterion = criterion.to(accelerator.device)
    trained = [*model.parameters(), *criterion_parameters(criterion)]  # what the optimizer steps and clips
    decode = getattr(task, "predictions", None)  # sequence tasks: what is scored is decoded from the logits
    # With a cached teacher, training batches carry no teacher pixels: its outputs are looked up by index.
    # (The cache is filled, and validation runs, with the task's own collator; the data order is the same.)
    train_loader = make_loader(task, cfg.train_split, cfg, shuffle=True, lean=teacher is not None and cfg.teacher_cache)
    eval_loader = make_loader(task, cfg.eval_split, cfg, shuffle=False)
    optimizer = make_optimizer(cfg, model, criterion)
    # Counted on the unsharded loader: Accelerate steps the scheduler once per process per optimizer step.
    total_steps = math.ceil(len(train_loader) / cfg.grad_accum) * cfg.epochs
    scheduler = recipe.make_scheduler(cfg, optimizer, total_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    # before the slow part
    checkpoint = checkpoints.load_checkpoint(cfg.checkpoint, cfg, name) if cfg.checkpoint else None
    peak_memory(accelerator, "preprocessing (data and models loaded)")
    clock = time.perf_counter()  # training time of the first epoch includes building the teacher cache
    teacher_logits_of, cache_seconds = None, {}  # the cache's fill seconds go to this run's first metrics row
    if teacher is not None:  # frozen and never wrapped for DDP: it has no gradients to synchronise
        teacher = models.freeze(teacher).to(accelerator.device)
        teacher_logits_of = live_teacher(accelerator, teacher, teacher_forward)
        if cfg.teacher_cache:  # the teacher's input is not augmented, so its logits are the same every epoch
            teacher_logits_of = cached_teacher(accelerator, task, teacher, teacher_forward, cfg)
            cache_seconds = teacher_logits_of.seconds
            peak_memory(accelerator, "the teacher cache")

    state = {"epoch": 0, "step_in_epoch": 0, "best": -1.0, "sums": None,
             "early_stopping": recipe.early_stopping_start(), "stop_reason": ""}
    ckpt_path = checkpoints.checkpoint_path(out_dir, name)
    metrics_path = os.path.join(out_dir, f"{name}_metrics.jsonl")
    history = []  # this run's metrics rows; the file is rewritten whole at each epoch end
    last_good = "nothing of this run was saved"
    if checkpoint is not None:
        models.load_student_weights(accelerator.unwrap_model(model), checkpoint["model"], cfg.checkpoint)
        checkpoints.restore_criterion(criterion, checkpoint)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["scaler"] is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(checkpoint["scaler"])
        utils.set_rng_state(checkpoint["rng"])
        state = {k: checkpoint[k] for k in state}
        history = [row for row in utils.read_jsonl(metrics_path) if row["epoch"] <= state["epoch"]]  # rest: redone
        last_good = checkpoints.good_checkpoint(cfg.checkpoint, state)
        log.info("resumed from %s at epoch %d, step %d%s", cfg.checkpoint, state["epoch"] + 1,
                 state["step_in_epoch"], state["stop_reason"] and f"; it had stopped ({state['stop_reason']})")

    def check_saveable(outputs_finite):
        problem = why_not_saveable(model, optimizer, outputs_finite, criterion)
        if problem:
            raise UserError(f"the weights at {checkpoints.position(state)} {problem}: lower --lr, or use --amp no; "
                            f"{last_good}")

    with recipe.tracking(accelerator, cfg, name), utils.sigterm_requests() as sigterm:
        for epoch in range(state["epoch"], cfg.epochs):
            if state["stop_reason"]:  # stopped early, in this run or in the one it resumes
                break
            model.train()
            train_loader.set_epoch(epoch)
            loader = train_loader
            if state["step_in_epoch"]:  # mid-epoch resume: same permutation, skip what was already seen
                loader = accelerator.skip_first_batches(train_loader, state["step_in_epoch"])
            sums = state["sums"] or {k: 0 for k in COUNTS}  # + every term the loss returns, on first sight
            bar = tqdm(loader, desc=f"{name} epoch {epoch + 1}/{cfg.epochs}", initial=state["step_in_epoch"],
                       total=len(train_loader), disable=not accelerator.is_main_process)
            for step, batch in enumerate(bar, start=state["step_in_epoch"]):
                lr = scheduler.get_last_lr()[0]  # this step's
                teacher_logits = teacher_logits_of(batch) if teacher_logits_of else None
                with accelerator.accumulate(model):
                    outputs = forward(model, batch)
                    losses = criterion(outputs, teacher_logits, batch)
                    if not torch.isfinite(losses["total"]):  # stop before the step
                        raise UserError(f"loss became {losses['total'].item()} at epoch {epoch + 1} step "
                                        f"{step + 1}: {non_finite_loss_cause(teacher_logits)}; {last_good}")
                    accelerator.backward(losses["total"])
                    if accelerator.sync_gradients:
                        sync_criterion_gradients(accelerator, criterion)
                        accelerator.clip_grad_norm_(trained, 1.0)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                logits = logits_of(outputs).detach()
                preds, labels = decode(logits, batch) if decode else (logits.argmax(-1), batch["labels"])
                keep = labels != IGNORE_INDEX
                sums["correct"] += int((preds == labels)[keep].sum())
                sums["seen"] += int(keep.sum())
                sums["batches"] += 1
                sums["docs"] += len(batch["labels"])
                loss_values = {k: value.item() for k, value in losses.items()}
                for k, value in loss_values.items():
                    sums[k] = sums.get(k, 0.0) + value
                accelerator.log({**{f"train/{k}": v for k, v in loss_values.items()}, "train/lr": lr},
                                step=epoch * len(train_loader) + step + 1)
                # Only right after an optimizer step: no half-accumulated gradients need saving.
                if accelerator.sync_gradients:
                    stopping = stop_requested(accelerator, sigterm)
                    if stopping or (cfg.save_every and (step + 1) // cfg.grad_accum % cfg.save_every == 0):
                        state.update(step_in_epoch=step + 1, sums=sums)
                        check_saveable(finite_loss(accelerator, model, forward, criterion, batch, teacher_logits))
                        if accelerator.is_main_process:
                            checkpoints.save_checkpoint(ckpt_path, accelerator, model, optimizer, scheduler, state,
                                                        cfg, name, criterion)
                        last_good = checkpoints.good_checkpoint(ckpt_path, state)
                    if stopping:
                        accelerator.wait_for_everyone()
                        raise checkpoints.stopped_by_sigterm(ckpt_path, state)
                if step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{sums['total'] / sums['batches']:.3f}",
                                    **{k: f"{v / sums['batches']:.3f}" for k, v in sums.items()
                                       if k not in COUNTS + ("total",)},
                                    acc=f"{sums['correct'] / max(sums['seen'], 1):.3f}")
            bar.close()
            state.update(step_in_epoch=0, sums=None)
            train_seconds = time.perf_counter() - clock
            peak_memory(accelerator, f"epoch {epoch + 1} training")

            logits, labels = predict(accelerator, eval_loader, forward, model, desc=f"validate {name}",
                                     decode=decode)
            peak = peak_memory(accelerator, f"epoch {epoch + 1} evaluation")
            scores = task.metrics((logits if decode else logits.argmax(-1)).numpy(), labels.numpy())
            keys = [k for k in sums if k not in COUNTS] + list(COUNTS)  # "total", the loss's terms, the counts
            totals = dict(zip(keys, accelerator.reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                                                                    device=accelerator.device),
                                                       reduction="sum").tolist()))
            terms = [k for k in keys if k not in COUNTS + ("total",)]
            row = {"epoch": epoch + 1, "train_loss": totals["total"] / totals["batches"],
                   **{f"train_{k}": totals[k] / totals["batches"] for k in terms},
                   "train_accuracy": totals["correct"] / max(totals["seen"], 1),
                   "metric_name": task.metric_name, "lr": scheduler.get_last_lr()[0],
                   "train_seconds": train_seconds, "train_docs_per_s": totals["docs"] / train_seconds,
                   **cache_seconds,  # in train_seconds too: teacher_cache_seconds, precision_check_seconds
                   **peak,  # peak_rss_mb (and peak_cuda_mb): the process's peak so far, the largest over processes
                   **{f"val_{k}": v for k, v in scores.items() if isinstance(v, float)}}
            cache_seconds = {}
            improved = row[f"val_{task.metric_name}"] > state["best"]
            state["best"] = max(state["best"], row[f"val_{task.metric_name}"])
            state["stop_reason"] = recipe.early_stopping(state["early_stopping"], row[f"val_{task.metric_name}"],
                                                         cfg.early_stopping_patience, cfg.early_stopping_min_delta)
            if state["stop_reason"]:
                row["stop_reason"] = state["stop_reason"]
            state["epoch"] = epoch + 1
            check_saveable(bool(torch.isfinite(logits.float()).all()))
            if accelerator.is_main_process:
                log.info("epoch %d: loss %.4f (%s), train acc %.4f, val %s %.4f%s", epoch + 1, row["train_loss"],
                         ", ".join(f"{k} {row[f'train_{k}']:.4f}" for k in terms), row["train_accuracy"],
                         task.metric_name, row[f"val_{task.metric_name}"], " (best)" if improved else "")
                if state["stop_reason"]:
                    log.info("%s: stopped after epoch %d of %d, the best epoch's model is kept", state["stop_reason"],
                             epoch + 1, cfg.epochs)
                history.append(row)
                recipe.track(accelerator, cfg, {f"epoch/{k}": v for k, v in row.items()
                                                if k not in ("epoch", "metric_name")}, (epoch + 1) * len(train_loader))
                utils.write_jsonl(history, metrics_path)
                if improved:
                    checkpoints.save_best(task, accelerator.unwrap_model(model), out_dir, name)
                checkpoints.save_checkpoint(ckpt_path, accelerator, model, optimizer, scheduler, state, cfg, name,
                                            criterion)
            last_good = checkpoints.good_checkpoint(ckpt_path, state)
            accelerator.wait_for_everyone()
            if epoch + 1 < cfg.epochs and stop_requested(accelerator, sigterm):  # got it during validation
                raise checkpoints.stopped_by_sigterm(ckpt_path, state)
            clock = time.perf_counter()

    accelerator.end_training()
    if accelerator.is_main_process:
        utils.plot_curves(history, os.path.join(out_dir, f"{name}_curves.png"))
    return state["best"]
