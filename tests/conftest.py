import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported: before any test imports it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)
THREADS = torch.get_num_threads()  # what a fresh `python main.py` process uses


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models: one thread (here and in the runs a test starts) costs less CPU than two on a shared machine,
    and the result is the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def run_main(*args):
    """Run the real `python main.py ARGS` command, in this process (main.main with the same arguments, from the
    project's folder, with the threads a fresh process would use: OMP_NUM_THREADS, else the default), without a new
    interpreter's seconds of imports; returns it as a completed process (returncode, stdout, stderr). An exception
    that escapes main (--debug) is printed as its traceback, exit code 1, as Python would."""
    import main
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level, cwd, threads = root.handlers[:], root.level, os.getcwd(), torch.get_num_threads()
    root.handlers = []  # main's logging.basicConfig then writes to this run's stderr
    os.chdir(ROOT)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or THREADS))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main.main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors
                code = e.code
            except Exception:  # noqa: BLE001 - what the interpreter would print and exit with
                traceback.print_exc()
                code = 1
    finally:
        root.handlers, root.level = handlers, level
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["main.py", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small generated corpus on disk (2 train, 1 validation, 1 test page per class)."""
    import demo_corpus as demo
    path = tmp_path_factory.mktemp("data") / "demo"
    demo.generate_demo_dataset(str(path), train_per_class=2, val_per_class=1, test_per_class=1, seed=3)
    return str(path)


def kill_inside_second_epoch(args, out):
    """Start `main.py --mode train ARGS --output-dir OUT`, SIGKILL it once its checkpoint is inside the second
    epoch (read at any moment: writes are atomic), and return that checkpoint."""
    ckpt = out / "latest_checkpoint.pth"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--mode", "train", *map(str, args),
                             "--output-dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=True)
            if state["epoch"] == 1 and state["step_in_epoch"] > 0:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    return torch.load(ckpt, weights_only=True)


# wall-clock and peak memory, the only things allowed to differ between equal runs (the teacher cache's fill
# seconds are in epoch 1's row only of a run that filled it: not in a resumed run's, which reuses it)
TIMING = ("train_seconds", "train_docs_per_s", "peak_rss_mb", "peak_cuda_mb", "teacher_cache_seconds",
          "precision_check_seconds", "run_seconds")


def metrics(out_dir):
    """The rows of a run's student_metrics.jsonl without the wall-clock columns."""
    with open(out_dir / "student_metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def assert_same_run(reference, out):
    """Two run directories hold the same run: equal metrics rows (exactly, not just close) and, in their
    latest_checkpoint.pth, the same weight tensors; returns both checkpoints for further checks."""
    assert metrics(out) == metrics(reference)
    a, b = [torch.load(run / "latest_checkpoint.pth", weights_only=True) for run in (reference, out)]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    return a, b
