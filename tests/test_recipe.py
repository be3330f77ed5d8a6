"""The training recipe: --scheduler, early stopping, --config files."""
import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

import recipe
from config import Config


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
