"""`--mode sweep`: a study of training settings on Optuna, one ordinary training run per trial.
This file is over 400 lines because a study's trials, their recovery after a kill and the final runs are one flow.

    python main.py --mode sweep --sweep temperature=1,2,4,8 alpha=0,0.5,0.9 student_size=tiny,small

Every combination of the axes is one trial (optuna GridSampler), or `--sweep-sampler tpe --sweep-trials N` lets
TPE pick N of them. A trial is a `--mode train` run (modes/training.py run_train, the same loop as any other run)
in OUTPUT_DIR/trial-NNN, scored by its best validation epoch (--eval-split); no trial reads the test split.
Trials share the teacher-logit cache (teacher_cache.py: its key is the teacher's weights, the preprocessed
split and the label order, none of which alpha, T, the student's size or the schedule change), so the teacher
runs once for the whole study, unless an axis changes the preprocessing (max_length, student_image_size,
tokenizer) or the teacher itself.

The study lives in an Optuna storage (default sqlite:///OUTPUT_DIR/sweep.db; --sweep-storage URL for a database
that several machines share), named by a hash of the settings, so the same command continues it: finished
trials are kept, and a trial whose process died (same host, process gone) is marked failed and re-run in its
own directory, resuming from its latest_checkpoint.pth.

At the end, once: the best setting and its alpha-0 baseline (the same setting with alpha 0) are scored on the
test split, each with --seeds seeds (the trial's own run is reused for the first seed where it is on this
machine; other seeds train in OUTPUT_DIR/final/), and the outputs are written:
sweep.csv, sweep.md (one row per trial: settings, validation score, seconds; the test results),
sweep_heatmap.png (validation score over temperature x alpha, when both are axes), best_config.json (with the
command that trains the best setting) and sweep_test.json (sweep_report.py writes them).

With student_size an axis, a size study too: each size's best distilled setting and the same setting at alpha 0,
each with --seeds seeds, scored on validation; the gain (distilled minus alpha 0, paired by seed) per size goes to
sweep.md and sweep_sizes.png. --baseline-epochs gives alpha-0 runs their own number of epochs (without the
teacher, unlabelled documents are left out, so an epoch has fewer steps).
"""
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import shlex
import socket
import time

import numpy as np
import optuna
import sqlalchemy
from accelerate import PartialState

import checkpoints
import models
import registry
import scoring
import utils
from config import STUDENT_SIZES, Config, UserError, flag, preset_settings
from modes import sweep_report
from modes.training import run_train

log = logging.getLogger("docdistill")

# What an axis may not be: the study's own settings, where things go, and the seed (--seeds repeats the best).
NOT_AXES = ("mode", "preset", "config", "task", "dataset", "train_split", "eval_split", "output_dir", "cache_dir", "seed",
            "checkpoint", "overwrite", "model", "input", "debug", "sweep", "sweep_sampler", "sweep_trials",
            "sweep_storage", "seeds", "unlabeled")
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# The settings that shape a training run and take one value per grid point: not a list (extra_teachers) nor a text
# that is itself comma-separated (teacher_weights): --sweep splits values at commas.
AXES = [name for name in checkpoints.RESUME_KEYS
        if name not in NOT_AXES + ("extra_teachers", "teacher_weights")]
TEST_SPLIT = "test"
LATER_SETTINGS = ("baseline_epochs", "extra_teachers", "teacher_weights")
POLL_SECONDS = 10  # how often a process that has no trial left looks at the trials other processes run
# train.fit's errors that are a result of a trial's settings (a loss or weights that became NaN at a high lr):
# the trial is recorded as failed and the study goes on. Any other error stops the sweep.
RESULT_ERRORS = ("loss became", "the weights at")


def parse_axes(specs):
    """["temperature=1,2", "alpha=0,0.5"] -> {"temperature": [1.0, 2.0], "alpha": [0.0, 0.5]} (typed per flag)."""
    axes = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or not values.strip():
            raise UserError(f"--sweep {spec!r}: write each axis as NAME=V1,V2,..., e.g. temperature=1,2,4")
        if name not in AXES:
            allowed = ", ".join(AXES)
            raise UserError(f"--sweep {spec!r}: {name!r} cannot be an axis (axes: {allowed})")
        if name in axes:
            raise UserError(f"--sweep: {name} is given twice")
        kind = FIELDS[name].type
        parsed = []
        for text in values.split(","):
            text = text.strip()
            try:
                if kind in (bool, "bool"):
                    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(text)
                    value = text.lower() in ("true", "1", "yes")
                else:
                    value = {"int": int, "float": float, "str": str}.get(kind, kind)(text)
            except ValueError:
                raise UserError(f"--sweep {spec!r}: {text!r} is not a valid {flag(name)} value") from None
            if value not in parsed:
                parsed.append(value)
        axes[name] = parsed
    return axes


