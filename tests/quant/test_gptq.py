"""GPTQ against a slow float64 reference of the optimal-brain-quantization sweep.

The reference rounds one column at a time and keeps the inverse Hessian of the columns not
yet rounded explicitly (eliminating each rounded column from it), the formulation GPTQ's
Cholesky rows and lazy block updates are an exact rewrite of. So any error in the blocked
sweep, the group grids, the damping, the dead columns or the act-order permutation shows up
as different codes.
"""

import pytest
import torch

from optlab.core.stats import Hessian
from optlab.quant.gptq import act_order_permutation, gptq_quantize
from optlab.quant.quantizer import grid, quantize_codes, quantize_rtn


def _correlated(seed: int, rows: int = 6, cols: int = 48, tokens: int = 300, dead: int = -1):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=g) @ mixing) * torch.logspace(-1, 1, cols)
    if dead >= 0:
        x[:, dead] = 0  # an input that never fires: its column must come out zero
    hessian = Hessian(cols)
    hessian.add_batch(x)
    return weight, x, hessian.matrix


def reference_gptq(weight, hessian, bits, group, *, damp=0.01, act_order=False):
    """Codes and scales of the column-by-column sweep in float64 (no blocks, no Cholesky)."""
    W, H = weight.double().clone(), hessian.double().clone()
    rows, cols = W.shape
    size = group or cols
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = -(-cols // size)
    fixed = [grid(W[:, g * size : (g + 1) * size].float(), bits) for g in range(groups)]
    order = act_order_permutation(hessian) if act_order else torch.arange(cols)
    W, H = W[:, order], H[order][:, order]
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros(rows, cols)
    scales, zeros = torch.zeros(rows, groups), torch.zeros(rows, groups)
    for j in range(cols):
        g = int(order[j]) // size
        if act_order and group:  # static grids: contiguous groups of the original order
            scale, zero = fixed[g]
        elif j % size == 0:  # the group's grid from its weights as updated so far
            scale, zero = grid(W[:, j : j + size].float(), bits)
        scales[:, g], zeros[:, g] = scale, zero
        q = quantize_codes(W[:, j : j + 1].float(), scale, zero, bits)[:, 0]
        error = (W[:, j] - (q - zero).double() * scale.double()) / Hinv[j, j]
        W[:, j:] -= error[:, None] * Hinv[j, j:][None, :]  # the OBS update of the rest
        Hinv -= Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]  # drop column j
        codes[:, j] = q
    return codes[:, torch.argsort(order)], scales, zeros


@pytest.mark.parametrize(
    ("bits", "group", "block", "act_order", "dead"),
    [(4, 16, 16, False, -1), (3, None, 16, False, 5), (4, 12, 16, False, -1),
     (2, 16, 48, False, -1), (4, 16, 16, True, 7), (3, None, 32, True, -1)],
)  # fmt: skip
def test_gptq_equals_the_column_by_column_reference(bits, group, block, act_order, dead) -> None:
    """Groups of 12 in blocks of 16 start inside a block and end in the next one: their grid
    needs the block's pending lazy update applied to the columns beyond it."""
    weight, _, hessian = _correlated(bits + 10 * act_order, dead=dead)
    ours = gptq_quantize(weight, hessian, bits, group, block_size=block, act_order=act_order)
    codes, scales, zeros = reference_gptq(weight, hessian, bits, group, act_order=act_order)
    assert torch.equal(ours.codes.float(), codes)
    assert torch.equal(ours.scales, scales) and torch.equal(ours.zeros.float(), zeros)
    if dead >= 0:
        assert (ours.dequantize()[:, dead] == 0).all()
    if group and not act_order:  # later groups' grids come from the updated weights
        rtn = quantize_rtn(weight, bits, group)
        assert not torch.equal(ours.scales[:, 1:], rtn.scales[:, 1:])


@pytest.mark.parametrize(("bits", "group"), [(4, 16), (3, None), (4, None)])
def test_act_order_lowers_the_error_below_rtn(bits, group) -> None:
    weight, x, hessian = _correlated(bits)
    error = lambda w: (x @ (w - weight).T).square().sum()  # noqa: E731
    rtn = error(quantize_rtn(weight, bits, group).dequantize())
    plain = error(gptq_quantize(weight, hessian, bits, group).dequantize())
    act = error(gptq_quantize(weight, hessian, bits, group, act_order=True).dequantize())
    assert act < rtn and plain < rtn


def test_act_order_restores_the_column_order() -> None:
    """With uncorrelated inputs there is nothing to compensate: in any order GPTQ is plain
    rounding, so act-order must hand the codes back in the original column order."""
    weight = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    hessian = torch.diag(torch.linspace(0.1, 4.0, 40).flip(0).roll(13))
    assert not torch.equal(act_order_permutation(hessian), torch.arange(40))
    for group in (None, 8):
        ours = gptq_quantize(weight, hessian, 3, group, damp=0.0, act_order=True)
        rtn = quantize_rtn(weight, 3, group)
        assert torch.equal(ours.codes, rtn.codes) and torch.equal(ours.scales, rtn.scales)
