"""``device_map`` loading (accelerate hooks, CPU and disk offload) and the layer-wise runner on
a dispatched model: the same pruning, statistics and outputs as on the plain model.

On a machine without GPUs, a map with "disk" entries is what dispatches (an all-"cpu" map
loads as usual, without hooks): the weights of offloaded modules wait on the meta device and
accelerate's hooks load them at each forward, from the checkpoint or the offload folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.utils import align_module_device
from safetensors.torch import load_file
from torch import nn

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.layerwise import BlockContext, run_layerwise
from optlab.core.models import LoadedModel, load_model, save_model
from optlab.core.stats import InputNorms, record_inputs
from optlab.errors import OptlabError
from optlab.pruning.masks import pruned_linears
from optlab.pruning.pruner import WandaConfig, prune
from tests.conftest import random_ids

OUTSIDE = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
           "lm_head": "cpu"}  # fmt: skip
MAPS = {
    "all on cpu": {**OUTSIDE, "model.layers.0": "cpu", "model.layers.1": "cpu"},
    "block 1 on disk": {**OUTSIDE, "model.layers.0": "cpu", "model.layers.1": "disk"},
    "all on disk": "auto",  # with max_memory too small for anything: every module offloaded
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dm") / "tiny-llama"
    save_model(load_model("tiny:llama", seed=0), path)
    return path


def dispatched(folder: Path, name: str, offload: Path) -> LoadedModel:
    device_map = MAPS[name]
    max_memory = {"cpu": 1000} if device_map == "auto" else None
    return load_model(str(folder), device_map=device_map, max_memory=max_memory,
                      offload_folder=offload)  # fmt: skip


def stored_weight(module: nn.Module) -> torch.Tensor:
    """A linear's weight as the next forward will see it (read from the offload store)."""
    if getattr(getattr(module, "_hf_hook", None), "offload", False):
        return module._hf_hook.weights_map["weight"]
    return weight_matrix(module)


def zero_quietest_inputs(anatomy: Anatomy):
    """An ``on_block`` that gathers input norms while the block runs, then zeroes the input
    column with the smallest norm in every linear: an edit driven by a statistic, which the
    next block's inputs must reflect."""

    def on_block(ctx: BlockContext) -> None:
        linears = anatomy.linears(ctx.block)
        stats = {n: InputNorms(weight_matrix(m).shape[1]) for n, m in linears.items()}
        with record_inputs(linears, stats):
            ctx.run()
        with torch.no_grad():
            for name, module in linears.items():
                weight_matrix(module)[:, stats[name].mean_square.argmin()] = 0

    return on_block


@pytest.mark.parametrize("name", list(MAPS))
def test_run_layerwise_on_a_dispatched_model_matches_the_plain_one(folder, tmp_path, name):
    checkpoint = load_file(folder / "model.safetensors")
    plain = load_model(str(folder))
    lm = dispatched(folder, name, tmp_path / "offload")
    if name != "all on cpu":  # dispatched, offloaded: the weights wait on the meta device
        assert any(p.device.type == "meta" for p in lm.model.parameters())
    batches = [random_ids(2, 16, seed=s) for s in range(2)]
    expected = run_layerwise(plain.model, batches, zero_quietest_inputs(Anatomy.of(plain.model)),
                             progress=False)  # fmt: skip
    hidden = run_layerwise(lm.model, batches, zero_quietest_inputs(Anatomy.of(lm.model)),
                           progress=False)  # fmt: skip
    for got, want in zip(hidden, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The edits outlived the pass: the offload store holds them, and a plain forward (the
    # hooks reload every offloaded weight) gives the edited model's logits.
    edited = pruned_linears(plain.model)
    for linear_name, module in pruned_linears(lm.model).items():
        torch.testing.assert_close(stored_weight(module), weight_matrix(edited[linear_name]))
    ids = random_ids(1, 12, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, plain.model(ids).logits,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    # The checkpoint the disk offload reads from is never written.
    after = load_file(folder / "model.safetensors")
    assert all(torch.equal(after[k], checkpoint[k]) for k in checkpoint)


def test_run_layerwise_writes_edits_back_to_a_cpu_offload_store(folder) -> None:
    """accelerate.cpu_offload keeps the weights in a CPU state dict (the store device_map
    fills for its "cpu" entries when a GPU computes): edits land there."""
    from accelerate import cpu_offload

    plain, lm = load_model(str(folder)), load_model(str(folder))
    cpu_offload(lm.model, execution_device=torch.device("cpu"))
    batches = [random_ids(2, 16, seed=3)]
    expected = run_layerwise(plain.model, batches, zero_quietest_inputs(Anatomy.of(plain.model)),
                             progress=False)  # fmt: skip
    hidden = run_layerwise(lm.model, batches, zero_quietest_inputs(Anatomy.of(lm.model)),
                           progress=False)  # fmt: skip
    torch.testing.assert_close(hidden[0], expected[0], atol=1e-5, rtol=1e-5)
    edited = pruned_linears(plain.model)
    for name, module in pruned_linears(lm.model).items():
        torch.testing.assert_close(stored_weight(module), weight_matrix(edited[name]))


# prune() runs on the dispatched model (run_layerwise); its closing sparsity_report brings
# each offloaded weight in from the store (an offloaded one is a meta tensor between forwards).
def test_wanda_through_prune_on_an_offloaded_block_matches_the_plain_model(folder, tmp_path):
    config, calib = WandaConfig(pattern="2:4"), random_ids(4, 32, seed=5)
    plain = load_model(str(folder))
    lm = dispatched(folder, "block 1 on disk", tmp_path / "offload")
    want = prune(plain, config, calib, batch_size=2, progress=False)
    got = prune(lm, config, calib, batch_size=2, progress=False)
    assert got["sparsity"] == want["sparsity"]
    edited = pruned_linears(plain.model)
    for name, module in pruned_linears(lm.model).items():
        with align_module_device(module):
            torch.testing.assert_close(weight_matrix(module), weight_matrix(edited[name]),
                                       msg=name)  # fmt: skip


def test_device_map_needs_a_folder(folder) -> None:
    with pytest.raises(OptlabError, match="device_map needs a model folder"):
        load_model("tiny:llama", device_map="auto")
