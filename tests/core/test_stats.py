import torch

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.layerwise import run_layerwise
from optlab.core.models import load_model
from optlab.core.stats import Hessian, InputNorms, record_inputs, sweep_start
from tests.conftest import random_ids


def test_statistics_equal_direct_computations_over_several_batches() -> None:
    batches = [torch.randn(2, 5, 8), torch.randn(1, 3, 8)]
    norms, hessian = InputNorms(8), Hessian(8)
    for x in batches:
        norms.add_batch(x)
        hessian.add_batch(x)
    rows = torch.cat([x.reshape(-1, 8) for x in batches])  # 13 tokens
    torch.testing.assert_close(norms.mean_square, rows.square().mean(0))
    torch.testing.assert_close(hessian.matrix, 2 / 13 * rows.T @ rows)
    assert norms.tokens == hessian.tokens == 13


def test_record_inputs_sees_each_linear_input_in_every_family(tiny) -> None:
    ids = random_ids(2, 10)
    seen = {}

    def on_block(ctx) -> None:
        linears = Anatomy.of(tiny.model).linears(ctx.block)
        stats = {n: InputNorms(weight_matrix(m).shape[1]) for n, m in linears.items()}
        with record_inputs(linears, stats):
            ctx.run()
        seen[ctx.index] = stats
        ctx.keep_outputs()

    run_layerwise(tiny.model, [ids[:1], ids[1:]], on_block, progress=False)
    assert sorted(seen) == [0, 1]
    for stats in seen.values():
        assert all(s.tokens == 20 and s.mean_square.gt(0).any() for s in stats.values())
    # After the context closes no hook is left behind.
    block = Anatomy.of(tiny.model).blocks[0]
    assert all(not m._forward_hooks for m in block.modules())


def test_hessian_of_a_real_block_input() -> None:
    lm = load_model("tiny:llama")
    block = Anatomy.of(lm.model).blocks[0]
    q = block.self_attn.q_proj
    captured, hessian = [], Hessian(64)
    q.register_forward_hook(lambda m, a, o: captured.append(a[0].reshape(-1, 64)))
    with record_inputs({"q": q}, {"q": hessian}), torch.no_grad():
        lm.model(random_ids(1, 12))
    x = captured[0]
    torch.testing.assert_close(hessian.matrix, 2 / 12 * x.T @ x)


def test_linears_fed_the_same_input_share_one_statistic() -> None:
    """q/k/v (and gate/up) see one tensor: one Hessian, each batch added once, still exact."""
    lm = load_model("tiny:llama")
    block = Anatomy.of(lm.model).blocks[0]
    linears = Anatomy.of(lm.model).linears(block)
    stats = {n: Hessian(weight_matrix(m).shape[1]) for n, m in linears.items()}
    captured = {n: [] for n in linears}
    for name, module in linears.items():
        module.register_forward_hook(lambda m, a, o, n=name: captured[n].append(a[0].detach()))
    with record_inputs(linears, stats), torch.no_grad():
        for ids in (random_ids(1, 12), random_ids(2, 7)):
            lm.model(ids)
    q, k, v = (stats[f"self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v and stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert len({id(s) for s in stats.values()}) == 4  # q/k/v, o, gate/up, down
    for name, stat in stats.items():
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in captured[name]])
        assert stat.tokens == rows.shape[0] == 26
        torch.testing.assert_close(stat.matrix, 2 / 26 * rows.T @ rows)


def test_sweep_start_zeroes_dead_columns_and_leaves_its_arguments_alone() -> None:
    """An input that was always zero: its column is zeroed and H stays invertible."""
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    x[:, 2] = 0
    hessian = Hessian(6)
    hessian.add_batch(x)
    weight = torch.randn(4, 6, dtype=torch.bfloat16)
    H, W0 = hessian.matrix.clone(), weight.clone()
    W, Hinv = sweep_start(weight, hessian.matrix, 0.01)
    assert W.dtype == Hinv.dtype == torch.float32
    live = [0, 1, 3, 4, 5]
    assert (W[:, 2] == 0).all() and torch.equal(W[:, live], W0.float()[:, live])
    assert torch.isfinite(Hinv).all() and torch.equal(Hinv, Hinv.triu())
    assert torch.equal(hessian.matrix, H) and torch.equal(weight, W0)
