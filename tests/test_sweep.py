"""--mode sweep: a 2x2 grid end to end (files, best = argmax of validation, test split only at the end, the
teacher run once), a sweep killed inside a trial continued by the same command, and the --sweep syntax."""
import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pytest

import checkpoints
import classification as tasks
import collate
import main
from modes import sweep
from config import UserError, build_parser, parse_config
from conftest import ROOT

# 8 pages per split: one batch of 8 (the end-to-end test) or two of 4 (the kill test, which stops mid-epoch).
# The teacher in float32: a reduced precision would run it twice more on a sample first (the KL check).
FAST = ["--preset", "demo", "--mode", "sweep", "--max-length", "32", "--student-image-size", "32", "--student-size",
        "small", "--max-samples", "8", "--teacher-precision", "float32"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep-cache")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: tiny models


def study_of(out):
    name = json.load(open(out / "sweep_study.json"))["study"]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'sweep.db'}")


def test_grid_sweep_end_to_end(tiny_demo, cache, tmp_path, monkeypatch):
    shutil.rmtree(cache / "teacher", ignore_errors=True)  # the teacher's logits are computed in this test
    events, teacher_docs = [], []
    teacher_logits, make_loader, score = (tasks.DocumentClassification.teacher_logits, collate.make_loader,
                                          sweep.score_on_test)

    def counting_teacher(self, teacher, batch):
        teacher_docs.append(len(batch["labels"]))
        return teacher_logits(self, teacher, batch)

    def recording_loader(task, split, cfg, shuffle, **kw):
        events.append(split)
        return make_loader(task, split, cfg, shuffle, **kw)

    def recording_score(cfg, run_cfg):
        events.append("score")
        return score(cfg, run_cfg)
    monkeypatch.setattr(tasks.DocumentClassification, "teacher_logits", counting_teacher)
    monkeypatch.setattr(collate, "make_loader", recording_loader)
    monkeypatch.setattr(sweep, "score_on_test", recording_score)
    out = tmp_path / "sweep"
    argv = [*FAST, "--epochs", "1", "--batch-size", "8", "--dataset", tiny_demo, "--cache-dir", cache, "--output-dir", out,
            "--sweep", "temperature=2,4", "alpha=0,0.5"]
    assert main.main(list(map(str, argv))) == 0

    for name in ("sweep.csv", "sweep.md", "sweep_heatmap.png", "best_config.json", "sweep_test.json", "sweep.db"):
        assert (out / name).exists(), name
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert {(float(r["temperature"]), float(r["alpha"])) for r in rows} == {(2, 0), (2, 0.5), (4, 0), (4, 0.5)}
    # alpha 0 is one run whatever T: the second alpha-0 trial reuses the first one's
    repeat = [r for r in rows if r["state"].startswith("same run as trial")]
    assert len(repeat) == 1 and [r["state"] for r in rows].count("complete") == 3
    first = next(r for r in rows if r["trial"] == repeat[0]["state"].split()[-1])
    assert float(first["alpha"]) == float(repeat[0]["alpha"]) == 0 and first["dir"] == repeat[0]["dir"]
    assert first["validation"] == repeat[0]["validation"] and float(repeat[0]["seconds"]) == 0
    assert not (out / f"trial-{int(repeat[0]['trial']):03d}").exists()
    for r in rows:
        assert (out / r["dir"] / "student_model.pth").exists() and float(r["seconds"]) >= 0
        history = [json.loads(line) for line in open(out / r["dir"] / "student_metrics.jsonl")]
        assert float(r["validation"]) == pytest.approx(max(h["val_accuracy"] for h in history))
    best = json.load(open(out / "best_config.json"))
    top = max(rows, key=lambda r: float(r["validation"]))
    assert best["validation_accuracy"] == pytest.approx(float(top["validation"]))
    assert float(top["validation"]) == max(float(r["validation"]) for r in rows)
    assert best["command"].startswith("python main.py --preset demo --mode train") and "--sweep" not in best["command"]
    # the command trains exactly the best trial's run: the same settings as its train_config.json
    again = parse_config(shlex.split(best["command"])[2:])
    ran = json.load(open(out / best["dir"] / "train_config.json"))
    assert {k: getattr(again, k) for k in checkpoints.RESUME_KEYS} == {k: ran[k] for k in checkpoints.RESUME_KEYS}
    test = best["test"]["roles"]
    assert test["baseline"]["params"]["alpha"] == 0 and test["best"]["params"] == best["params"]
    assert "| **" in open(out / "sweep.md").read()
    # The test split: never during the trials, once per scored run at the end (best and baseline, one seed).
    first_score = events.index("score")
    assert "test" not in events[:first_score]
    scored = 1 if test["best"]["runs"][0]["dir"] == test["baseline"]["runs"][0]["dir"] else 2
    assert events[first_score:] == ["score", "test"] * scored
    # The teacher ran over the 8 training pages once, for the whole sweep (2 trials distil).
    assert sum(teacher_docs) == 8


