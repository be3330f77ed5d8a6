"""Reliability III, 6: every flag against every task and mode, table-driven. A flag given with a value is either
taken (it applies) or refused in one line naming it (config.FLAG_TASKS, config.FLAG_MODES); never a traceback."""
import dataclasses

import pytest

import config
from config import MODES, TASKS, Config, UserError, parse_config

# A valid value other than the default, for every flag.
SAMPLES = {
    "mode": None, "task": None, "preset": "demo", "config": None, "teacher": "demo-dit", "extra_teachers": None,
    "teacher_weights": None, "student_config": "builtin:layoutlmv3-base", "student_size": "small",
    "student_image_size": 64, "tokenizer": "demo", "dataset": "demo", "unlabeled": "demo-unlabeled",
    "labeled_fraction": 0.5, "unlabeled_weight": 0.5, "train_split": "train2", "eval_split": "test",
    "max_samples": 4, "output_dir": "runs/x", "cache_dir": "runs/cache", "epochs": 2, "batch_size": 4,
    "grad_accum": 2, "lr": 1e-3, "weight_decay": 0.1, "scheduler": "cosine", "warmup_ratio": 0.2,
    "early_stopping_patience": 2, "early_stopping_min_delta": 0.01, "alpha": 0.5, "temperature": 2.0,
    "max_length": 128, "kd_terms": None, "feature_weight": 0.5, "blank_weight": 0.2, "label_conventions": False,
    "mute_teacher_disagreements": True, "augment": True, "max_new_tokens": 8, "student_height": 48, "max_text_width": 320, "degrade_height": 16,
    "degrade_blur": 0.5, "degrade_noise": 2.0, "degrade_jpeg": 50, "lora_r": None, "lora_alpha": 8.0, "lora_dropout": 0.1, "lora_target_modules": "query",
    "report_to": "tensorboard", "seed": 1, "amp": "bf16", "checkpoint": None, "overwrite": True, "model": None,
    "input": ["a.png"], "top_k": 5, "read_as": "page", "ocr_engine": "ppocrv4", "pdf_dpi": 100, "sweep": None,
    "sweep_sampler": "tpe", "sweep_trials": 3,
    "sweep_storage": "sqlite:///x.db", "seeds": 2, "baseline_epochs": 3, "group_by_length": False,
    "teacher_cache": False, "teacher_precision": "float32", "teacher_top_k": 8, "save_every": 5,
    "on_bad_sample": "skip", "num_workers": 1, "num_proc": 2, "log_every": 5, "debug": True,
}  # None: flags whose refusals other tests cover (they need files, or pair with other flags)


def argv_of(name, value):
    option = config.flag(name)
    if isinstance(value, bool):
        return [option if value else "--no-" + option[2:]]
    return [option, *map(str, value)] if isinstance(value, list) else [option, str(value)]


def test_every_flag_has_a_sample_or_a_reason():
    assert set(SAMPLES) == {f.name for f in dataclasses.fields(Config)}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("mode", MODES)
def test_every_flag_is_taken_or_refused_in_one_line(mode, task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no run directory of this project is read (eval's saved settings)
    extra = ["--sweep", "alpha=0,0.5"] if mode == "sweep" else []
    for name, value in SAMPLES.items():
        if value is None:
            continue
        argv = ["--mode", mode, "--task", task, *extra, *argv_of(name, value)]
        if name == "input" or (name in ("top_k", "pdf_dpi", "read_as") and mode in ("predict", "export")):
            argv += [] if name == "input" else ["--input", "a.png"]
        try:
            parse_config(argv)
        except UserError as e:
            message = str(e)
            assert "\n" not in message, (argv, message)
            assert Config(mode=mode, task=task, **{name: value}).not_applicable(name), (argv, message)
            assert config.flag(name) in message, (argv, message)
        else:
            assert not Config(mode=mode, task=task, **{name: value}).not_applicable(name), argv


def test_flags_that_do_not_apply_are_named():
    with pytest.raises(UserError, match="--max-text-width is for --task text-recognition, not token-classification"):
        parse_config(["--task", "token-classification", "--max-text-width", "320"])
    with pytest.raises(UserError, match="--top-k is for --mode predict, not eval"):
        parse_config(["--mode", "eval", "--top-k", "2"])
    assert parse_config(["--mode", "predict", "--input", "a.png", "--top-k", "2"]).top_k == 2
    assert parse_config(["--task", "text-recognition", "--max-length", "512"]).max_length == 512  # the default
