"""The training recipe: --scheduler, early stopping, --config files."""
import json

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

import recipe
from config import Config
from conftest import run_main


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
    """A tiny run that stops early: no epoch can beat the first by more than 1, so patience 1 ends it at epoch 2."""
    root = tmp_path_factory.mktemp("recipe")
    args = [*TINY, "--dataset", tiny_demo, "--cache-dir", root / "cache", "--output-dir", root / "run"]
    result = run_main("--mode", "train", *args, "--early-stopping-patience", "1", "--early-stopping-min-delta", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", args, result


def test_early_stopping_end_to_end_and_resume(stopped_run):
    out, args, result = stopped_run
    assert "stopped after epoch 2 of 3" in result.stderr
    rows = [json.loads(line) for line in open(out / "student_metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and "stop_reason" not in rows[0]
    assert rows[1]["stop_reason"].startswith("early stopping: no validation improvement")
    ckpt = torch.load(out / "latest_checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["stop_reason"] == rows[1]["stop_reason"]
    resumed = run_main("--mode", "train", *args, "--early-stopping-patience", "1", "--early-stopping-min-delta", "1",
                       "--checkpoint", out / "latest_checkpoint.pth")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "it had stopped (early stopping" in resumed.stderr and "epoch 3/3" not in resumed.stderr
    assert len(open(out / "student_metrics.jsonl").readlines()) == 2
