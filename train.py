"""The training loop: one loop for every task and both roles, read top to bottom in fit().

fit() trains `model` on the task's training split, to match its labels and, when the run distils
(cfg.uses_teacher), the frozen teacher's outputs:
    for each batch:  teacher outputs (cached, or live)  ->  student outputs  ->  criterion  ->  step
Outputs are logits, or a dict holding "logits" and whatever else the task's loss reads (features); the loop only
adds up the loss's named terms. After each epoch the model is scored on the validation split (scoring.score), the
epoch's row is written, the best model is saved (saved.save_best) and a checkpoint is written (checkpoints.py).
A criterion that is an nn.Module with parameters (learned feature projections) is trained with the model: its
parameters are in the optimizer, the gradient clipping and the checkpoint, and restored on resume.
The same loop trains the teacher itself in --mode teacher (name "teacher": labels only).
"""
import json
import logging
import math
import os
import time

import torch
from tqdm import tqdm

import checkpoints
import collate
import models
import plots
import recipe
import saved
import scoring
import teacher_cache
import utils
from config import UserError
from losses import IGNORE_INDEX, logits_of

log = logging.getLogger("docdistill")
COUNTS = ("batches", "correct", "seen", "docs")  # the running sums that are not loss terms


def fit(cfg, task, model, forward, name="student"):
    """Train `model` (forward(model, batch) -> what the loss reads); keep the best one by validation
    task.metric_name; return that best score. The teacher teaches when name is "student" and cfg.uses_teacher.

    Nothing in --output-dir is written before the first save but --report-to's files; only weights that pass
    why_not_saveable() are saved. SIGTERM saves a checkpoint at the next optimizer step (or epoch end) and raises
    checkpoints.Stopped.
    """
    started = time.perf_counter()  # each epoch's row says how long the run has taken (validation included)
    accelerator = recipe.make_accelerator(cfg, track=True)
    teaching = name == "student" and cfg.uses_teacher
    criterion = task.make_loss(cfg).to(accelerator.device)  # -> {"total", and named terms}
    # With a cached teacher, training batches carry no teacher pixels: its outputs are looked up by index.
    train_loader = collate.make_loader(task, cfg.train_split, cfg, shuffle=True, lean=teaching and cfg.teacher_cache)
    eval_loader = collate.make_loader(task, cfg.eval_split, cfg, shuffle=False)
    optimizer = make_optimizer(cfg, model, criterion)
    # Counted on the unsharded loader: Accelerate steps the scheduler once per process per optimizer step.
    scheduler = recipe.make_scheduler(cfg, optimizer, math.ceil(len(train_loader) / cfg.grad_accum) * cfg.epochs)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    checkpoint = checkpoints.load_checkpoint(cfg.checkpoint, cfg, name) if cfg.checkpoint else None  # before slow work
    peak_memory(accelerator, "preprocessing (data and models loaded)")
    clock = time.perf_counter()  # the first epoch's training time includes building the teacher cache
    teacher_outputs_of, cache_seconds = (teacher_outputs(accelerator, task, cfg) if teaching else (None, {}))
    run = Run(cfg, name, accelerator, model, optimizer, scheduler, criterion)
    history = run.resume(checkpoint)
    with recipe.tracking(accelerator, cfg, name), utils.sigterm_requests() as sigterm:
        for epoch in range(run.state["epoch"], cfg.epochs):
            if run.state["stop_reason"]:  # stopped early, in this run or in the one it resumes
                break
            model.train()
            train_loader.set_epoch(epoch)
            loader = train_loader
            if run.state["step_in_epoch"]:  # mid-epoch resume: same permutation, skip what was already seen
                loader = accelerator.skip_first_batches(train_loader, run.state["step_in_epoch"])
            sums = run.state["sums"] or {k: 0 for k in COUNTS}  # + every term the loss returns, on first sight
            bar = tqdm(loader, desc=f"{name} epoch {epoch + 1}/{cfg.epochs}", initial=run.state["step_in_epoch"],
                       total=len(train_loader), disable=not accelerator.is_main_process)
            for step, batch in enumerate(bar, start=run.state["step_in_epoch"]):
                lr = scheduler.get_last_lr()[0]  # this step's
                teacher_out = teacher_outputs_of(batch) if teacher_outputs_of else None
                with accelerator.accumulate(model):
                    outputs = forward(model, batch)
                    losses = criterion(outputs, teacher_out, batch)
                    if not torch.isfinite(losses["total"]):  # stop before the step
                        raise UserError(f"loss became {losses['total'].item()} at epoch {epoch + 1} step "
                                        f"{step + 1}: {non_finite_loss_cause(teacher_out)}; {run.last_good}")
                    accelerator.backward(losses["total"])
                    if accelerator.sync_gradients:
                        sync_criterion_gradients(accelerator, criterion)
                        accelerator.clip_grad_norm_([*model.parameters(), *criterion.parameters()], 1.0)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                loss_values = {k: value.item() for k, value in losses.items()}
                add_to_sums(sums, task, logits_of(outputs).detach(), batch, loss_values)
                accelerator.log({**{f"train/{k}": v for k, v in loss_values.items()}, "train/lr": lr},
                                step=epoch * len(train_loader) + step + 1)
                if accelerator.sync_gradients:  # only right after an optimizer step: no half-accumulated gradients
                    stopping = stop_requested(accelerator, sigterm)
                    if stopping or (cfg.save_every and (step + 1) // cfg.grad_accum % cfg.save_every == 0):
                        run.state.update(step_in_epoch=step + 1, sums=sums)
                        run.save_checkpoint(finite_loss(accelerator, model, forward, criterion, batch, teacher_out))
                    if stopping:
                        accelerator.wait_for_everyone()
                        raise checkpoints.stopped_by_sigterm(run.checkpoint_path, run.state)
                if step % cfg.log_every == 0:
                    bar.set_postfix(progress(sums))
            bar.close()
            run.state.update(step_in_epoch=0, sums=None)
            train_seconds = time.perf_counter() - clock
            peak_memory(accelerator, f"epoch {epoch + 1} training")
            scored = scoring.score(task, model, cfg.eval_split, cfg, forward, accelerator, eval_loader,
                                   desc=f"validate {name}")
            row = epoch_row(accelerator, task, epoch, sums, scored, scheduler, train_seconds, cache_seconds,
                            peak_memory(accelerator, f"epoch {epoch + 1} evaluation"))
            row["run_seconds"] = time.perf_counter() - started  # since this process started the run
            cache_seconds = {}
            run.end_epoch(task, epoch, row, scored.finite, history, (epoch + 1) * len(train_loader))
            if epoch + 1 < cfg.epochs and stop_requested(accelerator, sigterm):  # got it during validation
                raise checkpoints.stopped_by_sigterm(run.checkpoint_path, run.state)
            clock = time.perf_counter()
    accelerator.end_training()
    if accelerator.is_main_process:
        plots.plot_curves(history, os.path.join(cfg.output_dir, f"{name}_curves.png"))
    return run.state["best"]


class Run:
    """What a training run keeps between steps and epochs, and how it resumes and saves: its position and running
    sums (state, saved in every checkpoint), the rows written so far, and what the error messages say is left."""

    def __init__(self, cfg, name, accelerator, model, optimizer, scheduler, criterion):
        self.cfg, self.name, self.accelerator = cfg, name, accelerator
        self.model, self.optimizer, self.scheduler, self.criterion = model, optimizer, scheduler, criterion
        self.state = {"epoch": 0, "step_in_epoch": 0, "best": -1.0, "sums": None,
                      "early_stopping": recipe.early_stopping_start(), "stop_reason": ""}
        self.checkpoint_path = checkpoints.checkpoint_path(cfg.output_dir, name)
        self.metrics_path = os.path.join(cfg.output_dir, f"{name}_metrics.jsonl")
        self.last_good = "nothing of this run was saved"

    def resume(self, checkpoint):
        """Everything a checkpoint holds restored (weights, the loss's parameters, optimizer, scheduler, scaler, RNG
        states, position and sums); returns the metrics rows up to its epoch (later ones are redone)."""
        if checkpoint is None:
            return []
        models.load_student_weights(self.accelerator.unwrap_model(self.model), checkpoint["model"], self.cfg.checkpoint)
        checkpoints.restore_criterion(self.criterion, checkpoint)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(checkpoint["scaler"])
        utils.set_rng_state(checkpoint["rng"])
        self.state = {k: checkpoint[k] for k in self.state}
        self.last_good = checkpoints.good_checkpoint(self.cfg.checkpoint, self.state)
        log.info("resumed from %s at epoch %d, step %d%s", self.cfg.checkpoint, self.state["epoch"] + 1,
                 self.state["step_in_epoch"], self.state["stop_reason"] and
                 f"; it had stopped ({self.state['stop_reason']})")
        return [row for row in utils.read_jsonl(self.metrics_path) if row["epoch"] <= self.state["epoch"]]

    def check_saveable(self, outputs_finite):
        problem = why_not_saveable(self.model, self.optimizer, outputs_finite, self.criterion)
        if problem:
            raise UserError(f"the weights at {checkpoints.position(self.state)} {problem}: lower --lr, or use --amp no; "
                            f"{self.last_good}")

    def save_checkpoint(self, outputs_finite):
        """The latest checkpoint at the current position (main process), once the weights are worth resuming."""
        self.check_saveable(outputs_finite)
        if self.accelerator.is_main_process:
            checkpoints.save_checkpoint(self.checkpoint_path, self.accelerator, self.model, self.optimizer,
                                        self.scheduler, self.state, self.cfg, self.name, self.criterion)
        self.last_good = checkpoints.good_checkpoint(self.checkpoint_path, self.state)

    def end_epoch(self, task, epoch, row, outputs_finite, history, tracker_step):
        """The epoch's row counted (best score, early stopping), logged, tracked and written; the best model and the
        checkpoint saved."""
        cfg, metric = self.cfg, task.metric_name
        improved = row[f"val_{metric}"] > self.state["best"]
        self.state["best"] = max(self.state["best"], row[f"val_{metric}"])
        self.state["stop_reason"] = recipe.early_stopping(self.state["early_stopping"], row[f"val_{metric}"],
                                                          cfg.early_stopping_patience, cfg.early_stopping_min_delta)
        if self.state["stop_reason"]:
            row["stop_reason"] = self.state["stop_reason"]
        self.state["epoch"] = epoch + 1
        self.check_saveable(outputs_finite)
        if self.accelerator.is_main_process:
            terms = [k[len("train_"):] for k in row if k.startswith("train_") and k not in NOT_TERMS]
            log.info("epoch %d: loss %.4f (%s), train acc %.4f, val %s %.4f%s", epoch + 1, row["train_loss"],
                     ", ".join(f"{k} {row[f'train_{k}']:.4f}" for k in terms), row["train_accuracy"], metric,
                     row[f"val_{metric}"], " (best)" if improved else "")
            if self.state["stop_reason"]:
                log.info("%s: stopped after epoch %d of %d, the best epoch's model is kept", self.state["stop_reason"],
                         epoch + 1, cfg.epochs)
            history.append(row)
            recipe.track(self.accelerator, cfg, {f"epoch/{k}": v for k, v in row.items()
                                                 if k not in ("epoch", "metric_name")}, tracker_step)
            utils.write_jsonl(history, self.metrics_path)
            if improved:
                saved.save_best(task, self.accelerator.unwrap_model(self.model), cfg.output_dir, self.name)
            checkpoints.save_checkpoint(self.checkpoint_path, self.accelerator, self.model, self.optimizer,
                                        self.scheduler, self.state, cfg, self.name, self.criterion)
        self.last_good = checkpoints.good_checkpoint(self.checkpoint_path, self.state)
        self.accelerator.wait_for_everyone()


NOT_TERMS = ("train_loss", "train_accuracy", "train_seconds", "train_docs_per_s")


def add_to_sums(sums, task, logits, batch, loss_values):
    """A training batch's accuracy counts and loss terms (floats) added to the epoch's running sums."""
    preds, labels = task.predictions(logits, batch)
    keep = labels != IGNORE_INDEX
    sums["correct"] += int((preds == labels)[keep].sum())
    sums["seen"] += int(keep.sum())
    sums["batches"] += 1
    sums["docs"] += len(batch["labels"])
    for k, value in loss_values.items():
        sums[k] = sums.get(k, 0.0) + value


def progress(sums):
    """The progress bar's numbers: the epoch's mean loss and terms so far, and its training accuracy."""
    return {"loss": f"{sums['total'] / sums['batches']:.3f}",
            **{k: f"{v / sums['batches']:.3f}" for k, v in sums.items() if k not in COUNTS + ("total",)},
            "acc": f"{sums['correct'] / max(sums['seen'], 1):.3f}"}


def epoch_row(accelerator, task, epoch, sums, scored, scheduler, train_seconds, cache_seconds, peak):
    """The epoch's metrics row: the loss and its terms and the training accuracy summed over every process, the
    learning rate, seconds and peak memory, and the validation scores."""
    keys = [k for k in sums if k not in COUNTS] + list(COUNTS)  # "total", the loss's terms, the counts
    totals = dict(zip(keys, accelerator.reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                                                            device=accelerator.device), reduction="sum").tolist()))
    terms = [k for k in keys if k not in COUNTS + ("total",)]
    return {"epoch": epoch + 1, "train_loss": totals["total"] / totals["batches"],
            **{f"train_{k}": totals[k] / totals["batches"] for k in terms},
            "train_accuracy": totals["correct"] / max(totals["seen"], 1),
            "metric_name": task.metric_name, "lr": scheduler.get_last_lr()[0],
            "train_seconds": train_seconds, "train_docs_per_s": totals["docs"] / train_seconds,
            **cache_seconds,  # in train_seconds too: teacher_cache_seconds, precision_check_seconds
            **peak,  # peak_rss_mb (and peak_cuda_mb): the process's peak so far, the largest over processes
            **{f"val_{k}": v for k, v in scored.metrics.items() if isinstance(v, float)}}


