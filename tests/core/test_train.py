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