def same_run(cfg, params):
    """What a trial's run depends on, as a key: its settings, less T at alpha 0 (where T does nothing)."""
    alpha = params.get("alpha", cfg.alpha)
    return json.dumps({k: v for k, v in params.items() if not (k == "temperature" and alpha == 0)}, sort_keys=True)


def trial_config(cfg, params, output_dir, seed=None):
    """The --mode train config of one run: the sweep's settings with the trial's values (validated)."""
    values = {**cfg.to_dict(), **params, "mode": "train", "output_dir": output_dir, "overwrite": False,
              "checkpoint": "", "sweep": [], "seed": cfg.seed if seed is None else seed}
    run = Config(**values)
    if not run.uses_teacher:  # without the teacher: no unlabelled documents (nothing teaches them), own epochs
        run.unlabeled, run.epochs = "", cfg.baseline_epochs or run.epochs
    checkpoint = checkpoints.checkpoint_path(output_dir, "student")
    if os.path.exists(checkpoint):  # an interrupted run of this trial: continue it
        run.checkpoint = checkpoint
    return run.validate()


def study_name(cfg, axes):
    """The same settings (axes included, --sweep-trials and --seeds not) name the same study."""
    keys = sorted(set(checkpoints.RESUME_KEYS + ("eval_split", "amp", "on_bad_sample", "baseline_epochs")) - set(axes))
    # Settings added after studies were made count only when given, so that those studies keep their names
    # (page and word tasks' "kd" was named "kl" then).
    settings = {k: getattr(cfg, k) for k in keys if k not in LATER_SETTINGS or getattr(cfg, k)}
    if settings.get("kd_terms") == "kd":
        settings["kd_terms"] = "kl"
    blob = json.dumps({"settings": settings, "axes": axes,
                       "sampler": cfg.sweep_sampler}, sort_keys=True)
    return "docdistill-sweep-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_command(cfg, params, output_dir, seed=None):
    """The `python main.py --mode train ...` command that trains `params` as the sweep did."""
    run = trial_config(cfg, params, output_dir, seed)
    defaults = {**Config().to_dict(), **preset_settings(cfg.preset)}
    words = ["python", "main.py", "--preset", cfg.preset, "--mode", "train"]
    for name in FIELDS:
        value = getattr(run, name)
        if name in ("mode", "preset", "config", "checkpoint", "sweep", "sweep_sampler", "sweep_trials", "sweep_storage",
                    "seeds", "baseline_epochs", "input", "overwrite", "debug") or \
                (value == defaults.get(name) and name not in params and name != "output_dir"):  # axes: always
            continue
        if isinstance(value, bool):
            words.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif isinstance(value, list):  # extra_teachers: one flag, its values after it
            words += [flag(name), *value]
        else:
            words += [flag(name), str(value)]
    return " ".join(shlex.quote(w) for w in words)


def recover_interrupted(study):
    """Queue again, to run in the same directory (and so resume from its checkpoint), every trial that was
    interrupted: left RUNNING by a process of this host that is gone (SIGKILL, power cut), or stopped by
    SIGTERM / Ctrl-C (marked interrupted by its objective)."""
    host, storage = socket.gethostname(), study._storage
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or utils.process_alive(pid):
            continue  # another machine's, or still running
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        # Through the storage, not study.tell: the sampler must not see a finished trial (GridSampler stops).
        storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        taken_over = any(u.number > t.number and u.user_attrs.get("dir") == t.user_attrs.get("dir") for u in trials)
        if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("interrupted") and not taken_over:
            log.warning("trial %d (%s) was interrupted: it runs again in %s, from its checkpoint if it saved one",
                        t.number, t.params, t.user_attrs.get("dir"))
            study.enqueue_trial(t.params, user_attrs={"dir": t.user_attrs["dir"]})
            if "grid_id" in t.system_attrs:  # the same grid point: optuna's GridSampler reads it as the trial ends
                queued = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))[-1]
                for key in ("grid_id", "search_space"):
                    storage.set_trial_system_attr(queued._trial_id, key, t.system_attrs[key])


