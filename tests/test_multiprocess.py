"""Data-parallel training with 2 CPU processes (gloo) through torchrun."""
import json
import os
import subprocess
import sys

from conftest import ROOT, run_main

FLAGS = ["--preset", "demo", "--max-length", "64", "--batch-size", "3", "--student-image-size", "64"]


def launch(*args):
    """Two processes through torchrun (`accelerate launch --cpu` starts only one: its CPU launcher is single-process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "main.py"), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert "2 processes" in done.stderr, done.stderr[-3000:]  # they joined: one group of two, not two runs
    return done


def test_two_process_training_evaluates_like_one_process(tiny_demo, tmp_path):
    common = FLAGS + ["--dataset", tiny_demo, "--cache-dir", tmp_path / "cache"]
    teacher = run_main("--mode", "teacher", *common, "--epochs", "1", "--output-dir", tmp_path / "t")
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    common += ["--teacher", tmp_path / "t" / "teacher"]
    trained = launch("--mode", "train", *common, "--epochs", "2", "--output-dir", tmp_path / "s")
    assert trained.returncode == 0, trained.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "s" / "student_metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]  # one line per epoch: only the main process writes
    model = tmp_path / "s" / "student_model.pth"
    # 16 validation documents in batches of 3 do not split evenly over 2 processes: duplicates must be dropped
    single = run_main("--mode", "eval", *common, "--model", model, "--output-dir", tmp_path / "e1")
    double = launch("--mode", "eval", *common, "--model", model, "--output-dir", tmp_path / "e2")
    assert single.returncode == 0 and double.returncode == 0, (single.stderr + double.stderr)[-3000:]
    one, two = (json.load(open(tmp_path / d / "eval.json")) for d in ("e1", "e2"))
    assert one["documents"] == two["documents"] == 16
    assert sum(map(sum, two["confusion_matrix"])) == 16
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "teacher_agreement", "teacher_accuracy"):
        assert one[key] == two[key], key
