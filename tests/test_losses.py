"""DistillationLoss against an independent, written-out formula."""
import math

import numpy as np
import pytest
import torch

from losses import IGNORE_INDEX, DistillationLoss


def reference(student, teacher, labels, T, alpha):
    """alpha*T^2*mean_i sum_c p_t log(p_t/p_s) + (1-alpha)*mean_i -log softmax(s)_y, in float64 numpy."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    keep = np.asarray(labels) != IGNORE_INDEX
    s, t, y = s[keep], t[keep], np.asarray(labels)[keep]

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_s, p_t = softmax(s / T), softmax(t / T)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1).mean()
    ce = -np.log(softmax(s)[np.arange(len(y)), y]).mean()
    return alpha * T * T * kl + (1 - alpha) * ce, T * T * kl, ce


def test_hand_computed_two_class_value():
    # student logits (0, 0) -> p_s = (.5, .5); teacher (ln 3, 0) at T=1 -> p_t = (.75, .25)
    loss = DistillationLoss(temperature=1.0, alpha=0.5)
    out = loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0]))
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert out["kd"].item() == pytest.approx(kl, rel=1e-6)
    assert out["ce"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert out["total"].item() == pytest.approx(0.5 * kl + 0.5 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
def test_matches_reference(alpha, T):
    g = torch.Generator().manual_seed(int(alpha * 10 + T))
    s, t = torch.randn(8, 16, generator=g) * 3, torch.randn(8, 16, generator=g) * 3
    y = torch.randint(0, 16, (8,), generator=g)
    out = DistillationLoss(T, alpha)(s, t, y)
    total, kd, ce = reference(s.numpy(), t.numpy(), y.numpy(), T, alpha)
    assert out["total"].item() == pytest.approx(total, rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy_and_ignores_teacher():
    s, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    a = DistillationLoss(4.0, 0.0)(s, torch.randn(4, 5), y)["total"]
    b = DistillationLoss(4.0, 0.0)(s, None, y)["total"]
    assert a.item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item(), rel=1e-6)
    assert a.item() == pytest.approx(b.item())


def test_alpha_one_is_pure_kd_and_zero_when_student_equals_teacher():
    s = torch.randn(4, 5)
    out = DistillationLoss(4.0, 1.0)(s, s.clone(), torch.tensor([0, 1, 2, 3]))
    assert out["total"].item() == pytest.approx(0.0, abs=1e-6)


def test_temperature_squared_scaling_keeps_gradient_scale():
    # For large T the KD gradient w.r.t. student logits ~ (p_s - p_t)/T * T^2 / T ~ (s - t)/(C T^0): finite, not 1/T^2
    s = torch.randn(16, 10, requires_grad=True)
    t = torch.randn(16, 10)
    norms = []
    for T in (5.0, 50.0):
        s.grad = None
        DistillationLoss(T, 1.0)(s, t, torch.zeros(16, dtype=torch.long))["total"].backward()
        norms.append(s.grad.norm().item())
    assert norms[1] == pytest.approx(norms[0], rel=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 16, generator=g) * 5, torch.randn(8, 16, generator=g) * 5
    y = torch.randint(0, 16, (8,), generator=g)
    low = DistillationLoss(4.0, 0.7)(s.to(dtype), t.to(dtype), y)
    assert low["total"].dtype == torch.float32
    total, _, _ = reference(s.to(dtype).float().numpy(), t.to(dtype).float().numpy(), y.numpy(), 4.0, 0.7)
    assert low["total"].item() == pytest.approx(total, rel=1e-5)


def test_token_level_masks_ignored_positions():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 6, 7, generator=g), torch.randn(2, 6, 7, generator=g)
    y = torch.randint(0, 7, (2, 6), generator=g)
    y[0, 4:] = IGNORE_INDEX
    y[1, 0] = IGNORE_INDEX
    out = DistillationLoss(2.0, 0.6)(s, t, y)
    total, kd, ce = reference(s.reshape(-1, 7).numpy(), t.reshape(-1, 7).numpy(), y.reshape(-1).numpy(), 2.0, 0.6)
    assert out["total"].item() == pytest.approx(total, rel=1e-5)
    # garbage in ignored positions must not change anything
    s2 = s.clone()
    s2[0, 4:] = 1e4
    assert DistillationLoss(2.0, 0.6)(s2, t, y)["total"].item() == pytest.approx(out["total"].item(), rel=1e-6)


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=-1.0), dict(alpha=1.5), dict(alpha=-0.1)])
def test_invalid_hyper_parameters_rejected(kw):
    with pytest.raises(ValueError):
        DistillationLoss(**{"temperature": 4.0, "alpha": 0.5, **kw})


@pytest.mark.parametrize("teacher", [True, False])
def test_batch_without_scored_positions_gives_zero_not_nan(teacher):
    # e.g. a batch of forms without words: every label is IGNORE_INDEX
    s = torch.randn(2, 3, 7, requires_grad=True)
    y = torch.full((2, 3), IGNORE_INDEX)
    out = DistillationLoss(2.0, 0.5)(s, torch.randn(2, 3, 7) if teacher else None, y)
    assert [out[k].item() for k in ("total", "kd", "ce")] == [0.0, 0.0, 0.0]
    out["total"].backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
