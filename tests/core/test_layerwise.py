import copy

import pytest
import torch

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.layerwise import run_layerwise
from optlab.core.models import load_model
from tests.conftest import random_ids

# Longer than the tiny Gemma's sliding window (8), so its per-block masks matter.
IDS = random_ids(3, 24)


def _logits(model, hidden):
    anatomy = Anatomy.of(model)
    return torch.cat([anatomy.logits(h) for h in hidden])


def test_runner_without_edits_reproduces_the_forward_pass(tiny) -> None:
    hidden = run_layerwise(tiny.model, [IDS[:2], IDS[2:]], progress=False)
    with torch.no_grad():
        expected = tiny.model(IDS).logits
    assert (_logits(tiny.model, hidden) - expected).abs().max() < 1e-4


def test_runner_edits_propagate_like_an_edited_model(tiny) -> None:
    reference = copy.deepcopy(tiny.model)
    ref_anatomy = Anatomy.of(reference)
    name = list(ref_anatomy.linears(ref_anatomy.blocks[0]))[-1]  # the MLP's output
    for block in ref_anatomy.blocks:
        weight_matrix(ref_anatomy.linears(block)[name]).zero_()

    seen = []

    def zero_one_linear(ctx) -> None:
        ctx.run()  # a statistics pass before the edit, as pruning does
        seen.append(ctx.index)
        weight_matrix(Anatomy.of(tiny.model).linears(ctx.block)[name]).zero_()

    hidden = run_layerwise(tiny.model, [IDS], zero_one_linear, progress=False)
    with torch.no_grad():
        expected = reference(IDS).logits
        unedited = load_model(f"tiny:{_spec(tiny)}").model(IDS).logits
    assert seen == [0, 1]
    assert (_logits(tiny.model, hidden) - expected).abs().max() < 1e-4
    assert (expected - unedited).abs().max() > 1e-3  # the edit really changes the output


def _spec(lm) -> str:
    return lm.spec.removeprefix("tiny:")


def test_hooks_see_every_batch_and_keep_outputs_skips_the_rerun() -> None:
    lm = load_model("tiny:llama")
    batches = [IDS[:1], IDS[1:]]
    calls = []

    def count(ctx) -> None:
        handle = ctx.block.register_forward_hook(lambda *_: calls.append(ctx.index))
        ctx.run()
        handle.remove()
        ctx.keep_outputs()

    hidden = run_layerwise(lm.model, batches, count, progress=False)
    assert calls == [0, 0, 1, 1]
    with torch.no_grad():
        expected = lm.model(IDS).logits
    assert (_logits(lm.model, hidden) - expected).abs().max() < 1e-4


def test_capture_restores_the_blocks_forward() -> None:
    lm = load_model("tiny:gpt2")
    run_layerwise(lm.model, [IDS], progress=False)
    for block in Anatomy.of(lm.model).blocks:
        assert "forward" not in vars(block)


def test_gemma_blocks_receive_their_own_masks() -> None:
    """Sliding and full attention blocks get different masks: capturing only block 0's
    arguments (as the official pruning scripts do) would be wrong for Gemma 3."""
    lm = load_model("tiny:gemma3_text")
    kwargs = []
    run_layerwise(lm.model, [IDS], lambda ctx: kwargs.append(ctx.kwargs[0]), progress=False)
    sliding, full = kwargs
    assert sliding["attention_mask"] is not None  # a banded mask; full attention may use None
    assert full["attention_mask"] is None or not torch.equal(
        sliding["attention_mask"], full["attention_mask"]
    )
    # Local and global RoPE use different bases.
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])


def test_no_batches_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one batch"):
        run_layerwise(load_model("tiny:opt").model, [], progress=False)