def run_training(cfg, run_cfg):
    """One ordinary --mode train run (main.py's path: refuse to overwrite, seed, build the task, train)."""
    checkpoints.refuse_to_overwrite(run_cfg, "student")
    utils.seed_everything(run_cfg.seed)
    task = registry.build_task(run_cfg)
    try:
        return run_train(run_cfg, task)
    finally:
        del task
        gc.collect()


class TrialFailed(Exception):
    """A trial's run stopped on bad settings (e.g. a loss that became NaN at a high lr): a result of the study,
    recorded as a failed trial, not the end of the study."""


def run_trials(cfg, study, axes):
    target = math.prod(len(v) for v in axes.values()) if cfg.sweep_sampler == "grid" else \
        (cfg.sweep_trials or math.prod(len(v) for v in axes.values()))

    def objective(trial):
        params = {name: trial.suggest_categorical(name, values) for name, values in axes.items()}
        # A run already made (TPE proposing a setting again; at alpha 0 every T is the same run): its score is
        # known, nothing is trained.
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if same_run(cfg, t.params) == same_run(cfg, params):
                log.info("sweep trial %d: %s is the run of trial %d, scored %.4f: not trained again",
                         trial.number, params, t.number, t.value)
                trial.set_user_attr("dir", t.user_attrs.get("dir", ""))
                trial.set_user_attr("seconds", 0.0)
                trial.set_user_attr("same_as", t.number)
                return t.value
        directory = trial.user_attrs.get("dir") or f"trial-{trial.number:03d}"
        out = os.path.join(cfg.output_dir, directory)
        for key, value in (("dir", directory), ("path", os.path.abspath(out)), ("host", socket.gethostname()),
                           ("pid", os.getpid())):
            trial.set_user_attr(key, value)
        run_cfg = trial_config(cfg, params, out)
        trial.set_user_attr("resumed", bool(run_cfg.checkpoint))
        log.info("sweep trial %d: %s -> %s%s", trial.number, params, out,
                 " (resuming its checkpoint)" if run_cfg.checkpoint else "")
        start = time.perf_counter()
        try:
            best = run_training(cfg, run_cfg)
        except UserError as e:
            trial.set_user_attr("error", str(e))
            if not str(e).startswith(RESULT_ERRORS):  # bad data, teacher, paths...: stop; the next run redoes it
                trial.set_user_attr("interrupted", True)
                raise
            log.warning("sweep trial %d failed: %s", trial.number, e)
            raise TrialFailed(str(e)) from e
        except KeyboardInterrupt:  # the next run of the sweep continues this trial
            trial.set_user_attr("interrupted", True)
            raise
        except checkpoints.Stopped as e:
            trial.set_user_attr("interrupted", True)
            raise checkpoints.Stopped(f"stopped by SIGTERM in sweep trial {trial.number}: its checkpoint is saved in "
                                f"{out}; run the same --mode sweep command again, it continues the trial from "
                                f"there") from e
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - start)
        return best

    told = None
    while True:
        recover_interrupted(study)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
        if cfg.sweep_sampler == "grid":  # grid points (an interrupted one is queued again, and runs as WAITING)
            started = {t.system_attrs.get("grid_id") for t in trials if t.state != optuna.trial.TrialState.WAITING}
            started.discard(None)
        else:
            started = [t for t in trials if not t.user_attrs.get("interrupted")]
        if not waiting and len(started) >= target:
            # Every trial has started. Those other processes still run are waited for, so that the best setting
            # is chosen among all of them (optuna's grid would hand this process a running point again).
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            if not running:
                break
            names = [f"{t.number} ({t.user_attrs.get('host')}:{t.user_attrs.get('pid')})" for t in running]
            if names != told:
                log.info("sweep: every trial has started; waiting for trials %s of other processes to finish (if one "
                         "of them died, run the same command on its machine)", ", ".join(names))
                told = names
            time.sleep(POLL_SECONDS)
            continue
        # One trial per call: the stopping rule above sees the trials other processes ran meanwhile.
        study.optimize(objective, n_trials=1, catch=(TrialFailed,))


