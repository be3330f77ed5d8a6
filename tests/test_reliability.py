"""Reliability: exact resume after SIGKILL and SIGTERM, runs never overwritten by accident, atomic writes,
checkpoints that cannot run code and carry a checksum, only usable weights saved."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import BeitImageProcessor

import checkpoints
import main
import models
import plots
import utils
from config import UserError, parse_config
from conftest import ROOT, assert_same_run, kill_inside_second_epoch, run_main
from demo_corpus import RVLCDIP_LABELS

# Batch 4 on 32 pages: 8 steps an epoch, a checkpoint every 2. The demo teacher is random but seeded.
FAST = ["--preset", "demo", "--max-length", "64", "--batch-size", "4", "--student-image-size", "64",
        "--epochs", "2", "--save-every", "2"]
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
    saved = kill_inside_second_epoch(args, out)
    assert saved["epoch"] == 1 and 0 < saved["step_in_epoch"] <= 8

    resumed = run_main("--mode", "train", *args, "--output-dir", out, "--checkpoint", ckpt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch 2, step {saved['step_in_epoch']}" in resumed.stderr
    a, b = assert_same_run(uninterrupted, out)  # losses, accuracies, lr, weights: exactly equal
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


def main_error(capsys, *argv):
    """main.main(argv) in this process: its exit code and its one error line."""
    code = main.main([str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines[-5:]
    return code, errors[0]


def test_weights_that_diverge_are_never_saved_and_the_message_is_true(common, tmp_path, capsys):
    _, args = common
    code, error = main_error(capsys, "--mode", "train", *args, "--output-dir", tmp_path, "--lr", "1e30",
                             "--save-every", "1")
    assert code == 2
    # Step 1 (warm-up: lr 0) is saved; step 2 multiplies the weights by ~1e30: finite, but useless to resume from.
    found = re.search(r"weights at epoch 1 step (\d+) give non-finite outputs: lower --lr.*; the last good "
                      r"checkpoint is (\S+) \(epoch 1 step (\d+)\), kept as it was", error)
    assert found, error
    assert found.group(2) == str(tmp_path / "latest_checkpoint.pth")
    saved = utils.safe_torch_load(found.group(2))
    assert saved["epoch"] == 0 and saved["step_in_epoch"] == int(found.group(3)) == int(found.group(1)) - 1
    weights = [w for w in saved["model"].values() if w.is_floating_point()]
    assert utils.all_finite(weights) and max(w.abs().max().item() for w in weights) < 100


def test_non_finite_loss_before_any_save_keeps_an_old_run_untouched_even_with_overwrite(common, uninterrupted,
                                                                                         tmp_path, capsys):
    _, args = common
    out = tmp_path / "old-run"
    shutil.copytree(uninterrupted, out)
    before = snapshot(out)
    code, error = main_error(capsys, "--mode", "train", *args, "--output-dir", out, "--overwrite", "--lr", "1e30",
                             "--save-every", "0")
    assert code == 2
    assert re.search(r"loss became (nan|inf|-inf) at epoch 1 step \d+: lower --lr", error), error
    assert error.endswith("nothing of this run was saved")
    assert snapshot(out) == before  # config, metrics, checkpoint and best model of the old run: all intact


def test_training_into_a_finished_run_is_refused_and_changes_nothing(common, uninterrupted, capsys):
    _, args = common
    before = snapshot(uninterrupted)
    code, error = main_error(capsys, "--mode", "train", *args, "--output-dir", uninterrupted)
    assert code == 2 and "already holds a student run" in error
    assert f"--checkpoint {uninterrupted / 'latest_checkpoint.pth'}" in error and "--overwrite" in error
    assert snapshot(uninterrupted) == before


@pytest.mark.parametrize("mode, name, leftover", [("train", "student", "student_metrics.jsonl"),
                                                   ("train", "student", "student"),
                                                   ("teacher", "teacher", "teacher_checkpoint.pth"),
                                                   ("teacher", "teacher", "teacher_model.pth")])
def test_which_directories_hold_a_run(tmp_path, mode, name, leftover):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "latest_checkpoint.pth").write_bytes(b"x")

    def refused(*flags):
        cfg = parse_config(["--mode", mode, "--output-dir", str(out), *map(str, flags)])
        try:
            checkpoints.refuse_to_overwrite(cfg, name)
        except UserError as e:
            return str(e)

    (out / ("student_metrics.jsonl" if name == "teacher" else "teacher_model.pth")).write_text("")
    assert refused() is None  # only the files of this kind of run count
    if leftover in ("student", "teacher"):  # the save_pretrained directory
        (out / leftover).mkdir()
    else:
        (out / leftover).write_text("")
    assert f"already holds a {name} run ({leftover})" in refused()
    assert "already holds" in refused("--checkpoint", elsewhere / "latest_checkpoint.pth")  # would be replaced
    assert refused("--overwrite") is None
    (out / "own_checkpoint.pth").write_bytes(b"x")
    assert refused("--checkpoint", out / "own_checkpoint.pth") is None  # resuming the run kept there


def test_overwrite_replaces_a_finished_run(common, uninterrupted, tmp_path):
    _, args = common
    out = tmp_path / "old-run"
    shutil.copytree(uninterrupted, out)
    (out / "student_metrics.jsonl").write_text('{"epoch": 1, "from": "the old run"}\n' * 5)
    result = run_main("--mode", "train", *args, "--output-dir", out, "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(uninterrupted, out)  # the same seed and flags: the same run, old rows gone


def test_sigterm_saves_at_the_next_step_then_resume_ends_like_an_uninterrupted_run(common, uninterrupted,
                                                                                     tmp_path):
    root, args = common
    out = root / "terminated"
    ckpt = out / "latest_checkpoint.pth"
    with open(tmp_path / "stderr", "w") as err:  # a file, not a pipe: the progress bar would fill a pipe
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--mode", "train",
                                 *map(str, args), "--output-dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:  # stepping: the first --save-every save is there
            if ckpt.exists():
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
        assert proc.wait(timeout=120) == 143, open(tmp_path / "stderr").read()[-3000:]
    message = open(tmp_path / "stderr").read().strip().splitlines()[-1]
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 0 and saved["step_in_epoch"] > 2  # the next step after the signal, not a --save-every
    assert message == (f"stopped by SIGTERM: saved {ckpt} at epoch 1 step {saved['step_in_epoch']}; "
                       f"continue with --checkpoint {ckpt}")

    resumed = run_main("--mode", "train", *args, "--output-dir", out, "--checkpoint", ckpt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(uninterrupted, out)


def test_sigterm_is_recorded_inside_the_block_and_the_handler_restored_after():
    before = signal.getsignal(signal.SIGTERM)
    with utils.sigterm_requests() as received:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not received and time.time() < deadline:
            time.sleep(0.01)
        assert received == [signal.SIGTERM]  # recorded, and this process is still alive
    assert signal.getsignal(signal.SIGTERM) is before


def flip_bytes_of(path, tensor):
    """Flip one byte in the middle of `tensor`'s data inside the saved file `path` (a disk error)."""
    raw = bytearray(open(path, "rb").read())
    data = tensor.numpy().tobytes()
    start = raw.find(data)
    assert start > 0 and raw.find(data, start + 1) < 0
    raw[start + len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def test_checkpoint_with_flipped_bytes_is_refused_by_name(common, uninterrupted, tmp_path, capsys):
    _, args = common
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    ckpt = out / "latest_checkpoint.pth"
    flip_bytes_of(ckpt, torch.load(ckpt, weights_only=True)["model"]["classifier.dense.weight"])
    before = snapshot(out)
    code, error = main_error(capsys, "--mode", "train", *args, "--output-dir", out, "--checkpoint", ckpt)
    assert code == 2 and error.startswith(f"error: {ckpt} is corrupt: its tensors do not match the checksum")
    assert snapshot(out) == before  # the refused resume rewrote nothing, train_config.json included

    best = out / "student_model.pth"
    flip_bytes_of(best, torch.load(best, weights_only=True)["state_dict"]["classifier.dense.weight"])
    code, error = main_error(capsys, "--mode", "eval", *args, "--output-dir", out, "--model", best)
    assert code == 2 and error.startswith(f"error: {best} is corrupt")


def test_pickled_weights_in_a_teacher_or_model_directory_are_refused_in_one_line(common, uninterrupted, tmp_path,
                                                                                 capsys):
    _, args = common
    marker = tmp_path / "payload-ran"
    teacher = tmp_path / "teacher"
    config = models.demo_teacher_config(RVLCDIP_LABELS)
    config.architectures = ["BeitForImageClassification"]
    config.save_pretrained(teacher)
    BeitImageProcessor(size={"height": 128, "width": 128}).save_pretrained(teacher)
    torch.save({"weight": torch.zeros(2), "evil": Payload(marker)}, teacher / "pytorch_model.bin")
    student = tmp_path / "student"
    shutil.copytree(uninterrupted / "student", student)
    os.remove(student / "model.safetensors")
    torch.save({"weight": torch.zeros(2), "evil": Payload(marker)}, student / "pytorch_model.bin")

    for argv in (["--mode", "train", "--teacher", teacher, "--output-dir", tmp_path / "out"],
                 ["--mode", "eval", "--model", student, "--output-dir", tmp_path / "eval"]):
        code, error = main_error(capsys, *args, *argv)
        assert code == 2, error
        assert "pytorch_model.bin in" in error and "was refused, nothing in it ran" in error
        assert "posix.system" in error and "model.safetensors" in error and "weights_only" not in error
    assert not marker.exists()


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
utils.atomic_write(sys.argv[1], write)
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
        utils.atomic_write(path, crash)
    assert json.load(open(path)) == {"accuracy": 0.5}

    folder = tmp_path / "student"
    utils.atomic_dir(str(folder), lambda d: open(os.path.join(d, "config.json"), "w").write("{}"))

    def crash_dir(d):
        open(os.path.join(d, "config.json"), "w").write("{")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        utils.atomic_dir(str(folder), crash_dir)
    assert open(folder / "config.json").read() == "{}"
    plots.plot_curves([{"epoch": 1, "train_loss": 1.0, "train_kd": 0.5, "train_ce": 1.5, "train_accuracy": 0.5,
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
