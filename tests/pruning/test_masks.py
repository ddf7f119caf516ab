import pytest
import torch

from optlab.errors import OptlabError
from optlab.pruning.masks import Pattern, check_nm, keep_mask


def test_row_masks_prune_exactly_the_lowest_of_each_row() -> None:
    scores = torch.rand(7, 20, generator=torch.Generator().manual_seed(0))
    keep = keep_mask(scores, Pattern(0.35))
    k = int(20 * 0.35)
    assert ((~keep).sum(1) == k).all()
    for row, kept in zip(scores, keep, strict=True):
        assert set(row.argsort()[:k].tolist()) == set((~kept).nonzero().flatten().tolist())


def test_layer_masks_and_ties_keep_the_count_exact() -> None:
    scores = torch.zeros(4, 10)  # all tied: a `<=` threshold would prune everything
    keep = keep_mask(scores, Pattern(0.5), group="layer")
    assert (~keep).sum() == 20
    keep = keep_mask(torch.ones(3, 8), Pattern(0.5))
    assert ((~keep).sum(1) == 4).all()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_n_m_masks_zero_the_n_lowest_of_every_group(n, m) -> None:
    scores = torch.rand(5, 32, generator=torch.Generator().manual_seed(1))
    keep = keep_mask(scores, Pattern(n / m, n, m))
    groups = scores.reshape(5, -1, m)
    expected = groups.argsort(-1)[..., :n]
    pruned = (~keep).reshape(5, -1, m)
    assert (pruned.sum(-1) == n).all()
    assert torch.equal(pruned.gather(-1, expected), torch.ones_like(expected, dtype=torch.bool))
    assert check_nm(scores * keep, n, m)


def test_pattern_parsing() -> None:
    assert Pattern.parse("2:4", None) == Pattern(0.5, 2, 4)
    assert Pattern.parse("unstructured", None).sparsity == 0.5
    for bad, sparsity, message in [
        ("3:2", None, "0 < N < M"),
        ("2-4", None, "bad pattern"),
        ("2:4", 0.6, "means sparsity 0.5"),
        ("unstructured", 1.0, r"sparsity must be in \[0, 1\)"),
    ]:
        with pytest.raises(OptlabError, match=message):
            Pattern.parse(bad, sparsity)
    with pytest.raises(OptlabError, match="groups of 4"):
        keep_mask(torch.rand(2, 6), Pattern(0.5, 2, 4))