def test_killed_sweep_continues_with_the_same_command(tiny_demo, cache, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    argv = list(map(str, [*FAST, "--epochs", "1", "--batch-size", "4", "--save-every", "1", "--dataset", tiny_demo, "--cache-dir", cache,
                          "--output-dir", out, "--sweep", "alpha=0,0.5"]))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    second = out / "trial-001" / "latest_checkpoint.pth"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not second.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the sweep ended before it could be killed"
    first_done = (out / "trial-000" / "student_metrics.jsonl").stat().st_mtime

    loaded = []
    load_checkpoint = checkpoints.load_checkpoint
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path, *a: loaded.append(path) or load_checkpoint(path, *a))
    assert main.main(argv) == 0  # the same command
    assert (out / "trial-000" / "student_metrics.jsonl").stat().st_mtime == first_done  # kept, not trained again
    assert str(second) in loaded  # the interrupted trial resumed from its checkpoint
    trials = study_of(out).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[1].user_attrs["interrupted"] and trials[2].user_attrs["dir"] == "trial-001"
    assert trials[2].user_attrs["resumed"]
    assert [json.loads(line)["epoch"] for line in open(out / "trial-001" / "student_metrics.jsonl")] == [1]
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["state"] for r in rows] == ["complete", "interrupted", "complete"]
    assert not (out / "sweep_heatmap.png").exists()  # temperature is not an axis: no temperature x alpha map
    assert not (out / "final").exists()  # best and baseline (alpha 0) were trials: nothing trained again

    assert main.main(argv) == 0  # once more: nothing left to train, no new trial
    assert len(study_of(out).get_trials()) == 3


def test_sweep_axes_syntax():
    assert sweep.parse_axes(["temperature=1,2,4", "alpha=0,0.5", "student-size=tiny,small", "epochs=2",
                             "group_by_length=true,false"]) == {
        "temperature": [1.0, 2.0, 4.0], "alpha": [0.0, 0.5], "student_size": ["tiny", "small"], "epochs": [2],
        "group_by_length": [True, False]}
    for bad, says in (("temperature", "NAME=V1,V2"), ("seed=1,2", "cannot be an axis"),
                      ("alpha=0,x", "not a valid --alpha"), ("colour=red", "cannot be an axis")):
        with pytest.raises(UserError, match=says):
            sweep.parse_axes([bad])
    parsed = build_parser().parse_args(["--mode", "sweep", "--sweep", "temperature=1,2", "alpha=0,0.9",
                                        "--sweep-sampler", "tpe", "--sweep-trials", "5"])
    assert parsed.sweep == ["temperature=1,2", "alpha=0,0.9"] and parsed.sweep_sampler == "tpe"
    with pytest.raises(UserError, match="add --mode sweep"):
        parse_config(["--mode", "train", "--sweep", "alpha=0,0.5"])
    with pytest.raises(UserError, match="needs its axes"):
        parse_config(["--mode", "sweep"])
    help_text = build_parser().format_help()
    assert "--sweep-storage" in help_text and "temperature=1,2,4,8" in help_text