def score_on_test(cfg, run_cfg):
    """The run's best student (student_model.pth) on the test split: the task's scores."""
    test_cfg = dataclasses.replace(run_cfg, mode="eval", eval_split=TEST_SPLIT, checkpoint="")
    utils.seed_everything(test_cfg.seed)
    task = registry.build_task(test_cfg, train_teacher=True)  # the teacher is not run here
    if TEST_SPLIT not in task.splits:
        raise UserError(f"--dataset {cfg.dataset} has no {TEST_SPLIT!r} split to score the best setting on")
    student = models.freeze(registry.load_student(os.path.join(run_cfg.output_dir, "student_model.pth"), task))
    scores = scoring.score(task, student, TEST_SPLIT, test_cfg, desc="test").metrics
    metric = task.metric_name
    del task, student
    gc.collect()
    return metric, {k: v for k, v in scores.items() if isinstance(v, float)}


class Runs:
    """The runs behind the final scores: a trial's own run for the first seed (where it is on this machine), other
    seeds trained in OUTPUT_DIR/final/<name>-seed<seed> (a killed one resumes; a finished one is not trained
    again). A setting asked for twice (the best is also the best of its size) is trained once."""

    def __init__(self, cfg, done, names):
        self.cfg, self.done, self.names, self.dirs = cfg, done, names, {}

    def local(self, params):
        """The run of `params` by a trial on this machine: in this OUTPUT_DIR, or another process's on this host."""
        for t in sorted(self.done, key=lambda t: -t.value):
            if same_run(self.cfg, t.params) != same_run(self.cfg, params):
                continue
            here = [os.path.join(self.cfg.output_dir, t.user_attrs["dir"])]
            if t.user_attrs.get("host") == socket.gethostname() and t.user_attrs.get("path"):
                here.append(t.user_attrs["path"])
            for out in here:
                if os.path.exists(os.path.join(out, "student_model.pth")):
                    return out
        return None

    def get(self, params, seed, name):
        """The directory of `params` trained with `seed`; `name` unless the setting has one in self.names."""
        cfg, key = self.cfg, (same_run(self.cfg, params), seed)
        if key in self.dirs:
            return self.dirs[key]
        out = self.local(params) if seed == cfg.seed else None
        if out is None:
            name = self.names.get(key[0], name)
            out = os.path.join(cfg.output_dir, "final", f"{name}-seed{seed}")
            run_cfg = trial_config(cfg, params, out, seed)
            if not os.path.exists(os.path.join(out, "student_model.pth")) or run_cfg.checkpoint and \
                    utils.safe_torch_load(run_cfg.checkpoint)["epoch"] < run_cfg.epochs:
                log.info("sweep: training the %s setting %s with seed %d in %s", name, params, seed, out)
                run_training(cfg, run_cfg)
        self.dirs[key] = out
        return out


