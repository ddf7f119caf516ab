"""Sensitivities: finite per layer on every family, and equal to direct computations."""

import math

import pytest
import torch
from torch.nn import functional as F

from optlab.core.anatomy import weight_matrix
from optlab.core.models import load_model
from optlab.errors import OptlabError
from optlab.pruning.masks import Pattern, keep_mask
from optlab.quant.quantizer import quantize_rtn
from optlab.quant.sensitivity import (
    METHODS,
    calib_nll,
    sensitivities,
    sensitivity_units,
)
from tests.conftest import random_ids

WINDOWS = list(random_ids(8, 16, seed=5).split(4))


def test_each_sensitivity_is_finite_per_layer_on_every_family(tiny) -> None:
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    units = sensitivity_units(tiny.model, "layer")
    for method in METHODS:
        scores = sensitivities(tiny.model, method, WINDOWS, units, bits=4, group_size=32)
        assert list(scores) == list(units) and len(scores) == 2
        assert all(math.isfinite(s) for s in scores.values())
        if method == "cmpq":
            assert all(0 <= s <= 1 for s in scores.values())
        if method == "tdmpq":
            assert all(s > 0 for s in scores.values())
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # scoring edits nothing
    assert all(p.grad is None and p.requires_grad for p in tiny.model.parameters())


def test_pmpq_is_the_perplexity_increase_of_pruning_that_layer_alone() -> None:
    lm = load_model("tiny:gpt2")  # Conv1D: the (out, in) view must be pruned, not the storage
    units = sensitivity_units(lm.model, "layer")
    scores = sensitivities(lm.model, "pmpq", WINDOWS, units, prune_fraction=0.3)
    base = math.exp(calib_nll(lm.model, WINDOWS))
    unit = list(units)[1]
    with torch.no_grad():
        for name in units[unit]:
            weight = weight_matrix(lm.model.get_submodule(name))
            mask = keep_mask(weight.abs().contiguous(), Pattern(0.3), "layer")
            assert (~mask).sum() == int(0.3 * weight.numel())
            weight.mul_(mask)
    assert scores[unit] == pytest.approx(math.exp(calib_nll(lm.model, WINDOWS)) - base, rel=1e-6)


def test_tdmpq_matches_finite_differences_of_the_loss() -> None:
    """g_b . delta is the directional derivative of window b's loss along delta."""
    lm = load_model("tiny:llama")
    units = sensitivity_units(lm.model, "linear")
    name = "model.layers.1.mlp.down_proj"
    windows = [random_ids(2, 24, seed=9)]
    scores = sensitivities(lm.model, "tdmpq", windows, units, bits=2, group_size=32)
    weight = lm.model.get_submodule(name).weight
    delta = quantize_rtn(weight.detach(), 2, 32).dequantize() - weight.detach()
    model64 = lm.model.double()
    derivatives = []
    for row in windows[0]:
        ids = row[None]

        def loss(step: float, ids=ids) -> float:
            with torch.no_grad():
                original = weight.data.clone()
                weight.data += step * delta.double()
                logits = model64(input_ids=ids).logits
                weight.data = original
            return F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()

        eps = 1e-2  # rotary tables stay fp32: smaller steps drown in their rounding
        derivatives.append((loss(eps) - loss(-eps)) / (2 * eps))
    mean = sum(derivatives) / len(derivatives)
    expected = abs(mean) + 0.5 * sum(d * d for d in derivatives) / len(derivatives)
    assert scores[name] == pytest.approx(expected, rel=5e-3)


def test_bad_sensitivity_requests_are_clear_errors() -> None:
    lm = load_model("tiny:opt")
    with pytest.raises(OptlabError, match="Did you mean 'pmpq'"):
        sensitivities(lm.model, "pmqp", WINDOWS, sensitivity_units(lm.model))
    with pytest.raises(OptlabError, match="layers only"):
        sensitivities(lm.model, "cmpq", WINDOWS, sensitivity_units(lm.model, "linear"))
    with pytest.raises(OptlabError, match="granularity"):
        sensitivity_units(lm.model, "block")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tdmpq_equals_the_per_linear_products_of_each_window_gradient(family) -> None:
    """Pins the TDMPQ scores to the computation as first written: per window, the gradients of
    every linear, then sum(g * delta) per linear in the (out, in) layout, summed per unit."""
    lm = load_model(f"tiny:{family}")  # gpt2: Conv1D weights are stored (in, out)
    units = sensitivity_units(lm.model, "layer")
    scores = sensitivities(lm.model, "tdmpq", WINDOWS, units, bits=3, group_size=32)
    modules = dict(lm.model.named_modules())
    names = [name for members in units.values() for name in members]
    deltas = {}
    for name in names:
        weight = weight_matrix(modules[name]).detach()
        deltas[name] = quantize_rtn(weight, 3, 32).dequantize() - weight
    weights = [modules[name].weight for name in names]
    products = []
    for ids in WINDOWS:
        for row in ids:
            logits = lm.model(input_ids=row[None]).logits.float()
            loss = F.cross_entropy(logits[0, :-1], row[1:])
            grads = torch.autograd.grad(loss, weights)
            products.append({
                name: float(((g if isinstance(modules[name], torch.nn.Linear) else g.T)
                             * deltas[name]).sum())
                for name, g in zip(names, grads, strict=True)
            })  # fmt: skip
    for unit, members in units.items():
        per_window = [sum(p[name] for name in members) for p in products]
        mean = sum(per_window) / len(per_window)
        expected = abs(mean) + 0.5 * sum(v * v for v in per_window) / len(per_window)
        # fp32 gradients of a batch and of its rows one by one are summed in different orders:
        # they differ by ~1e-5 relative on AVX2 machines (AMD EPYC), far below a wrong formula
        assert scores[unit] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_calibration_nll_through_the_scorer_equals_a_direct_cross_entropy(family) -> None:
    lm = load_model(f"tiny:{family}")
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in WINDOWS:
            logits = lm.model(input_ids=ids).logits.float()
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                     reduction="sum").item()  # fmt: skip
            count += ids[:, 1:].numel()
    assert calib_nll(lm.model, WINDOWS) == pytest.approx(total / count, rel=1e-5)