def test_size_study_gain_per_size_over_seeds(tiny_demo, cache, tmp_path, monkeypatch):
    """student_size an axis with --seeds 2: each size's best distilled setting and its alpha-0 baseline trained
    with both seeds, scored on validation (the test split only for the best setting and its baseline), alpha-0
    runs with --baseline-epochs and without the unlabelled pages."""
    scored = []
    score = sweep.score_on_test
    monkeypatch.setattr(sweep, "score_on_test", lambda cfg, run_cfg: scored.append(run_cfg.output_dir) or
                        score(cfg, run_cfg))
    out = tmp_path / "sizes"
    argv = [*FAST, "--epochs", "1", "--baseline-epochs", "2", "--batch-size", "8", "--dataset", tiny_demo,
            "--unlabeled", tiny_demo, "--cache-dir", cache, "--output-dir", out, "--seeds", "2",
            "--sweep", "student_size=small,micro", "alpha=0,0.5"]
    assert main.main(list(map(str, argv))) == 0
    sizes = json.load(open(out / "sweep_test.json"))["sizes"]
    assert list(sizes) == ["micro", "small"]  # smallest first, whatever the axis order
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    runs = {}  # (student size, alpha, seed) -> the run's directory, trials and final runs
    for config in [*out.glob("trial-*/train_config.json"), *out.glob("final/*/train_config.json")]:
        c = json.load(open(config))
        runs[(c["student_size"], c["alpha"], c["seed"])] = config.parent
    for size, result in sizes.items():
        assert result["params"] == {"student_size": size, "alpha": 0.5}
        trial = {float(r["alpha"]): float(r["validation"]) for r in rows if r["student_size"] == size}
        # seed 42 is the trials' own runs; seed 43 trained in final/
        assert result["distilled"][0] == pytest.approx(trial[0.5]) and result["baseline"][0] == pytest.approx(trial[0])
        assert result["gain"] == pytest.approx([d - b for d, b in zip(result["distilled"], result["baseline"])])
        for alpha, value in ((0.0, result["baseline"][1]), (0.5, result["distilled"][1])):
            run = runs[(size, alpha, 43)]
            history = [json.loads(line) for line in open(run / "student_metrics.jsonl")]
            assert value == pytest.approx(max(h["val_accuracy"] for h in history))
    baselines = [json.load(open(run / "train_config.json")) for key, run in runs.items() if key[1] == 0]
    assert baselines and all((c["epochs"], c["unlabeled"]) == (2, "") for c in baselines)
    # the test split: the best setting and its baseline, two seeds each, once per run; not the size study's runs
    roles = json.load(open(out / "sweep_test.json"))["roles"]
    assert sorted(scored) == sorted({r["dir"] for role in roles.values() for r in role["runs"]})
    assert (out / "sweep_sizes.png").exists() and "Distillation gain by student size" in open(out / "sweep.md").read()


def test_a_process_without_trials_left_waits_for_the_others(tmp_path, monkeypatch):
    """Two processes on one study: when every grid point has started, the one with nothing left waits for the
    other's running trial (optuna's grid would hand it that point again) and then goes on to the final runs."""
    cfg = parse_config(["--preset", "demo", "--mode", "sweep", "--output-dir", str(tmp_path), "--sweep", "alpha=0,0.5"])
    axes = sweep.parse_axes(cfg.sweep)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'sweep.db'}", direction="maximize",
                                sampler=optuna.samplers.GridSampler(axes, seed=cfg.seed))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the other process, alive
    try:
        trials = []
        for _ in range(2):
            trial = study.ask()
            trial.suggest_categorical("alpha", axes["alpha"])
            for key, value in (("host", sweep.socket.gethostname()), ("pid", other.pid), ("dir", "elsewhere")):
                trial.set_user_attr(key, value)
            trials.append(trial)
        def finish(trial, value):  # through the storage: study.tell would stop the grid, outside optimize()
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.COMPLETE, [value])
        finish(trials[0], 0.5)  # the other process finished one point and still runs the other
        slept = []

        def sleep(seconds):  # meanwhile, the other process finishes its trial
            slept.append(seconds)
            finish(trials[1], 0.7)
        monkeypatch.setattr(sweep.time, "sleep", sleep)
        monkeypatch.setattr(sweep, "run_training", lambda *a: pytest.fail("a point was trained twice"))
        sweep.run_trials(cfg, study, axes)
    finally:
        other.kill()
    assert slept == [sweep.POLL_SECONDS] and len(study.get_trials()) == 2


def test_an_interrupted_grid_point_runs_again_as_the_same_point(tmp_path, monkeypatch):
    """A trial whose process died is queued again with its grid point, so that optuna's grid, which reads the point
    of every trial that ends while another point is left, neither fails (KeyError 'grid_id') nor runs it twice."""
    cfg = parse_config(["--preset", "demo", "--mode", "sweep", "--output-dir", str(tmp_path),
                        "--sweep", "alpha=0.3,0.5,0.7"])
    axes = sweep.parse_axes(cfg.sweep)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'sweep.db'}", direction="maximize",
                                sampler=optuna.samplers.GridSampler(axes, seed=cfg.seed))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask()  # a process that died inside its trial
    alpha = trial.suggest_categorical("alpha", axes["alpha"])
    for key, value in (("host", sweep.socket.gethostname()), ("pid", dead.pid), ("dir", "trial-000")):
        trial.set_user_attr(key, value)
    trained = []
    monkeypatch.setattr(sweep, "run_training", lambda cfg, run_cfg: trained.append(run_cfg.alpha) or run_cfg.alpha)
    sweep.run_trials(cfg, study, axes)
    assert trained[0] == alpha and sorted(trained) == sorted(axes["alpha"])  # the lost point first, each once
    rerun = study.get_trials()[1]
    assert rerun.user_attrs["dir"] == "trial-000"
    assert rerun.system_attrs["grid_id"] == study.get_trials()[0].system_attrs["grid_id"]