def make_optimizer(cfg, model, criterion):
    """AdamW over the model's trainable parameters (with LoRA: the adapters and the head), then the criterion's."""
    return torch.optim.AdamW([*(p for p in model.parameters() if p.requires_grad), *criterion.parameters()],
                             lr=cfg.lr, weight_decay=cfg.weight_decay)


def cache_extra(cfg, task, teacher):
    """What the teacher cache's key holds besides the teacher's weights and the split: the task, both label orders
    and task.teacher_cache_extra (which outputs a task's teacher forward returns, when more than its logits)."""
    return json.dumps([cfg.task, models.label_names(teacher), task.labels, *task.teacher_cache_extra])


def teacher_outputs(accelerator, task, cfg):
    """(batch -> the frozen teacher's outputs, the cache's fill seconds for the first metrics row). Frozen and never
    wrapped for DDP: it has no gradients to synchronise. Its input is not augmented, so its outputs are the same
    every epoch: computed once and stored (teacher_cache.py), or with --no-teacher-cache on every batch."""
    teacher = models.freeze(task.teacher).to(accelerator.device)
    if not cfg.teacher_cache:
        def live(batch):
            with torch.no_grad(), accelerator.autocast():
                return task.teacher_outputs(teacher, batch)
        return live, {}
    cache = cached_teacher(accelerator, task, teacher, task.teacher_outputs, cfg)
    peak_memory(accelerator, "the teacher cache")
    return cache, cache.seconds


