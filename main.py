"""docdistill entry point: `python main.py --mode MODE [flags]` (see --help). It parses and dispatches:

train    distil the frozen teacher into the student       -> OUTPUT_DIR/student_model.pth, student/, metrics
teacher  train or fine-tune the teacher on the dataset    -> OUTPUT_DIR/teacher_model.pth, teacher/
eval     score a saved student (and its teacher agreement) -> OUTPUT_DIR/eval.json, confusion_matrix.png
info     describe the data and both models
demo     the whole job on the built-in corpora: teacher, students alone and distilled (with unlabelled pages), table
bench    speed, size and memory of teacher and student    -> OUTPUT_DIR/bench.json, bench.md
predict  run a saved student on files, folders, globs     -> OUTPUT_DIR/predictions.jsonl (+ .csv)
export   the student as ONNX (float32 and int8), checked  -> OUTPUT_DIR/onnx/
sweep    a study over --sweep axes on Optuna, one train run per trial -> OUTPUT_DIR/sweep.csv, sweep.md, best_config.json

Each mode lives in modes/: train, teacher and info in modes/training.py, the others in modes/<mode>.py.
"""
import errno
import logging
import os
import signal
import sys

import torch
from accelerate import PartialState

import checkpoints
import registry
import saved
import utils
from config import UserError, parse_config
from modes import bench, demo, evaluate, export, predict, sweep, training

log = logging.getLogger("docdistill")
# Modes that work on a task built from the data (main builds it), and modes that build what they need themselves.
TASK_MODES = {"train": training.run_train, "teacher": training.run_teacher, "eval": evaluate.run_eval,
              "info": training.run_info}
OTHER_MODES = {"demo": demo.run, "bench": bench.run, "predict": predict.run, "export": export.run, "sweep": sweep.run}


def error_line(error, cfg):
    """The one line reported for bad input or a failed file operation: what is wrong and how to fix it."""
    if isinstance(error, UserError):
        return f"error: {error}"
    if error.errno == errno.ENOSPC or "No space left on device" in str(error):  # Arrow's errors carry no errno
        where = error.filename or (f"--output-dir {cfg.output_dir} or --cache-dir {cfg.cache_dir}" if cfg else
                                   "the output or cache directory")
        return f"error: no space left on device at {where}: free space or use another --output-dir/--cache-dir"
    return f"error: {utils.first_line(error)} (--debug shows where)"


# Modes that write into --output-dir: one run at a time there (utils.output_lock). A sweep's trials lock their own
# directories' runs by the sweep's own bookkeeping; several sweep processes may share one study and directory.
WRITING_MODES = ("train", "teacher", "eval", "bench", "predict", "export", "demo")


def run(cfg):
    """The mode of cfg; returns the exit code."""
    if cfg.mode in WRITING_MODES and PartialState().is_main_process:
        with utils.output_lock(cfg.output_dir):
            return run_mode(cfg)
    return run_mode(cfg)


def run_mode(cfg):
    if cfg.mode in OTHER_MODES:
        return OTHER_MODES[cfg.mode](cfg)
    if cfg.mode in ("train", "teacher"):  # before any slow work: never replace a run by accident
        checkpoints.refuse_to_overwrite(cfg, "student" if cfg.mode == "train" else "teacher")
    # eval works in the saved student's label space: the data may hold a subset of its classes
    model_labels = saved.label_names(evaluate.default_model(cfg)) if cfg.mode == "eval" else None
    with PartialState().main_process_first():  # the main process fills the caches; the others then read them
        task = registry.build_task(cfg, model_labels=model_labels)
    TASK_MODES[cfg.mode](cfg, task)
    return 0


def main(argv=None):
    cfg = None
    try:
        cfg = parse_config(argv)
        # One per process under `accelerate launch` or `torchrun`, a single one otherwise. Without a GPU the
        # processes only join (gloo) when told they run on CPU: Accelerate leaves them independent otherwise.
        process = PartialState(cpu=not torch.cuda.is_available())
        utils.setup_logging(process.is_main_process)
        if process.num_processes > 1:
            log.info("%d processes (%s), this one on %s", process.num_processes, process.distributed_type.value,
                     process.device)
        if not cfg.cache_dir:
            cfg.cache_dir = os.path.join(os.path.dirname(os.path.abspath(cfg.output_dir)), "cache")
        # --output-dir is not created here: every write (utils.atomic_*) creates it, so bad input leaves none behind
        utils.seed_everything(cfg.seed)
        return run(cfg)
    except (UserError, OSError) as e:  # OSError: disk full, no permission... (writes are atomic, nothing is torn)
        if cfg.debug if cfg is not None else "--debug" in (sys.argv[1:] if argv is None else argv):  # bad flags
            raise
        print(error_line(e, cfg), file=sys.stderr)
        return 2
    except checkpoints.Stopped as e:  # SIGTERM: a resumable checkpoint was saved
        print(e, file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    sys.exit(main())
