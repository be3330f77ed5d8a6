"""Checkpoints and run protection: what a run saves, how it resumes, and what it refuses to overwrite.

A checkpoint holds everything needed to continue exactly (model, the loss's learned parameters, optimizer,
scheduler, grad scaler, RNG states, position, running sums) and the settings that shape the run (RESUME_KEYS);
tensors and plain values only (loaded with weights_only), with a checksum of its tensors. The best model is saved
by saved.save_best.
"""
import os

import torch

import utils
from config import KD_TERMS, UserError, defaults

# Settings that must match between a checkpoint and the run resuming from it.
RESUME_KEYS = ("task", "teacher", "extra_teachers", "teacher_weights", "student_config", "student_size", "student_image_size", "tokenizer", "dataset",
               "unlabeled", "unlabeled_weight", "labeled_fraction", "train_split", "max_samples", "max_length",
               "batch_size", "grad_accum", "lr", "weight_decay", "scheduler", "warmup_ratio", "alpha", "temperature",
               "seed", "epochs", "early_stopping_patience", "early_stopping_min_delta", "lora_r", "lora_alpha",
               "lora_dropout", "lora_target_modules", "group_by_length", "kd_terms", "blank_weight", "feature_weight",
               "student_height", "max_text_width", "max_new_tokens", "degrade_height", "degrade_blur", "degrade_noise",
               "degrade_jpeg", "augment", "label_conventions", "teacher_top_k", "mute_teacher_disagreements")
# Settings whose default changed when they were added: a checkpoint that does not record them ran like this.
BEFORE = {"label_conventions": False, "teacher_top_k": 0}


def criterion_state(criterion):
    return criterion.state_dict() if isinstance(criterion, torch.nn.Module) else {}


def restore_criterion(criterion, checkpoint):
    """The criterion's parameters from a checkpoint (one written before criteria had any holds none)."""
    if isinstance(criterion, torch.nn.Module):
        criterion.load_state_dict(checkpoint.get("criterion", {}))


class Stopped(Exception):
    """The run was asked to stop (SIGTERM) and saved a resumable checkpoint first; main() exits with 143."""
    tracking_status = "KILLED"  # of its MLflow run (recipe.tracking)


def checkpoint_path(out_dir, name):
    return os.path.join(out_dir, "latest_checkpoint.pth" if name == "student" else f"{name}_checkpoint.pth")


def run_files(out_dir, name):
    """What a run of `name` (student or teacher) writes in out_dir: checkpoint, metrics, best model."""
    return [checkpoint_path(out_dir, name), os.path.join(out_dir, f"{name}_metrics.jsonl"),
            os.path.join(out_dir, f"{name}_model.pth"), os.path.join(out_dir, name)]


def refuse_to_overwrite(cfg, name):
    """Stop when --output-dir holds a run of `name` that this one would replace, before any slow work or write.

    Going on is fine in an empty directory, when resuming from a checkpoint kept in it, or with --overwrite.
    """
    existing = [os.path.basename(p) for p in run_files(cfg.output_dir, name) if os.path.exists(p)]
    if not existing or cfg.overwrite:
        return
    resuming_it = bool(cfg.checkpoint) and os.path.samefile(os.path.dirname(os.path.abspath(cfg.checkpoint)),
                                                            cfg.output_dir)
    if not resuming_it:
        raise UserError(f"{cfg.output_dir} already holds a {name} run ({', '.join(existing)}): continue it with "
                        f"--checkpoint {checkpoint_path(cfg.output_dir, name)}, replace it with --overwrite, or "
                        f"choose another --output-dir")


def position(state):
    """Where in training a saved state is, in words."""
    if state["step_in_epoch"]:
        return f"epoch {state['epoch'] + 1} step {state['step_in_epoch']}"
    return f"the end of epoch {state['epoch']}"


def good_checkpoint(path, state):
    """What the error messages say is left to resume from."""
    return f"the last good checkpoint is {path} ({position(state)}), kept as it was"


def stopped_by_sigterm(path, state):
    return Stopped(f"stopped by SIGTERM: saved {path} at {position(state)}; continue with --checkpoint {path}")


def save_checkpoint(path, accelerator, model, optimizer, scheduler, state, cfg, name, criterion=None):
    """Everything needed to continue exactly where we are; tensors and plain values only (weights_only), with a
    checksum of its tensors.

    The resolved config is written with it, so the directory describes the run whose checkpoint it holds, and a
    run that fails before its first save (or a refused resume) leaves the previous config in place.
    """
    checkpoint = {
        "name": name,
        "model": accelerator.unwrap_model(model).state_dict(),
        "criterion": criterion_state(criterion),  # learned parts of the loss (feature projections), if any
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "rng": utils.rng_state(),
        "fingerprint": cfg.fingerprint(RESUME_KEYS),
        "settings": {k: getattr(cfg, k) for k in RESUME_KEYS},
        **state,
    }
    utils.atomic_torch_save(utils.with_checksum(checkpoint), path)
    utils.atomic_json(cfg.to_file(), os.path.join(cfg.output_dir, f"{cfg.mode}_config.json"))


def load_checkpoint(path, cfg, name):
    checkpoint = utils.safe_torch_load(path)
    if not isinstance(checkpoint, dict) or "fingerprint" not in checkpoint:
        raise UserError(f"{path} is not a docdistill training checkpoint (latest_checkpoint.pth or "
                        f"teacher_checkpoint.pth)")
    utils.verify_checksum(checkpoint, path)
    if checkpoint.get("name", name) != name:
        raise UserError(f"{path} is a checkpoint of {checkpoint['name']} training, not of the {name}: resume "
                        f"with --mode {'train' if checkpoint['name'] == 'student' else 'teacher'}")
    if checkpoint["fingerprint"] != cfg.fingerprint(RESUME_KEYS):
        # A setting added after the checkpoint was written is not recorded there: it ran at the default.
        saved = {**defaults(), **BEFORE, **checkpoint["settings"]}
        if saved["task"] != "text-recognition" and saved["kd_terms"] == "kl":  # written when page and word
            saved["kd_terms"] = "kd"  # classification ignored --kd-terms (its default then: kl): their kd term
        saved["kd_terms"] = saved["kd_terms"] or KD_TERMS[saved["task"]][0]  # not recorded: the task's default
        differing = [f"{k}: {saved.get(k, 'not recorded')!r} in checkpoint, {getattr(cfg, k)!r} now"
                     for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
        if differing:
            raise UserError(f"cannot resume from {path} with different settings ({'; '.join(differing)}): "
                            f"use the same flags as the run that wrote it")
    return checkpoint
