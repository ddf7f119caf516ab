"""The shared training loop's set-up."""

from __future__ import annotations

import accelerate
import pytest
import torch

from optlab.core.train import make_accelerator


@pytest.mark.parametrize(("device", "cpu"), [("cpu", True), ("cuda", False), (None, False)])
def test_the_accelerator_follows_the_models_device(monkeypatch, device, cpu) -> None:
    """A model the user put on the CPU must train there even on a GPU machine."""
    seen = {}
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: seen.update(kwargs))
    make_accelerator(3, torch.device(device) if device else None)
    assert seen == {"gradient_accumulation_steps": 3, "cpu": cpu}


@pytest.mark.parametrize("train_mode", [True, False])
def test_train_mode_false_trains_without_dropout_and_restores_the_mode(train_mode) -> None:
    from torch import nn

    from optlab.core.train import TrainConfig, train_loop

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    x = torch.ones(8, 4)
    modes = []

    def micro_loss(wrapped: nn.Module, step: int, micro: int) -> torch.Tensor:
        modes.append(wrapped.training)
        return wrapped(x).square().mean()

    result = train_loop(make_accelerator(2, torch.device("cpu")), model, micro_loss,
                        TrainConfig(steps=3, lr=1e-2, grad_accum=2), progress=False,
                        train_mode=train_mode)  # fmt: skip
    assert modes == [train_mode] * 6 and result["optimizer_steps"] == 3
    assert not model.training  # back in the mode it came in


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_the_learning_rate_schedule(schedule) -> None:
    from optlab.core.train import linear_schedule

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = linear_schedule(optimizer, 10, 0.2, schedule)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == [0.0, 0.5, 1.0]  # two warmup steps either way
    expected = [1.0] * 7 if schedule == "constant" else [(10 - s) / 8 for s in range(3, 10)]
    assert rates[3:] == pytest.approx(expected)
