"""Reliability: exact resume after SIGKILL, atomic writes, checkpoints that cannot run code, non-finite loss."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import utils
from config import UserError
from conftest import ROOT, run_main

# Batch 4 on 32 pages: 8 steps an epoch, a checkpoint every 2. The demo teacher is random but seeded.
FAST = ["--preset", "demo", "--max-length", "64", "--batch-size", "4", "--student-image-size", "64",
        "--epochs", "2", "--save-every", "2"]
TIMING = ("train_seconds", "train_docs_per_s")  # wall-clock, the only thing allowed to differ


def metrics(out_dir):
    with open(out_dir / "student_metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def snapshot(directory):
    return {p: open(os.path.join(d, p), "rb").read() for d, _, files in os.walk(directory) for p in files}


@pytest.fixture(scope="module")
def common(tiny_demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return root, [*FAST, "--dataset", tiny_demo, "--cache-dir", root / "cache"]


@pytest.fixture(scope="module")
def uninterrupted(common):
    root, args = common
    result = run_main("--mode", "train", *args, "--output-dir", root / "full")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "full"


def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(common, uninterrupted):
    root, args = common
    out = root / "killed"
    ckpt = out / "latest_checkpoint.pth"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--mode", "train", *map(str, args),
                             "--output-dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # kill it inside the second epoch
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=True)  # readable at any moment: writes are atomic
            if state["epoch"] == 1 and state["step_in_epoch"] > 0:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1 and 0 < saved["step_in_epoch"] <= 8

    resumed = run_main("--mode", "train", *args, "--output-dir", out, "--checkpoint", ckpt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch 2, step {saved['step_in_epoch']}" in resumed.stderr
    assert metrics(out) == metrics(uninterrupted)  # losses, accuracies, lr: exactly equal, not just close
    a = torch.load(uninterrupted / "latest_checkpoint.pth", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_resume_with_other_settings_names_them_and_changes_nothing(common, uninterrupted):
    _, args = common
    before = snapshot(uninterrupted)
    result = run_main("--mode", "train", *args, "--output-dir", uninterrupted, "--alpha", "0.5", "--seed", "1",
                      "--checkpoint", uninterrupted / "latest_checkpoint.pth")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert "alpha: 0.7 in checkpoint, 0.5 now" in error and "seed: 42 in checkpoint, 1 now" in error
    assert "lr:" not in error  # only the settings that differ
    assert snapshot(uninterrupted) == before


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(common, tmp_path):
    _, args = common
    result = run_main("--mode", "train", *args, "--output-dir", tmp_path, "--lr", "1e30", "--save-every", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    found = re.search(r"loss became (nan|inf|-inf) at epoch 1 step (\d+)", error)
    assert found and "kept as it was" in error, error
    saved = utils.safe_torch_load(str(tmp_path / "latest_checkpoint.pth"))  # written before it diverged
    assert saved["epoch"] == 0 and saved["step_in_epoch"] == int(found.group(2)) - 1  # the save before it


KILLED_WRITER = """
import io, sys, time, torch, utils
buffer = io.BytesIO()
torch.save({"step": 2, "weights": torch.ones(100_000)}, buffer)
data = buffer.getvalue()
def write(f):
    f.write(data[:len(data) // 2])
    f.flush()
    print("half written", flush=True)
    time.sleep(600)
utils._atomic_write(sys.argv[1], write)
"""


def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "latest_checkpoint.pth"
    utils.atomic_torch_save({"step": 1, "weights": torch.zeros(100_000)}, str(path))
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline().strip() == "half written"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert utils.safe_torch_load(str(path))["step"] == 1
    leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert len(leftovers) == 1  # the killed writer's half file, never renamed
    utils.atomic_torch_save({"step": 3}, str(path))
    assert utils.safe_torch_load(str(path))["step"] == 3
    assert os.listdir(tmp_path) == ["latest_checkpoint.pth"]  # the next save cleared the leftover


def test_failed_writes_keep_the_previous_file_and_directory(tmp_path):
    path = str(tmp_path / "eval.json")
    utils.atomic_json({"accuracy": 0.5}, path)

    def crash(f):
        f.write(b'{"accuracy": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        utils._atomic_write(path, crash)
    assert json.load(open(path)) == {"accuracy": 0.5}

    folder = tmp_path / "student"
    utils.atomic_dir(str(folder), lambda d: open(os.path.join(d, "config.json"), "w").write("{}"))

    def crash_dir(d):
        open(os.path.join(d, "config.json"), "w").write("{")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        utils.atomic_dir(str(folder), crash_dir)
    assert open(folder / "config.json").read() == "{}"
    utils.plot_curves([{"epoch": 1, "train_loss": 1.0, "train_kd": 0.5, "train_ce": 1.5, "train_accuracy": 0.5,
                        "metric_name": "accuracy", "val_accuracy": 0.4}], str(tmp_path / "curves.png"))
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "eval.json", "student"]  # no temp files left over


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_checkpoint_is_refused_without_running_it(common, tmp_path):
    evil, marker = tmp_path / "latest_checkpoint.pth", tmp_path / "payload-ran"
    torch.save({"model": Payload(marker), "fingerprint": "x"}, evil)
    with pytest.raises(UserError, match=r"refused: loading it needs unsafe unpickling \(it refers to posix.system"):
        utils.safe_torch_load(str(evil))
    assert not marker.exists()

    _, args = common
    result = run_main("--mode", "train", *args, "--output-dir", tmp_path / "out", "--checkpoint", evil)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unsafe unpickling" in result.stderr.strip().splitlines()[-1]
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load does run it
    assert marker.exists()
