"""Whole-model quantization on tiny models of every family: real replacement, reload."""

import pytest
import torch

from optlab.core.anatomy import weight_matrix
from optlab.core.models import load_model
from optlab.pruning.masks import pruned_linears
from optlab.quant.apply import quantize_gptq_model, quantize_rtn_model, round_rest
from optlab.quant.embedding import QuantEmbedding, quantize_embeddings
from optlab.quant.linear import QuantLinear
from optlab.quant.quantizer import quantize_rtn
from optlab.quant.storage import MANIFEST, WEIGHTS, save_quantized
from tests.conftest import random_ids

WIDTHS = [2, 3, 4, 8, 16]


def _bitmap(model) -> dict[str, int]:
    """Every width somewhere, so each packing and the fp16 path are exercised."""
    return {name: WIDTHS[i % len(WIDTHS)] for i, name in enumerate(pruned_linears(model))}


def _check_replaced_and_on_grid(model, bitmap, original) -> None:
    modules = dict(model.named_modules())
    for name, bits in bitmap.items():
        module = modules[name]  # reached through the real module tree, not a root attribute
        if bits == 16:
            assert not isinstance(module, QuantLinear)
            continue
        assert isinstance(module, QuantLinear) and module.bits == bits
        w_hat = module.dequantized_weight()
        assert w_hat.shape == original[name].shape
        assert not torch.equal(w_hat, original[name])
        for start in range(0, w_hat.shape[1], module.group_size):
            group = w_hat[:, start : start + module.group_size]
            distinct = torch.tensor([row.unique().numel() for row in group])
            assert (distinct <= 2**bits).all()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_model_is_really_quantized_and_reloads_identically(tiny, tmp_path, act_order) -> None:
    original = {n: weight_matrix(m).clone() for n, m in pruned_linears(tiny.model).items()}
    fp16_bytes = 2 * sum(p.numel() for p in tiny.model.parameters())
    bitmap = _bitmap(tiny.model)
    quantize_gptq_model(tiny.model, bitmap, [random_ids(4, 24, seed=1)], 32, act_order=act_order,
                        progress=False)  # fmt: skip
    round_rest(tiny.model)
    _check_replaced_and_on_grid(tiny.model, bitmap, original)
    ids = random_ids(2, 24)
    expected = tiny.model(ids).logits
    save_quantized(tiny, tmp_path / "model", bitmap, 32)
    assert (tmp_path / "model" / MANIFEST).exists()
    reloaded = load_model(str(tmp_path))  # a run directory: its model/ folder
    assert torch.equal(reloaded.model(ids).logits, expected)
    packed = {n for n, m in reloaded.model.named_modules() if isinstance(m, QuantLinear)}
    assert packed == {n for n, b in bitmap.items() if b < 16}
    assert (tmp_path / "model" / WEIGHTS).stat().st_size < fp16_bytes


def test_packed_embeddings_and_head_reload_identically(tiny, tmp_path) -> None:
    original = {n: weight_matrix(m).clone() for n, m in pruned_linears(tiny.model).items()}
    embed = tiny.model.get_input_embeddings()
    table = embed.weight.detach().clone()
    scale = getattr(embed, "embed_scale", 1.0)
    bitmap = dict.fromkeys(original, 4)
    quantize_rtn_model(tiny.model, bitmap, 32)
    _check_replaced_and_on_grid(tiny.model, bitmap, original)
    info = quantize_embeddings(tiny.model, 3, 32)
    round_rest(tiny.model)
    new = tiny.model.get_input_embeddings()
    assert isinstance(new, QuantEmbedding)
    rows = new(torch.arange(table.shape[0])) / scale  # Gemma scales its embeddings
    assert not torch.equal(rows, table)
    assert torch.allclose(rows, quantize_rtn(table, 3, 32).dequantize(), atol=1e-5)
    head = tiny.model.get_output_embeddings()
    assert isinstance(head, QuantLinear)
    assert (head.packed.data_ptr() == new.packed.data_ptr()) == info["tied"]
    ids = random_ids(2, 24)
    expected = tiny.model(ids).logits
    save_quantized(tiny, tmp_path / "model", bitmap, 32, embeddings=info)
    reloaded = load_model(str(tmp_path / "model"))
    assert torch.equal(reloaded.model(ids).logits, expected)


# A process that imports only core: the quantized loader must come in through core's hook.
_RELOAD = """
import sys, torch
from optlab.core.models import load_model
lm = load_model(sys.argv[1])
packed = sorted(n for n, m in lm.model.named_modules() if type(m).__name__ == "QuantLinear")
print(",".join(packed))
torch.save(lm.model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def test_a_quantize_run_reloads_in_a_fresh_process(tmp_path) -> None:
    import subprocess
    import sys

    from optlab.api import quantize
    from optlab.core.calibration import Calibration
    from optlab.quant.quantize import RTNConfig, UniformConfig

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"sentence {i} about packed weights." for i in range(200)))
    lm = load_model("tiny:llama")
    quantize(lm, UniformConfig(uniform=4), quantizer=RTNConfig(group_size=32),
             calib=Calibration(corpus=str(calib), n=4, seq_len=32, batch_size=4),
             out=tmp_path / "run", progress=False)  # fmt: skip
    ids = random_ids(2, 16)
    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(tmp_path / "run"), str(tmp_path / "ids.pt"),
         str(tmp_path / "logits.pt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    packed = {n for n, m in lm.model.named_modules() if isinstance(m, QuantLinear)}
    assert packed and done.stdout.split()[-1].split(",") == sorted(packed)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), lm.model(ids).logits)
