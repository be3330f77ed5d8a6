"""The training recipe: --scheduler, early stopping, --config files, --report-to tensorboard and mlflow, LoRA for the
teacher and for a pretrained student."""
import glob
import json
import logging
import re
import struct

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

import models
import recipe
import registry
import saved
from config import Config, UserError, parse_config
from conftest import assert_same_run, kill_inside_second_epoch, metrics


def lrs(scheduler, steps):
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def optimizer():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)


@pytest.mark.parametrize("name, reference", [("cosine", get_cosine_schedule_with_warmup),
                                             ("linear", get_linear_schedule_with_warmup)])
def test_scheduler_matches_transformers(name, reference):
    ours = lrs(recipe.make_scheduler(Config(scheduler=name, warmup_ratio=0.2), optimizer(), 50), 50)
    theirs = lrs(reference(optimizer(), num_warmup_steps=10, num_training_steps=50), 50)
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[0] == 0 and ours[10] == pytest.approx(1e-3) and ours[-1] < 3e-5


def test_constant_scheduler_warms_up_then_stays():
    values = lrs(recipe.make_scheduler(Config(scheduler="constant", warmup_ratio=0.1), optimizer(), 40), 40)
    assert values[:4] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4])
    assert values[4:] == pytest.approx([1e-3] * 36)


def test_cosine_midpoint_is_half_the_peak():
    values = lrs(recipe.make_scheduler(Config(scheduler="cosine", warmup_ratio=0.0), optimizer(), 100), 100)
    assert values[50] == pytest.approx(5e-4)


def run_early_stopping(values, patience, min_delta):
    """The epoch (1-based) at which training stops on this validation sequence, and why; (None, "") if it never does."""
    state = recipe.early_stopping_start()
    for epoch, value in enumerate(values, start=1):
        reason = recipe.early_stopping(state, value, patience, min_delta)
        if reason:
            return epoch, reason
    return None, ""


@pytest.mark.parametrize("values, patience, min_delta, stop", [
    ([0.1, 0.2, 0.3, 0.3, 0.3], 2, 0.0, 5),        # two epochs in a row without a rise
    ([0.1, 0.2, 0.2, 0.3, 0.3, 0.3], 2, 0.0, 6),   # a rise resets the count
    ([0.1, 0.2, 0.15, 0.18, 0.19], 3, 0.0, 5),     # below the best is no improvement, however it moves
    ([0.5, 0.505, 0.51, 0.514], 2, 0.01, 3),       # rises of at most min_delta do not count...
    ([0.5, 0.505, 0.509, 0.5101], 3, 0.01, None),  # ...but measured from the last real improvement, they add up
    ([0.1, 0.1, 0.1, 0.1], 0, 0.0, None),          # patience 0: off
])
def test_early_stopping_stops_at_the_right_epoch(values, patience, min_delta, stop):
    epoch, reason = run_early_stopping(values, patience, min_delta)
    assert epoch == stop
    assert (f"in {patience} epoch" in reason) == (stop is not None)


TINY = ["--preset", "demo", "--alpha", "0", "--student-size", "small", "--max-length", "16", "--batch-size", "8",
        "--max-samples", "8", "--student-image-size", "32", "--epochs", "3"]


@pytest.fixture(scope="module")
def stopped_run(tiny_demo, tmp_path_factory):
    """A tiny run that stops early: no epoch can beat the first by more than 1, so patience 1 ends it at epoch 2.

    Its early-stopping settings and tracker come from a YAML --config file, the rest from the command line.
    """
    root = tmp_path_factory.mktemp("recipe")
    (root / "recipe.yaml").write_text("early-stopping-patience: 1\nearly_stopping_min_delta: 1\nscheduler: cosine\n"
                                      "report-to: tensorboard\n")
    code, log = run_logged("--mode", "train", *TINY, "--dataset", tiny_demo, "--cache-dir", root / "cache",
                           "--output-dir", root / "run", "--config", root / "recipe.yaml")
    assert code == 0, log
    return root / "run", log


