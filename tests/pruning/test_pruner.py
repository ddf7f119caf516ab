import pytest
import torch

from optlab.core.anatomy import weight_matrix
from optlab.core.calibration import Calibration
from optlab.core.config import METHODS
from optlab.core.models import load_model
from optlab.core.stats import Hessian, InputNorms, inverse_hessian_factor
from optlab.errors import OptlabError
from optlab.pruning.masks import Pattern, check_nm, keep_mask, pruned_linears, sparsity_report
from optlab.pruning.pruner import MagnitudeConfig, SparseGPTConfig, WandaConfig, prune
from optlab.pruning.sparsegpt import sparsegpt_prune

ROWS, COLS, TOKENS = 16, 64, 512


def _layer(seed: int = 0):
    """A weight and inputs with correlated, unevenly scaled features, as real activations are."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(ROWS, COLS, generator=g)
    mixing = torch.randn(COLS, COLS, generator=g) / COLS**0.5 + torch.eye(COLS)
    scales = torch.logspace(-1, 1, COLS)[torch.randperm(COLS, generator=g)]
    x = (torch.randn(TOKENS, COLS, generator=g) @ mixing) * scales
    return weight, x


def _stats(x):
    norms, hessian = InputNorms(COLS), Hessian(COLS)
    norms.add_batch(x)
    hessian.add_batch(x)
    return norms, hessian


def test_wanda_mask_is_weight_times_input_norm_per_row() -> None:
    weight, x = _layer()
    norms, _ = _stats(x)
    keep = keep_mask(weight.abs() * norms.mean_square.sqrt(), Pattern(0.5))
    direct = weight.abs() * (x.square().sum(0) / TOKENS).sqrt()  # |W_ij| * ||X_j|| / sqrt(N)
    for row, kept in zip(direct, keep, strict=True):
        assert set(row.argsort()[: COLS // 2].tolist()) == set((~kept).nonzero().flatten().tolist())


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse() -> None:
    _, hessian = _stats(_layer()[1])
    damped = hessian.matrix.double() + 0.01 * hessian.matrix.diagonal().mean() * torch.eye(COLS)
    factor = inverse_hessian_factor(hessian.matrix, 0.01)
    assert torch.equal(factor, factor.triu()) and (factor.diagonal() > 0).all()
    torch.testing.assert_close(
        factor.double().T @ factor.double(), damped.inverse(), rtol=1e-4, atol=1e-6
    )


def test_inverse_hessian_factor_damps_more_when_cholesky_fails(caplog) -> None:
    singular = -torch.ones(COLS, COLS)  # negative definite: only heavy damping makes it PD
    singular.diagonal().fill_(COLS / 2)
    factor = inverse_hessian_factor(singular, 0.01)
    assert torch.isfinite(factor).all() and "needed damping" in caplog.text


def test_sparsegpt_at_zero_sparsity_leaves_the_weight_unchanged() -> None:
    weight, x = _layer()
    _, hessian = _stats(x)
    assert torch.equal(sparsegpt_prune(weight, hessian.matrix, Pattern(0.0)), weight)


@pytest.mark.parametrize("pattern", [Pattern(0.5), Pattern(0.5, 2, 4)])
def test_sparsegpt_beats_magnitude_and_wanda_on_layer_output_error(pattern) -> None:
    weight, x = _layer(1)
    norms, hessian = _stats(x)
    magnitude = weight * keep_mask(weight.abs(), pattern)
    wanda = weight * keep_mask(weight.abs() * norms.mean_square.sqrt(), pattern)
    sparse = sparsegpt_prune(weight, hessian.matrix, pattern, block_size=16)

    def error(w):
        return (x @ w.T - x @ weight.T).square().mean().item()

    assert (sparse == 0).float().mean() == 0.5
    assert error(sparse) < error(wanda) < error(magnitude)
    if pattern.structured:
        assert check_nm(sparse, 2, 4)


def test_sparsegpt_lazy_block_updates_equal_one_big_block() -> None:
    """N:M masks do not depend on the block size, so blocks only reorder the same updates."""
    weight, x = _layer(2)
    _, hessian = _stats(x)
    small = sparsegpt_prune(weight, hessian.matrix, Pattern(0.5, 2, 4), block_size=8)
    whole = sparsegpt_prune(weight, hessian.matrix, Pattern(0.5, 2, 4), block_size=COLS)
    torch.testing.assert_close(small, whole, atol=1e-4, rtol=1e-4)


def test_sparsegpt_handles_dead_inputs() -> None:
    weight, x = _layer(3)
    x[:, 5] = 0
    _, hessian = _stats(x)
    pruned = sparsegpt_prune(weight, hessian.matrix, Pattern(0.5))
    assert (pruned[:, 5] == 0).all() and torch.isfinite(pruned).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_family_is_pruned_exactly(tiny, method, pattern) -> None:
    config = {
        "magnitude": MagnitudeConfig(pattern=pattern),
        "wanda": WandaConfig(pattern=pattern),
        "sparsegpt": SparseGPTConfig(pattern=pattern, block_size=32),
    }[method]
    calib = Calibration(corpus="book", n=4, seq_len=32).windows(tiny.tokenizer, 32, seed=0)
    result = prune(tiny, config, calib, progress=False)
    assert result["sparsity"]["total"] == 0.5
    for name, module in pruned_linears(tiny.model).items():
        weight = weight_matrix(module)
        if pattern == "2:4":
            assert check_nm(weight, 2, 4), name
        else:
            assert ((weight == 0).sum(1) == weight.shape[1] // 2).all() or method == "sparsegpt"
        assert result["sparsity"]["per_layer"][name] == 0.5
    with torch.no_grad():
        assert torch.isfinite(tiny.model(torch.tensor([[1, 2, 3, 4]])).logits).all()


@pytest.mark.parametrize("family", ["opt", "gpt2"])  # gpt2: Conv1D, a transposed view
def test_layer_group_and_report(family) -> None:
    from optlab.core.models import load_model

    lm = load_model(f"tiny:{family}")
    prune(lm, MagnitudeConfig(sparsity=0.3, group="layer"), progress=False)
    report = sparsity_report(lm.model)
    for name, module in pruned_linears(lm.model).items():
        assert report["per_layer"][name] == int(weight_matrix(module).numel() * 0.3) / (
            weight_matrix(module).numel()
        )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: METHODS.get("prune", "wandaa"), "Did you mean 'wanda'"),
        (lambda: WandaConfig(sparsity=1.5), "sparsity must be in"),
        (lambda: SparseGPTConfig(pattern="2:4", sparsity=0.7), "means sparsity 0.5"),
        (lambda: MagnitudeConfig(group="column"), "use row or layer"),
        (lambda: SparseGPTConfig(damp=1.0), "damp must be in"),
        (lambda: SparseGPTConfig(block_size=0), "block_size must be a whole number"),
        (lambda: Calibration(n=0), "n must be a whole number"),
        (
            lambda: Calibration(corpus="wiki:calibb").windows(
                load_model("tiny:llama").tokenizer, 32, 0
            ),
            "Did you mean 'wiki:calib'",
        ),
        (lambda: prune(load_model("tiny:llama"), WandaConfig()), "wanda needs calibration"),
        (lambda: prune(load_model("tiny:llama"), Calibration()), "not a prune config"),
    ],
)
def test_bad_configs_are_refused_at_once(make, message) -> None:
    with pytest.raises(OptlabError, match=message):
        make()


def test_cli_prunes_saves_masks_and_reloads(tmp_path, capsys) -> None:
    import json

    from safetensors.torch import load_file

    from optlab.cli import main
    from optlab.core.models import load_model

    out = tmp_path / "run"
    args = [
        "prune",
        "tiny:llama",
        "--method",
        "wanda",
        "--pattern",
        "2:4",
        "--calib",
        "book",
        "--n-calib",
        "4",
        "--seq-len",
        "32",
        "--eval-limit",
        "2",
        "--out",
        str(out),
        "--json",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sparsity"]["total"] == 0.5 and result["perplexity"]["windows"] == 2
    assert result["peak_rss_gb"] > 0
    masks = load_file(out / "masks.safetensors")
    reloaded = load_model(str(out))
    for name, module in pruned_linears(reloaded.model).items():
        assert torch.equal(weight_matrix(module) != 0, masks[name])
        assert check_nm(weight_matrix(module), 2, 4)
    # The run exists now: a second prune into it is refused before any work.
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err