def best_validation(out):
    """(metric name, best validation score) of a finished run, from its student_metrics.jsonl."""
    with open(os.path.join(out, "student_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    metric = rows[-1]["metric_name"]
    return metric, max(r[f"val_{metric}"] for r in rows)


def spread(values):
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def final_runs(cfg, study, axes):
    """Best setting and its alpha-0 baseline, each over --seeds seeds, trained where needed, scored on test; with
    student_size an axis, each size's best distilled setting and its alpha-0 baseline over the seeds, scored on
    validation (sizes)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if not done:
        raise UserError("no trial of the study finished: nothing to score (see the errors above)")
    best = max(done, key=lambda t: t.value)
    baseline = {**best.params, "alpha": 0.0}
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    results = {"seeds": seeds, "roles": {}}
    roles = [("best", best.params), ("baseline", baseline)]
    runs = Runs(cfg, done, {same_run(cfg, params): role for role, params in reversed(roles)})
    scored = {}  # the best setting may be the baseline (alpha 0): trained and scored once
    for role, params in roles:
        rows = []
        for seed in seeds:
            out = runs.get(params, seed, role)
            if out not in scored:
                scored[out] = score_on_test(cfg, trial_config(cfg, params, out, seed))
            metric, scores = scored[out]
            rows.append({"seed": seed, "dir": out, **scores})
            log.info("sweep: %s setting, seed %d, test %s %.4f", role, seed, metric, scores[metric])
        mean, std = spread([r[metric] for r in rows])
        results["roles"][role] = {"params": params, "runs": rows, "metric": metric, "mean": mean, "std": std}
    if len(axes.get("student_size", ())) > 1:
        results["sizes"] = size_study(cfg, axes, done, runs, seeds)
    return best, results


def size_study(cfg, axes, done, runs, seeds):
    """For each student size: its best distilled trial (alpha > 0, by validation) and the same setting at alpha 0,
    each trained with every seed; the gain is distilled minus alpha 0 on validation, paired by seed. The test
    split is not read (it is kept for the best setting)."""
    sizes = {}
    for size in sorted(axes["student_size"], key=STUDENT_SIZES.index):
        distilled = [t for t in done if t.params.get("student_size") == size and t.params.get("alpha", cfg.alpha) > 0]
        if not distilled:
            log.warning("sweep: no distilled trial of student size %s finished: left out of the size study", size)
            continue
        setting = max(distilled, key=lambda t: t.value).params
        scores = {}
        for role, params in (("distilled", setting), ("baseline", {**setting, "alpha": 0.0})):
            scores[role] = []
            for seed in seeds:
                metric, value = best_validation(runs.get(params, seed, f"size-{size}-{role}"))
                scores[role].append(value)
        gains = [d - b for d, b in zip(scores["distilled"], scores["baseline"])]
        sizes[size] = {"params": setting, "metric": metric, **scores, "gain": gains,
                       **{f"{k}_mean_std": spread(v) for k, v in (*scores.items(), ("gain", gains))}}
        log.info("sweep: student size %s, %s: validation %s %.4f distilled, %.4f alpha 0, gain %+.4f (mean of %d "
                 "seeds)", size, setting, metric, *(np.mean(v) for v in (scores["distilled"], scores["baseline"],
                                                                          gains)), len(seeds))
    return sizes


def open_study(storage, sampler, name):
    """The study in its Optuna storage, created or continued; a storage that cannot be opened (a file that is not a
    database, a folder that does not exist, an unknown URL scheme or a missing driver) is refused in one line."""
    try:
        return optuna.create_study(storage=storage, sampler=sampler, study_name=name, direction="maximize",
                                   load_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        reason = str(getattr(e, "orig", None) or e).splitlines()[0]
        raise UserError(f"--sweep-storage {storage}: cannot open the study's database ({reason}): give "
                        f"sqlite:///PATH in a folder that exists (a file that is a database, or none yet), or a "
                        f"database URL whose driver is installed") from e


def run(cfg):
    if PartialState().num_processes > 1:
        raise UserError("--mode sweep runs one process; run several machines on one --sweep-storage instead of "
                        "accelerate launch")
    axes = parse_axes(cfg.sweep)
    for name, values in axes.items():  # every value must make a valid run before the first trial starts
        for value in values:
            trial_config(cfg, {name: value}, os.path.join(cfg.output_dir, "trial-check"))
    if cfg.sweep_sampler == "tpe" and not cfg.sweep_trials:
        log.info("--sweep-sampler tpe without --sweep-trials: %d trials (the grid's size)",
                 math.prod(len(v) for v in axes.values()))
    os.makedirs(cfg.output_dir, exist_ok=True)
    storage = cfg.sweep_storage or "sqlite:///" + os.path.abspath(os.path.join(cfg.output_dir, "sweep.db"))
    name = study_name(cfg, axes)
    marker = os.path.join(cfg.output_dir, "sweep_study.json")
    if os.path.exists(marker):
        with open(marker) as f:
            previous = json.load(f)
        if previous["study"] != name:
            raise UserError(f"{cfg.output_dir} holds another sweep ({previous['study']}, axes "
                            f"{previous['axes']}): continue it with the same settings, or choose another --output-dir")
    sampler = optuna.samplers.GridSampler(axes, seed=cfg.seed) if cfg.sweep_sampler == "grid" else \
        optuna.samplers.TPESampler(seed=cfg.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(storage, sampler, name)
    utils.atomic_json({"study": name, "storage": storage, "axes": axes}, marker)
    log.info("sweep: study %s in %s, axes %s", name, storage, axes)
    run_trials(cfg, study, axes)
    best, results = final_runs(cfg, study, axes)
    sweep_report.write_outputs(cfg, study, axes, best, results,
                               train_command(cfg, best.params, os.path.join(cfg.output_dir, "best")), TEST_SPLIT)
    return 0
