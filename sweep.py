"""`--mode sweep`: a study of training settings on Optuna, one ordinary training run per trial.

    python main.py --mode sweep --sweep temperature=1,2,4,8 alpha=0,0.5,0.9 student_size=tiny,small

Every combination of the axes is one trial (optuna GridSampler), or `--sweep-sampler tpe --sweep-trials N` lets
TPE pick N of them. A trial is a `--mode train` run (training_modes.run_train, the same loop as any other run)
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
command that trains the best setting) and sweep_test.json.
"""
import csv
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

import checkpoints
import train
import utils
from config import PRESETS, Config, UserError, flag

log = logging.getLogger("docdistill")

# What an axis may not be: the study's own settings, where things go, and the seed (--seeds repeats the best).
NOT_AXES = ("mode", "preset", "config", "task", "dataset", "train_split", "eval_split", "output_dir", "cache_dir", "seed",
            "checkpoint", "overwrite", "model", "input", "debug", "sweep", "sweep_sampler", "sweep_trials",
            "sweep_storage", "seeds", "unlabeled")
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
AXES = [name for name in checkpoints.RESUME_KEYS if name not in NOT_AXES]  # the settings that shape a training run
TEST_SPLIT = "test"
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
    checkpoint = checkpoints.checkpoint_path(output_dir, "student")
    if os.path.exists(checkpoint):  # an interrupted run of this trial: continue it
        values["checkpoint"] = checkpoint
    return Config(**values).validate()


def study_name(cfg, axes):
    """The same settings (axes included, --sweep-trials and --seeds not) name the same study."""
    keys = sorted(set(checkpoints.RESUME_KEYS + ("eval_split", "amp", "on_bad_sample")) - set(axes))
    blob = json.dumps({"settings": {k: getattr(cfg, k) for k in keys}, "axes": axes,
                       "sampler": cfg.sweep_sampler}, sort_keys=True)
    return "docdistill-sweep-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_command(cfg, params, output_dir, seed=None):
    """The `python main.py --mode train ...` command that trains `params` as the sweep did."""
    run = trial_config(cfg, params, output_dir, seed)
    defaults = {**Config().to_dict(), **PRESETS[cfg.preset]}
    words = ["python", "main.py", "--preset", cfg.preset, "--mode", "train"]
    for name in FIELDS:
        value = getattr(run, name)
        if name in ("mode", "preset", "config", "checkpoint", "sweep", "sweep_sampler", "sweep_trials", "sweep_storage",
                    "seeds", "input", "overwrite", "debug") or \
                (value == defaults.get(name) and name not in params and name != "output_dir"):  # axes: always
            continue
        if isinstance(value, bool):
            words.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif isinstance(value, list):  # extra_teachers: one flag, its values after it
            words += [flag(name), *value]
        else:
            words += [flag(name), str(value)]
    return " ".join(shlex.quote(w) for w in words)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(study):
    """Queue again, to run in the same directory (and so resume from its checkpoint), every trial that was
    interrupted: left RUNNING by a process of this host that is gone (SIGKILL, power cut), or stopped by
    SIGTERM / Ctrl-C (marked interrupted by its objective)."""
    import optuna
    host, storage = socket.gethostname(), study._storage
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or _alive(pid):
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


def run_training(cfg, run_cfg):
    """One ordinary --mode train run (main.py's path: refuse to overwrite, seed, build the task, train)."""
    from tasks import build_task
    from training_modes import run_train
    checkpoints.refuse_to_overwrite(run_cfg, "student")
    utils.seed_everything(run_cfg.seed)
    task = build_task(run_cfg, train_teacher=run_cfg.alpha == 0)  # alpha 0: the teacher is not used
    try:
        return run_train(run_cfg, task)
    finally:
        del task
        gc.collect()


class TrialFailed(Exception):
    """A trial's run stopped on bad settings (e.g. a loss that became NaN at a high lr): a result of the study,
    recorded as a failed trial, not the end of the study."""


