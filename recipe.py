"""The training recipe around the loop in train.py: the Accelerator, data order, learning-rate schedule, early
stopping, experiment tracking, LoRA (for the teacher, and for a student that starts from pretrained weights)."""
import contextlib
import copy
import json
import logging
import math
import os
import time

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch.utils.data import Sampler
from transformers import get_scheduler

import models
from config import UserError

log = logging.getLogger("docdistill")


def make_accelerator(cfg, track=False):
    """The run's Accelerator (--amp, --grad-accum); with track, the --report-to tracker too (training only)."""
    if cfg.amp == "fp16" and not torch.cuda.is_available():
        raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 on CPU or --amp no")
    # LayoutLMv3 reads its relative position biases under torch.no_grad (as the original implementation does):
    # they never get a gradient, and DDP must not wait for one.
    unused = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[unused], mixed_precision=cfg.amp,
                       gradient_accumulation_steps=cfg.grad_accum,
                       log_with=cfg.report_to if track and cfg.report_to != "none" else None,
                       project_dir=tracking_dir(cfg))


class EpochShuffle(Sampler):
    """A fresh order each epoch, a pure function of (seed, epoch): resumable and the same on every process.

    With lengths given, documents of similar length share a batch (sorted within megabatches of 50 batches,
    then the batch order is shuffled), so dynamic padding pads little.
    """

    def __init__(self, n, seed, batch_size, lengths=None):
        self.n, self.seed, self.batch_size, self.lengths, self.epoch = n, seed, batch_size, lengths, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        if self.lengths is None:
            return iter(order)
        mega = self.batch_size * 50
        batches = []
        for start in range(0, self.n, mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        return iter([i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]])

    def __len__(self):
        return self.n


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


def mlflow_uri(cfg):
    """--report-to mlflow's store: one SQLite file in the tracking folder (MLflow 3's local backend; its plain-file
    store refuses to start unless MLFLOW_ALLOW_FILE_STORE is set). Experiments `student` and `teacher`, a run per
    start (a resume starts its own)."""
    return "sqlite:///" + os.path.abspath(os.path.join(tracking_dir(cfg), "mlflow.db"))


def start_tracking(accelerator, cfg, name):
    """--report-to: start the tracker's run `name` with the resolved config (lists as JSON: trackers take scalars).

    Afterwards accelerator.log() writes to it; without a tracker it does nothing.
    """
    if cfg.report_to == "none":
        return
    # An event file is named by the second it was opened: a resume within that second would truncate the
    # first run's file, so each start gets a suffix of its own.
    kwargs = {"tensorboard": {"filename_suffix": f".{time.time_ns()}.{os.getpid()}"}}
    if cfg.report_to == "mlflow":
        kwargs["mlflow"] = start_mlflow(accelerator, cfg, name)
    if cfg.report_to == "wandb":  # local files unless the user asked for more (WANDB_MODE=online)
        os.environ.setdefault("WANDB_MODE", "offline")
        kwargs["wandb"] = {"dir": tracking_dir(cfg)}
    accelerator.init_trackers(name, config={k: json.dumps(v) if isinstance(v, list) else v
                                            for k, v in cfg.to_dict().items()}, init_kwargs=kwargs)


def start_mlflow(accelerator, cfg, name):
    """MLflow pointed at the run's local store, its usage telemetry (the one thing it would send out) off; the
    MLflowTracker's arguments: where artifacts go (Accelerate gives it no folder), the run's name."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # read when mlflow is imported, and when it sends anything
    if accelerator.is_main_process:
        import mlflow  # heavy: only with --report-to mlflow
        from mlflow.telemetry import set_telemetry_client
        set_telemetry_client()  # no client, in case mlflow was imported before the variable was set
        os.makedirs(tracking_dir(cfg), exist_ok=True)
        mlflow.set_tracking_uri(mlflow_uri(cfg))
        if cfg.checkpoint:  # a resume: the run it continues, if its process was killed, still says RUNNING
            client = mlflow.MlflowClient()
            experiment = client.get_experiment_by_name(name)
            for run in client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") \
                    if experiment else []:  # no other run writes here (utils.output_lock): these were killed
                client.set_terminated(run.info.run_id, status="KILLED")
                log.info("MLflow run %s (%s) was left RUNNING by a process that was killed: marked KILLED",
                         run.info.run_id, run.info.run_name)
    return {"logging_dir": os.path.abspath(os.path.join(tracking_dir(cfg), "mlflow-artifacts")),
            "run_name": f"{name}, resumed from {cfg.checkpoint}" if cfg.checkpoint else name}


@contextlib.contextmanager
def tracking(accelerator, cfg, name):
    """start_tracking() for the block; a block that raises ends an MLflow run as FAILED (KILLED when stopped by
    SIGTERM or Ctrl-C), so that a later run in the same process (a sweep's next trial) can start its own."""
    start_tracking(accelerator, cfg, name)
    try:
        yield
    except BaseException as e:
        if cfg.report_to == "mlflow" and accelerator.is_main_process:
            import mlflow  # heavy: only with --report-to mlflow
            mlflow.end_run(status=getattr(e, "tracking_status", "KILLED" if isinstance(e, KeyboardInterrupt)
                                          else "FAILED"))
        raise


def track(accelerator, cfg, values, step):
    """accelerator.log(values, step); MLflow keeps numbers only as metrics, so its text values (an epoch's
    stop_reason) are set as tags of the run instead."""
    if cfg.report_to == "mlflow" and accelerator.is_main_process:
        import mlflow  # heavy: only with --report-to mlflow
        texts = {k: v for k, v in values.items() if isinstance(v, str)}
        if texts:
            mlflow.set_tags(texts)
        values = {k: v for k, v in values.items() if k not in texts}
    accelerator.log(values, step=step)


# --lora-target-modules when not given, by config.model_type: the attention's query and value projections
LORA_TARGETS = {"beit": "q_proj,v_proj", "vit": "q_proj,v_proj", "layoutlmv3": "query,value",
                "distilbert": "q_lin,v_lin"}
HEAD = "classifier"  # the classification head of all of them: trained in full (peft's modules_to_save)


def with_lora(cfg, model):
    """With --lora-r: `model` frozen, with LoRA adapters on --lora-target-modules and its head trained in full.

    The head is every module whose name ends in `classifier` (peft matches modules_to_save by suffix): DistilBERT's
    sequence classifier has a pre_classifier layer before it, as new as the classifier itself.
    """
    if not cfg.lora_r:
        return model
    from peft import LoraConfig, get_peft_model  # heavy (about a second): only with --lora-r
    targets = cfg.lora_target_modules or LORA_TARGETS.get(model.config.model_type)
    if not targets:
        raise UserError(f"no default --lora-target-modules for a {model.config.model_type} model: name its linear "
                        f"layers, e.g. --lora-target-modules query,value")
    heads = [name for name, _ in model.named_modules() if name.endswith(HEAD)]
    total = models.count_parameters(model)
    try:
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=targets.split(","),
                                                 modules_to_save=[HEAD] if heads else []))
    except ValueError as e:  # target modules not found in the model
        raise UserError(f"--lora-target-modules {targets}: {str(e).splitlines()[0]}") from e
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA rank %d on %s, %s trained in full: %.3fM parameters trainable, %.2f%% of the model's %.2fM",
             cfg.lora_r, targets, "+".join(heads) or "no head", trainable / 1e6, 100 * trainable / total, total / 1e6)
    return model


def merged(model):
    """A plain copy of a LoRA model, adapters merged into its weights (what is saved); any other model as it is."""
    return copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