def run_logged(*argv):
    """main.main(argv) in this process (no second start-up of torch and transformers): exit code and log text."""
    import main
    lines, handler, logger = [], logging.Handler(), logging.getLogger("docdistill")
    handler.emit = lambda record: lines.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return main.main([str(a) for a in argv]), "\n".join(lines)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_early_stopping_end_to_end_and_resume_from_the_written_config(stopped_run):
    out, log = stopped_run
    assert "stopped after epoch 2 of 3" in log
    rows = [json.loads(line) for line in open(out / "student_metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and "stop_reason" not in rows[0]
    assert rows[1]["stop_reason"].startswith("early stopping: no validation improvement")
    ckpt = torch.load(out / "latest_checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["stop_reason"] == rows[1]["stop_reason"]
    written = json.load(open(out / "train_config.json"))
    assert (written["scheduler"], written["early_stopping_patience"], written["max_samples"]) == ("cosine", 1, 8)
    # the written config alone repeats the run's settings: the checkpoint's fingerprint matches
    code, log = run_logged("--config", out / "train_config.json", "--checkpoint", out / "latest_checkpoint.pth")
    assert code == 0, log
    assert "it had stopped (early stopping" in log
    assert len(open(out / "student_metrics.jsonl").readlines()) == 2
    assert torch.load(out / "latest_checkpoint.pth", weights_only=True)["epoch"] == 2  # no third epoch


def test_config_file_round_trip(tmp_path):
    checkpoint = tmp_path / "teacher_checkpoint.pth"
    checkpoint.write_bytes(b"")
    cfg = parse_config(["--preset", "demo", "--mode", "train", "--lr", "1e-4", "--scheduler", "cosine",
                        "--teacher", "demo-dit", "--teacher", "demo-minilm", "--no-group-by-length",
                        "--early-stopping-patience", "2", "--checkpoint", str(checkpoint), "--overwrite"])
    assert cfg.extra_teachers == ["demo-minilm"]  # a list setting (was --input, which the teacher mode refuses now)
    path = tmp_path / "teacher_config.json"
    path.write_text(json.dumps(cfg.to_file()))  # as training writes it
    again = parse_config(["--config", str(path)]).to_dict()
    assert again == {**cfg.to_dict(), "config": str(path), "checkpoint": "", "overwrite": False}


def test_config_file_precedence(tmp_path):
    """defaults < preset < config file < command line; YAML keys may be spelled like the flags."""
    path = tmp_path / "settings.yaml"
    path.write_text("preset: demo\nbatch-size: 4\nlr: 1\nwarmup_ratio: 0\ntemperature: 2e-1\n")
    cfg = parse_config(["--config", str(path), "--lr", "0.02"])
    assert (cfg.lr, cfg.batch_size, cfg.warmup_ratio, cfg.temperature) == (0.02, 4, 0.0, 0.2)  # command line, file
    assert (cfg.student_image_size, cfg.alpha) == (112, 0.7)  # the file's preset, then the defaults
    assert parse_config(["--config", str(path), "--preset", "rvlcdip"]).student_image_size == 224


@pytest.mark.parametrize("text, message", [
    ('{"batch_size": 4, "bach_size": 8}', "unknown setting bach_size (the keys are the flags' names"),
    ('{"epochs": "3"}', "epochs must be an integer, got '3'"),
    ('{"lr": true}', "lr must be a number, got True"),
    ('{"lr": "fast"}', "lr must be a number, got 'fast'"),
    ('{"preset": "nope"}', "preset must be one of"),
    ('[1, 2]', "must hold a mapping"),
    ('{"lr": ', "is not valid JSON"),
    ('lr: [1', "is not valid YAML"),
])
def test_bad_config_file_is_one_line_error(tmp_path, capsys, text, message):
    import main
    path = tmp_path / ("bad.yaml" if "YAML" in message else "bad.json")
    path.write_text(text)
    assert main.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config {path}") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--early-stopping-patience", "-1"], "--early-stopping-patience must be >= 0, got -1"),
    (["--early-stopping-min-delta", "-0.1"], "--early-stopping-min-delta must be >= 0, got -0.1"),
    (["--early-stopping-min-delta", "inf"], "--early-stopping-min-delta must be a finite number, got inf"),
])
def test_recipe_flag_bounds(flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_config(flags)


def test_config_file_values_are_validated_like_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"scheduler": "step"}')
    with pytest.raises(UserError, match="--scheduler must be one of linear, cosine, constant, got 'step'"):
        parse_config(["--config", str(path)])