def run_trials(cfg, study, axes):
    import optuna
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
        for key, value in (("dir", directory), ("host", socket.gethostname()), ("pid", os.getpid())):
            trial.set_user_attr(key, value)
        out = os.path.join(cfg.output_dir, directory)
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

    while True:
        recover_interrupted(study)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == optuna.trial.TrialState.WAITING for t in trials)
        if cfg.sweep_sampler == "grid":
            if not waiting and study.sampler.is_exhausted(study):
                break
        elif not waiting and sum(not t.user_attrs.get("interrupted") for t in trials) >= target:
            break
        # One trial per call: the stopping rule above sees the trials other machines ran meanwhile.
        study.optimize(objective, n_trials=1, catch=(TrialFailed,))


def score_on_test(cfg, run_cfg):
    """The run's best student (student_model.pth) on the test split: the task's scores."""
    from evaluate import load_saved_student
    from tasks import build_task
    import models
    test_cfg = dataclasses.replace(run_cfg, mode="eval", eval_split=TEST_SPLIT, checkpoint="")
    utils.seed_everything(test_cfg.seed)
    task = build_task(test_cfg, train_teacher=True)  # the teacher is not run here
    if TEST_SPLIT not in task.splits:
        raise UserError(f"--dataset {cfg.dataset} has no {TEST_SPLIT!r} split to score the best setting on")
    student = models.freeze(load_saved_student(task, os.path.join(run_cfg.output_dir, "student_model.pth")))
    accelerator = train.make_accelerator(test_cfg)
    loader = train.make_loader(task, TEST_SPLIT, test_cfg, shuffle=False)
    decode = getattr(task, "predictions", None)
    logits, labels = train.predict(accelerator, loader, task.student_logits, student.to(accelerator.device),
                                   desc="test", decode=decode)
    scores = task.metrics((logits if decode else logits.argmax(-1)).numpy(), labels.numpy())
    metric = task.metric_name
    del task, student
    gc.collect()
    return metric, {k: v for k, v in scores.items() if isinstance(v, float)}