def cached_teacher(accelerator, task, teacher, teacher_forward, cfg):
    """The frozen teacher's outputs on the training split, computed once and stored (teacher_cache.py)."""
    return teacher_cache.build(
        accelerator, teacher, teacher_forward, task.splits[cfg.train_split], task.collator, cfg.batch_size,
        cfg.cache_dir, extra=cache_extra(cfg, task, teacher), precision=cfg.teacher_precision,
        temperature=cfg.temperature, top_k=task.teacher_top_k)


@torch.no_grad()
def finite_loss(accelerator, model, forward, criterion, batch, teacher_out):
    """Whether the current weights give a finite loss on every process's `batch`.

    In eval mode: no dropout, so no random number is drawn and an exact resume stays exact.
    """
    model = accelerator.unwrap_model(model)
    model.eval()
    with accelerator.autocast():
        outputs = forward(model, batch)
    model.train()
    finite = torch.isfinite(criterion(outputs, teacher_out, batch)["total"]).float()
    return accelerator.reduce(finite, reduction="sum").item() == accelerator.num_processes


def why_not_saveable(model, optimizer, outputs_finite, criterion):
    """Why the current weights are not worth resuming from, or None if they are."""
    if not utils.all_finite([*model.parameters(), *criterion.parameters()]):
        return "are not finite"
    if not utils.all_finite(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)):
        return "have a non-finite optimizer state"
    if not outputs_finite:
        return "give non-finite outputs"
    return None


def non_finite_loss_cause(teacher_out):
    tensors = list(teacher_out.values()) if isinstance(teacher_out, dict) else [teacher_out]
    if teacher_out is not None and not all(bool(torch.isfinite(t).all()) for t in tensors):
        return "the teacher's logits are not finite: check the teacher's weights (--teacher)"
    return "lower --lr, or use --amp no"


def sync_criterion_gradients(accelerator, criterion):
    """The criterion is not wrapped for DDP: average its gradients across processes before the step."""
    if accelerator.num_processes > 1:
        for p in criterion.parameters():
            if p.grad is not None:
                p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


def stop_requested(accelerator, sigterm):
    """True on every process once any of them got SIGTERM, so that all stop at the same step."""
    if sigterm:
        accelerator.set_trigger()
    return accelerator.check_trigger()


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