def tensorboard_scalars(run_dir):
    """{tag: [(step, value)]} from the TensorBoard event files in run_dir (TFRecord: length, CRC, event, CRC)."""
    from tensorboardX.proto import event_pb2
    scalars = {}
    for path in glob.glob(f"{run_dir}/events.out.tfevents.*"):
        data, at = open(path, "rb").read(), 0
        while at < len(data):
            size, = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + size])
            at += 12 + size + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_tracker_writes_config_steps_and_epochs(stopped_run):
    out, _ = stopped_run
    scalars = tensorboard_scalars(out / "tracking" / "student")
    assert [step for step, _ in scalars["train/total"]] == [1, 2]  # one step per epoch: 8 documents, batch 8
    assert [step for step, _ in scalars["epoch/val_accuracy"]] == [1, 2]
    assert {"train/ce", "train/kd", "train/lr", "epoch/train_loss", "epoch/val_macro_f1"} <= set(scalars)
    rows = [json.loads(line) for line in open(out / "student_metrics.jsonl")]
    assert [value for _, value in scalars["epoch/train_loss"]] == pytest.approx([r["train_loss"] for r in rows])
    # each step's own rate: 3 steps in all, so no warm-up (10% of 3 rounds to 0), cosine from the peak, 3e-4
    assert [value for _, value in scalars["train/lr"]] == pytest.approx([3e-4, 3e-4 * 0.75])
    hparams = glob.glob(str(out / "tracking" / "student" / "*" / "hparams.yml"))  # one per start (and resume)
    assert hparams and all("early_stopping_patience: 1" in open(path).read() for path in hparams)


