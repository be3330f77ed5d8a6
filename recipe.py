"""The training recipe around the loop in train.py: learning-rate schedule, early stopping, experiment tracking."""
import json
import math
import os

from transformers import get_scheduler

# --scheduler -> transformers' schedule name; every one starts with a linear warm-up of --warmup-ratio
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def make_scheduler(cfg, optimizer, total_steps):
    """--scheduler with a linear warm-up over the first --warmup-ratio of `total_steps` optimizer steps."""
    return get_scheduler(SCHEDULES[cfg.scheduler], optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def early_stopping(state, value, patience, min_delta):
    """Count the epoch whose validation metric is `value`; return why training stops now, or "".

    An epoch counts as an improvement when it beats the reference (the best value that was itself an improvement)
    by more than min_delta; after `patience` epochs in a row without one, training stops. patience 0 = never.
    `state` ({"reference", "waited"}) is updated in place and saved in the checkpoint, so a resume goes on counting.
    """
    if value > state["reference"] + min_delta:
        state.update(reference=value, waited=0)
        return ""
    state["waited"] += 1
    if patience and state["waited"] >= patience:
        return (f"early stopping: no validation improvement over {state['reference']:.4f} by more than {min_delta} "
                f"in {patience} epoch{'s' if patience > 1 else ''}")
    return ""


def early_stopping_start():
    return {"reference": -math.inf, "waited": 0}


def tracking_dir(cfg):
    """Where --report-to's files go (Accelerate's project_dir; each tracker writes under it in a folder per run)."""
    return os.path.join(cfg.output_dir, "tracking")


def start_tracking(accelerator, cfg, name):
    """--report-to: start the tracker's run `name` with the resolved config (lists as JSON: trackers take scalars).

    Afterwards accelerator.log() writes to it; without a tracker it does nothing.
    """
    if cfg.report_to != "none":
        accelerator.init_trackers(name, config={k: json.dumps(v) if isinstance(v, list) else v
                                                for k, v in cfg.to_dict().items()})
