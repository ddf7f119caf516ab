"""The GGUF legacy grids in torch equal gguf-py's reference encoder + decoder bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optlab.core.grids import GRIDS, round_like
from optlab.errors import OptlabError
from optlab.quant.gguf_types import decode, encode


def hard_rows() -> torch.Tensor:
    """Rows meant to hit the edge cases: ties at half steps, a zero block, a constant block,
    one huge outlier, negative extremes (the symmetric types take the signed extreme)."""
    torch.manual_seed(0)
    rows = [torch.randn(96) * 0.03, torch.randn(96) * 100]
    steps = torch.arange(96, dtype=torch.float32)
    rows += [steps / 2, -steps / 4 + 0.125, torch.zeros(96), torch.full((96,), 0.7)]
    outlier = torch.randn(96) * 0.01
    outlier[5] = -9.0
    rows.append(outlier)
    rows.append(torch.tensor([2.4999999, -2.5, 0.5, -0.5] * 24) / 127 * 3)
    return torch.stack(rows)


@pytest.mark.parametrize("name", GRIDS)
def test_round_like_is_gguf_pys_encode_then_decode(name) -> None:
    weights = hard_rows()
    expected = decode(encode(weights, name), name).reshape(weights.shape)
    got = round_like(weights, name)
    np.testing.assert_array_equal(got.numpy(), expected)
    assert torch.equal(round_like(got, name), got)  # on the grid it stays there


def test_round_like_refuses_what_it_cannot_round() -> None:
    with pytest.raises(OptlabError, match="blocks of 32"):
        round_like(torch.ones(2, 48), "q4_1")
    with pytest.raises(OptlabError, match="Did you mean"):
        round_like(torch.ones(2, 32), "q4_2")