def test_mlflow_tracker_writes_config_steps_and_epochs_to_a_local_store(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (MLflow's default ./mlruns, mlflow.db)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    code, log = run_logged("--mode", "train", *TINY, "--epochs", "2", "--early-stopping-patience", "1",
                           "--early-stopping-min-delta", "1", "--report-to", "mlflow", "--dataset", tiny_demo,
                           "--cache-dir", tmp_path / "cache", "--output-dir", out)
    assert code == 0, log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{out / 'tracking' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("student").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "student"
    assert (run.data.params["early_stopping_patience"], run.data.params["report_to"]) == ("1", "mlflow")
    assert json.loads(run.data.params["input"]) == []  # lists as JSON, as for TensorBoard
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    assert {"train/total", "train/ce", "train/kd", "train/lr", "epoch/train_loss", "epoch/val_macro_f1"} <= set(history)
    assert [step for step, _ in history["train/total"]] == [1, 2]  # one step per epoch: 8 documents, batch 8
    rows = [json.loads(line) for line in open(out / "student_metrics.jsonl")]
    assert [v for _, v in sorted(history["epoch/val_accuracy"])] == pytest.approx([r["val_accuracy"] for r in rows])
    assert [v for _, v in sorted(history["train/ce"])] == pytest.approx([r["train_ce"] for r in rows])
    assert run.data.tags["epoch/stop_reason"] == rows[-1]["stop_reason"]  # text: a tag, not a metric


def test_a_resume_marks_the_killed_runs_mlflow_run_killed(tiny_demo, tmp_path, monkeypatch):
    """Reliability III, 9: a run killed by SIGKILL leaves its MLflow run RUNNING; resuming it marks that one KILLED
    (the resumed run is a run of its own, FINISHED)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    args = ["--mode", "train", *TINY, "--epochs", "1", "--report-to", "mlflow", "--dataset", tiny_demo,
            "--cache-dir", tmp_path / "cache", "--output-dir", out]
    assert run_logged(*args)[0] == 0
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{out / 'tracking' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("student").experiment_id
    killed = client.create_run(experiment, run_name="student").info.run_id  # what a SIGKILLed run leaves: RUNNING
    assert client.get_run(killed).info.status == "RUNNING"
    assert run_logged(*args, "--checkpoint", out / "latest_checkpoint.pth")[0] == 0
    assert client.get_run(killed).info.status == "KILLED"
    assert sorted(r.info.status for r in client.search_runs([experiment])) == ["FINISHED", "FINISHED", "KILLED"]


def tiny_beit(labels=3):
    from transformers import BeitConfig, BeitForImageClassification
    torch.manual_seed(0)
    return BeitForImageClassification(BeitConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64, use_mean_pooling=True,
                                                 num_labels=labels))


def test_lora_trains_only_the_adapters_and_the_head_and_saves_a_plain_model(tmp_path):
    from transformers import AutoModelForImageClassification
    model = recipe.with_lora(Config(mode="teacher", lora_r=4), tiny_beit())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(2):  # LoRA's B starts at 0: A gets a gradient from the second step on
        torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    assert any("classifier.modules_to_save" in k for k in changed)
    assert all("lora_" in k or "modules_to_save" in k for k in changed)

    model.eval()
    resumed = recipe.with_lora(Config(mode="teacher", lora_r=4), tiny_beit())  # what a resume loads the checkpoint in
    models.load_student_weights(resumed, model.state_dict(), "checkpoint")  # strict: every tensor, nothing else
    with torch.no_grad():
        assert torch.equal(resumed.eval()(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
    plain = recipe.merged(model)  # what save_best writes
    assert type(plain).__name__ == "BeitForImageClassification" and hasattr(model, "merge_and_unload")  # a copy
    plain.save_pretrained(tmp_path / "teacher")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "teacher").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits, atol=1e-5)


def test_lora_default_targets_per_architecture_and_errors():
    from transformers import (DistilBertConfig, DistilBertForSequenceClassification, LayoutLMv3Config,
                              LayoutLMv3ForSequenceClassification, LayoutLMv3ForTokenClassification, ViTConfig,
                              ViTForImageClassification)
    cfg = Config(mode="teacher", lora_r=2)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    for model in (LayoutLMv3ForSequenceClassification(LayoutLMv3Config(**small)),
                  LayoutLMv3ForTokenClassification(LayoutLMv3Config(**small)),
                  ViTForImageClassification(ViTConfig(**small, image_size=32))):
        names = [n for n, p in recipe.with_lora(cfg, model).named_parameters() if p.requires_grad]
        assert any("lora_A" in n for n in names) and any("classifier.modules_to_save" in n for n in names)
    # DistilBERT (the funsd preset's pretrained student): q_lin,v_lin, and its sequence head's pre_classifier too
    distilbert = recipe.with_lora(cfg, DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=1,
                                                                                            n_heads=2, hidden_dim=32)))
    names = [n for n, p in distilbert.named_parameters() if p.requires_grad]
    assert any("q_lin.lora_A" in n for n in names) and any("v_lin.lora_B" in n for n in names)
    assert any("pre_classifier.modules_to_save" in n for n in names)
    assert any(".classifier.modules_to_save" in n for n in names)
    from transformers import BertConfig, BertForSequenceClassification
    with pytest.raises(UserError, match="no default --lora-target-modules for a bert model"):
        recipe.with_lora(cfg, BertForSequenceClassification(BertConfig(**small)))
    with pytest.raises(UserError, match="--lora-target-modules nope: .*"):
        recipe.with_lora(Config(mode="teacher", lora_r=2, lora_target_modules="nope"), tiny_beit())
    with pytest.raises(UserError, match="--lora-r is for --mode teacher, train or sweep"):
        parse_config(["--mode", "demo", "--lora-r", "4"])
    assert parse_config(["--mode", "eval", "--lora-r", "4"]).lora_r == 4  # the training run's flags: ignored


def test_lora_teacher_run_saves_a_merged_teacher_and_resumes(tiny_demo, tmp_path):
    from transformers import AutoModelForImageClassification, BeitImageProcessor
    source = tmp_path / "tiny-dit"
    tiny_beit().save_pretrained(source)
    BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(source)
    args = ["--mode", "teacher", *TINY, "--epochs", "2", "--teacher", source, "--lora-r", "4", "--dataset", tiny_demo,
            "--cache-dir", tmp_path / "cache", "--output-dir", tmp_path / "t"]
    code, log = run_logged(*args)
    assert code == 0, log
    assert "LoRA rank 4 on q_proj,v_proj, classifier trained in full: 0.0" in log
    checkpoint = torch.load(tmp_path / "t" / "teacher_checkpoint.pth", weights_only=True)
    assert any("lora_A" in k for k in checkpoint["model"]) and checkpoint["epoch"] == 2
    best = torch.load(tmp_path / "t" / "teacher_model.pth", weights_only=True)["state_dict"]
    assert not any("lora" in k or "modules_to_save" in k for k in best)  # merged: a plain BEiT
    assert set(best) == set(AutoModelForImageClassification.from_pretrained(tmp_path / "t" / "teacher").state_dict())
    code, log = run_logged(*args, "--checkpoint", tmp_path / "t" / "teacher_checkpoint.pth")
    assert code == 0 and "resumed from" in log, log


# ----------------------------------------------------------------------------- LoRA for a pretrained student

DEMO_VOCAB = 3000  # the demo tokenizer's size at most (demo.train_demo_tokenizer)


@pytest.fixture(scope="module")
def pretrained_student(tmp_path_factory):
    """A directory holding a small LayoutLMv3 encoder's weights (no head), as a hub base model would: with
    --student-size full the student starts from them, with a fresh classification head."""
    from transformers import LayoutLMv3Model
    config = models.builtin_configs()["builtin:layoutlmv3-base"]()
    config.update({**models.STUDENT_SIZES["small"]["layoutlmv3"], "vocab_size": DEMO_VOCAB, "input_size": 32})
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("pretrained") / "student"
    LayoutLMv3Model(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("flags, reason", [
    ([], "--student-size tiny builds the student from random weights"),
    (["--student-size", "full", "--student-config", "builtin:layoutlmv3-base"], "is a config only"),
    (["--student-size", "full", "--student-config", "CONFIG_ONLY"], "holds no weights"),
    (["--task", "text-recognition", "--student-size", "full"], "the text-recognition student (a CRNN)"),
])
def test_lora_refuses_a_student_from_random_weights(tmp_path, capsys, flags, reason):
    import main
    from transformers import LayoutLMv3Config
    LayoutLMv3Config().save_pretrained(tmp_path / "config-only")
    flags = [str(tmp_path / "config-only") if f == "CONFIG_ONLY" else f for f in flags]
    assert main.main(["--mode", "train", "--lora-r", "4", *flags, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and reason in err
    assert err.startswith("error: --lora-r needs a student that starts from pretrained weights, and ")


def layoutlmv3_batch(n=4, words=6):
    g = torch.Generator().manual_seed(0)
    corner = torch.randint(0, 500, (n, words, 2), generator=g)
    return {"input_ids": torch.randint(3, DEMO_VOCAB, (n, words), generator=g),
            "attention_mask": torch.ones(n, words, dtype=torch.long),
            "bbox": torch.cat([corner, corner + torch.randint(1, 400, (n, words, 2), generator=g)], -1),
            "pixel_values": torch.randn(n, 3, 32, 32, generator=g)}


def test_student_lora_trains_adapters_and_head_and_saves_a_student_eval_and_predict_load(pretrained_student,
                                                                                         tmp_path):
    """The student as tasks.py builds it, with the adapters as run_train adds them; saved by saved.save_best, read
    back by --mode eval (registry.load_student) and --mode predict/export (predict.load_model)."""
    import types
    from transformers import AutoModelForSequenceClassification

    from modes import predict
    labels = ["invoice", "letter", "memo"]

    def student():
        return models.build_student(AutoModelForSequenceClassification, str(pretrained_student), labels,
                                    size="full", vocab_size=DEMO_VOCAB, input_size=32, pad_token_id=1)
    cfg = parse_config(["--mode", "train", "--lora-r", "4", "--student-size", "full", "--student-config",
                        str(pretrained_student), "--output-dir", str(tmp_path)])
    torch.manual_seed(0)
    model = recipe.with_lora(cfg, student())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch, targets = layoutlmv3_batch(), torch.tensor([0, 1, 2, 0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # LoRA's B starts at 0: A gets a gradient from the second step on
        torch.nn.functional.cross_entropy(model(**batch).logits, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    assert any("classifier.modules_to_save" in k for k in changed)
    assert all("lora_" in k or "modules_to_save" in k for k in changed)  # the pretrained encoder is untouched

    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    plain = student()
    task = types.SimpleNamespace(student=plain, labels=labels,
                                 save_pretrained=lambda m, directory, role: m.save_pretrained(directory))
    saved.save_best(task, model, str(tmp_path), "student")
    assert hasattr(model, "merge_and_unload")  # save_best merged a copy, the model trains on with its adapters
    weights = torch.load(tmp_path / "student_model.pth", weights_only=True)["state_dict"]
    assert not any("lora" in k or "modules_to_save" in k for k in weights) and weights.keys() == plain.state_dict().keys()
    loaded = [registry.load_student(str(tmp_path / "student_model.pth")),
              registry.load_student(str(tmp_path / "student")),
              predict.load_model(str(tmp_path / "student_model.pth"))[0],
              AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")]
    for loaded_model in loaded:
        with torch.no_grad():
            logits = loaded_model.eval()(**batch).logits
        assert torch.allclose(logits, expected, atol=1e-5)
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.fixture(scope="module")
def lora_student_args(tiny_demo, pretrained_student, tmp_path_factory):
    cache = tmp_path_factory.mktemp("lora-student") / "cache"
    return [*TINY, "--epochs", "2", "--max-samples", "16", "--batch-size", "4", "--save-every", "1",
            "--student-size", "full", "--student-config", pretrained_student, "--lora-r", "4", "--dataset",
            tiny_demo, "--cache-dir", cache]


def test_student_lora_run_resumes_like_an_uninterrupted_run(lora_student_args, pretrained_student, tmp_path):
    full = tmp_path / "full"
    code, log = run_logged("--mode", "train", *lora_student_args, "--output-dir", full)
    assert code == 0, log
    assert "student starts from the pretrained weights in" in log
    assert re.search(r"LoRA rank 4 on query,value, classifier trained in full: [0-9.]+M parameters trainable", log)
    assert [r["epoch"] for r in metrics(full)] == [1, 2]

    killed = tmp_path / "killed"
    saved = kill_inside_second_epoch(lora_student_args, killed)
    assert saved["epoch"] == 1 and 0 < saved["step_in_epoch"] < 4  # 16 pages, batch 4: 4 steps an epoch
    code, log = run_logged("--mode", "train", *lora_student_args, "--output-dir", killed, "--checkpoint",
                           killed / "latest_checkpoint.pth")
    assert code == 0 and "resumed from" in log, log
    final, _ = assert_same_run(full, killed)

    # what trained: the adapters and the head; every other tensor is the pretrained encoder's, as it was loaded
    from safetensors.torch import load_file
    pretrained = load_file(pretrained_student / "model.safetensors")
    frozen = {k: v for k, v in final["model"].items() if "lora_" not in k and "modules_to_save" not in k}
    assert any(torch.count_nonzero(v) for k, v in final["model"].items() if "lora_B" in k)  # B left its zeros
    for key, value in frozen.items():
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if name.startswith("layoutlmv3."):
            assert torch.equal(value, pretrained[name.removeprefix("layoutlmv3.")]), key
        else:  # the head's frozen original (peft keeps it beside the trained copy): as at the mid-run checkpoint
            assert "classifier.original_module" in key and torch.equal(value, saved["model"][key]), key
    best = torch.load(full / "student_model.pth", weights_only=True)["state_dict"]
    assert not any("lora" in k or "modules_to_save" in k for k in best)  # merged: a plain LayoutLMv3 student
    code, log = run_logged("--mode", "eval", *lora_student_args, "--output-dir", full)  # plain load, no adapters
    assert code == 0, log
    rows = metrics(full)  # the merged student scores the validation split as the adapter model did at its best epoch
    best_row = max(rows, key=lambda r: r["val_accuracy"])  # the first of equals, as training keeps
    scores = json.load(open(full / "eval.json"))
    assert scores["split"] == "validation" and scores["model"].endswith("student_model.pth")
    assert (scores["accuracy"], scores["macro_f1"]) == pytest.approx((best_row["val_accuracy"],
                                                                      best_row["val_macro_f1"]))


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_unpinned_tracker_not_installed_is_one_line(tracker, tmp_path):
    """wandb and trackio are handed to Accelerate when installed; without them, one line says how to get them."""
    import importlib.util
    from config import UserError, parse_config
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    with pytest.raises(UserError, match=f"--report-to {tracker}: the {tracker} package is not installed"):
        parse_config(["--report-to", tracker, "--output-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_a_pretrained_students_head_rows_follow_the_labels_by_name(pretrained_student, tmp_path):
    """--student-config DIR --student-size full with a student saved on the same classes in another order: each
    class keeps its own head row (matched by name); with other classes the head starts fresh."""
    from transformers import AutoModelForSequenceClassification

    def build(source, labels):
        return models.build_student(AutoModelForSequenceClassification, str(source), labels, size="full",
                                    vocab_size=DEMO_VOCAB, input_size=32, pad_token_id=1)
    saved = build(pretrained_student, ["invoice", "letter", "memo"])
    saved.save_pretrained(tmp_path / "saved")
    rows = saved.classifier.out_proj.weight.detach()
    again = build(tmp_path / "saved", ["Memo", "invoice", "letter"])
    assert torch.equal(again.classifier.out_proj.weight, rows[[2, 0, 1]])
    assert torch.equal(again.classifier.out_proj.bias, saved.classifier.out_proj.bias[[2, 0, 1]])
    assert [again.config.id2label[i] for i in range(3)] == ["Memo", "invoice", "letter"]
    other = build(tmp_path / "saved", ["email", "form", "memo"])
    assert not torch.equal(other.classifier.out_proj.weight, rows)
    assert torch.equal(other.classifier.dense.weight, saved.classifier.dense.weight)  # the rest is kept