def final_runs(cfg, study, axes):
    """Best setting and its alpha-0 baseline, each over --seeds seeds, trained where needed, scored on test."""
    import optuna
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if not done:
        raise UserError("no trial of the study finished: nothing to score (see the errors above)")
    best = max(done, key=lambda t: t.value)
    baseline = {**best.params, "alpha": 0.0}

    def local_run(params):
        for t in sorted(done, key=lambda t: -t.value):
            if same_run(cfg, t.params) == same_run(cfg, params) and \
                    os.path.exists(os.path.join(cfg.output_dir, t.user_attrs["dir"], "student_model.pth")):
                return os.path.join(cfg.output_dir, t.user_attrs["dir"])
        return None

    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    results = {"seeds": seeds, "roles": {}}
    roles = [("best", best.params), ("baseline", baseline)]
    scored, runs = {}, {}  # the best setting may be the baseline (alpha 0): trained and scored once
    for role, params in roles:
        rows = []
        for seed in seeds:
            out = runs.get((same_run(cfg, params), seed)) or (local_run(params) if seed == cfg.seed else None)
            if out is None:
                out = os.path.join(cfg.output_dir, "final", f"{role}-seed{seed}")
                run_cfg = trial_config(cfg, params, out, seed)
                if not os.path.exists(os.path.join(out, "student_model.pth")) or run_cfg.checkpoint and \
                        utils.safe_torch_load(run_cfg.checkpoint)["epoch"] < run_cfg.epochs:
                    log.info("sweep: training the %s setting %s with seed %d in %s", role, params, seed, out)
                    run_training(cfg, run_cfg)
            runs[(same_run(cfg, params), seed)] = out
            if out not in scored:
                scored[out] = score_on_test(cfg, trial_config(cfg, params, out, seed))
            metric, scores = scored[out]
            rows.append({"seed": seed, "dir": out, **scores})
            log.info("sweep: %s setting, seed %d, test %s %.4f", role, seed, metric, scores[metric])
        values = [r[metric] for r in rows]
        results["roles"][role] = {"params": params, "runs": rows, "metric": metric, "mean": float(np.mean(values)),
                                  "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return best, results


def trial_rows(study, axes):
    import optuna
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.WAITING:
            continue
        state = "interrupted" if t.user_attrs.get("interrupted") else t.state.name.lower()
        if "same_as" in t.user_attrs:
            state = f"same run as trial {t.user_attrs['same_as']}"
        rows.append({"trial": t.number, "dir": t.user_attrs.get("dir", ""), "state": state,
                     **{k: t.params.get(k, "") for k in axes},
                     "validation": t.value if t.state == optuna.trial.TrialState.COMPLETE else "",
                     "seconds": round(t.user_attrs.get("seconds", 0.0), 1) if "seconds" in t.user_attrs else ""})
    return rows


def heatmap(rows, metric, path):
    """Validation score over temperature x alpha (the best over the other axes), as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if r["validation"] != ""]  # finished trials, those that reused a run included
    temps = sorted({r["temperature"] for r in done})
    alphas = sorted({r["alpha"] for r in done})
    grid = np.full((len(temps), len(alphas)), np.nan)
    for r in done:
        i, j = temps.index(r["temperature"]), alphas.index(r["alpha"])
        grid[i, j] = r["validation"] if np.isnan(grid[i, j]) else max(grid[i, j], r["validation"])
    fig, ax = plt.subplots(figsize=(1.2 * len(alphas) + 2.5, 0.8 * len(temps) + 2))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(temps)), [f"{t:g}" for t in temps])
    ax.set_xlabel("alpha")
    ax.set_ylabel("temperature")
    for i in range(len(temps)):
        for j in range(len(alphas)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, label=f"validation {metric}")
    ax.set_title(f"validation {metric} (best over the other axes)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(cfg, study, axes, best, results):
    out = cfg.output_dir
    rows = trial_rows(study, axes)
    metric = results["roles"]["best"]["metric"]
    columns = ["trial", "dir", "state", *axes, "validation", "seconds"]
    tmp = os.path.join(out, "sweep.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, os.path.join(out, "sweep.csv"))
    command = train_command(cfg, best.params, os.path.join(out, "best"))
    best_row = {"trial": best.number, "dir": best.user_attrs["dir"], "params": best.params,
                f"validation_{metric}": best.value, "command": command, "test": results}
    utils.atomic_json(best_row, os.path.join(out, "best_config.json"))
    utils.atomic_json(results, os.path.join(out, "sweep_test.json"))
    lines = [f"Study {study.study_name}: {len(rows)} trials ({cfg.sweep_sampler}), validation {metric} on "
             f"--eval-split {cfg.eval_split}; the best is marked.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.4f}" if c == "validation" and r[c] != "" else str(r[c]) for c in columns]
        if r["trial"] == best.number:
            cells[0] = f"**{cells[0]}** (best)"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Test split ({TEST_SPLIT}), seeds {', '.join(map(str, results['seeds']))}: mean and std of "
              f"{metric} over the seeds.", "", f"| setting | test {metric} mean | std | per seed |", "|---|---|---|---|"]
    for role, title in (("best", "best"), ("baseline", "baseline (alpha 0)")):
        r = results["roles"][role]
        settings = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {title}: {settings} | {r['mean']:.4f} | {r['std']:.4f} | "
                     f"{', '.join(f'{x[metric]:.4f}' for x in r['runs'])} |")
    lines += ["", "Train the best setting:", "", "    " + command, ""]
    if "temperature" in axes and "alpha" in axes:
        heatmap(rows, metric, os.path.join(out, "sweep_heatmap.png"))
        lines.append("Validation over temperature x alpha: sweep_heatmap.png")
    text = "\n".join(lines)
    utils.atomic_text(text + "\n", os.path.join(out, "sweep.md"))
    print("\n" + text)


def run(cfg):
    import optuna
    if cfg.seeds < 1:
        raise UserError("--seeds must be >= 1")
    from accelerate import PartialState
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
    utils.atomic_json({"study": name, "storage": storage, "axes": axes}, marker)
    sampler = optuna.samplers.GridSampler(axes, seed=cfg.seed) if cfg.sweep_sampler == "grid" else \
        optuna.samplers.TPESampler(seed=cfg.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, sampler=sampler, study_name=name, direction="maximize",
                                load_if_exists=True)
    log.info("sweep: study %s in %s, axes %s", name, storage, axes)
    run_trials(cfg, study, axes)
    best, results = final_runs(cfg, study, axes)
    write_outputs(cfg, study, axes, best, results)
    return 0
