"""Multi-exit fine-tuning: the loss against a direct computation on truncated models, the last
exit as the plain forward, training that helps the early exits, the run it writes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from optlab.cli import main
from optlab.core.anatomy import Anatomy
from optlab.core.lora import adapters_of
from optlab.core.models import load_model
from optlab.early_exit.exits import exit_weights, exits_of
from optlab.early_exit.train import ExitTrainConfig, exit_agreement, exit_losses, train_exits
from tests.conftest import random_ids
from tests.hostile.conftest import error_line, run_cli, snapshot

FAMILIES = ["llama", "opt", "gpt2", "gpt_neox", "qwen2", "gemma3_text", "opt-350m"]


def truncated(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """The model cut after ``layers`` blocks: its own forward is then exit ``layers``."""
    short = copy.deepcopy(model)
    anatomy = Anatomy.of(short)
    del anatomy.blocks[layers:]
    short.config.num_hidden_layers = layers
    if getattr(short.config, "layer_types", None):
        short.config.layer_types = short.config.layer_types[:layers]
    return short


def cross_entropy_by_hand(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logprobs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -logprobs.gather(-1, ids[:, 1:, None]).mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_exit_loss_equals_a_direct_computation(family) -> None:
    model = load_model(f"tiny:{family}").model
    ids = random_ids(2, 12, vocab=model.config.vocab_size)
    exits = (1, 2)
    weights = exit_weights(exits, 2, "geometric")
    with torch.no_grad():
        expected = [cross_entropy_by_hand(truncated(model, e)(input_ids=ids).logits, ids)
                    for e in exits]  # fmt: skip
        got = exit_losses(model, ids, exits)
    torch.testing.assert_close(got.double(), torch.stack(expected), rtol=1e-5, atol=1e-5)
    total = sum(w * ce for w, ce in zip(weights, expected, strict=True))
    assert abs(float((torch.tensor(weights) * got).sum()) - float(total)) < 1e-5


def test_recomputing_exits_gives_the_same_loss_and_gradients() -> None:
    model = load_model("tiny:llama").model
    ids = random_ids(2, 16, vocab=model.config.vocab_size)
    grads = []
    for recompute in (True, False):
        model.zero_grad()
        exit_losses(model, ids, (1, 2), recompute=recompute).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})  # fmt: skip
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_the_last_exit_is_the_normal_forward(family) -> None:
    model = load_model(f"tiny:{family}").model
    ids = random_ids(2, 12, vocab=model.config.vocab_size)
    with torch.no_grad():
        (loss,) = exit_losses(model, ids, (2,))
        plain = model(input_ids=ids, labels=ids).loss
        agreement = exit_agreement(model, ids, (1, 2), progress=False)
    torch.testing.assert_close(loss, plain)
    assert agreement["2"]["agreement"] == 1.0
    logits = model(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(agreement["2"]["ce"] - ce.item()) < 1e-5


def test_training_lowers_the_loss_and_raises_early_exit_agreement() -> None:
    lm = load_model("tiny:llama")
    # Code-like windows with a skewed token distribution, so there is something to learn.
    generator = torch.Generator().manual_seed(0)
    skewed = torch.softmax(torch.arange(64.0) / 8, 0)
    windows = 100 + torch.multinomial(skewed, 24 * 32, replacement=True,
                                      generator=generator).view(24, 32)  # fmt: skip
    held_out = windows[-4:]
    before = exit_agreement(lm.model, held_out, (1, 2), progress=False)
    with torch.no_grad():
        loss_before = exit_losses(lm.model, windows[:20], (1, 2))
    config = ExitTrainConfig(exits="1", steps=8, lr=3e-3, batch_size=4, context_length=32)
    result = train_exits(lm, windows[:20], config, progress=False)
    with torch.no_grad():
        loss_after = exit_losses(lm.model, windows[:20], (1, 2))
    after = exit_agreement(lm.model, held_out, (1, 2), progress=False)
    assert result["optimizer_steps"] == 8 and len(result["losses"]) == 8
    assert result["exits"] == [1, 2] and result["weights"] == pytest.approx([0.7, 0.3])
    assert (loss_after < loss_before - 0.3).all()
    assert after["1"]["ce"] < before["1"]["ce"] - 0.3
    assert after["1"]["agreement"] > before["1"]["agreement"] + 0.1


def test_lora_trains_block_adapters_only_and_merges_them() -> None:
    lm = load_model("tiny:opt")
    embed = lm.model.get_input_embeddings().weight.clone()
    query = lm.model.model.decoder.layers[0].self_attn.q_proj.weight.clone()
    windows = random_ids(4, 16, vocab=lm.model.config.vocab_size)
    train_exits(lm, windows, ExitTrainConfig(exits="1", steps=2, lr=1e-2, batch_size=2,
                                             lora=True, rank=2), progress=False)  # fmt: skip
    assert not adapters_of(lm.model)
    assert torch.equal(lm.model.get_input_embeddings().weight, embed)  # frozen
    assert not torch.equal(lm.model.model.decoder.layers[0].self_attn.q_proj.weight, query)
    assert all(p.requires_grad for p in lm.model.parameters())  # as it was before


def _code_folder(tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    for i in range(40):
        (folder / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {i + j}\n\n"
                                                 for j in range(8)))  # fmt: skip
    return folder


def test_the_command_writes_a_run_that_reloads_in_plain_transformers(tmp_path, capsys) -> None:
    folder = _code_folder(tmp_path)
    out = tmp_path / "run"
    assert main(["exit", "train", "tiny:gpt2", "--data", f"code:{folder}", "--exits", "1",
                 "--weights", "uniform", "--steps", "2", "--batch-size", "2",
                 "--context-length", "16", "--eval-windows", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["exits"] == [1, 2] and metrics["weights"] == [0.5, 0.5]
    assert set(metrics["before"]) == set(metrics["after"]) == {"1", "2"}
    assert metrics["after"]["2"]["agreement"] == 1.0
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.early_exit["exits"] == [1, 2]
    assert exits_of(out) == (1, 2) and exits_of(load_model(str(out))) == (1, 2)
    assert "exits: 1,2" in (out / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("args", "needles"),
    [(["--exits", "3"], ["exit layer 3 is outside the model", "1..2"]),
     (["--exits", "0,1"], ["exit layer 0"]),
     (["--exits", "a,b"], ["--exits 'a,b'"]),
     (["--data", "code:EMPTY"], ["holds no code"]),
     (["--data", "code:EMPTY", "--extensions", ".md"], ["test split", "--eval-windows 0"]),
     (["--context-length", "100000"], ["--context-length 100000 exceeds"])],
)  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needles) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("# nothing to train on\n")
    args = [a.replace("EMPTY", str(empty)) for a in args]
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "exit", "train", "tiny:llama", *args, "--steps", "1",
                             "--out", tmp_path / "o")  # fmt: skip
    error_line(code, err, *needles)
    assert out == "" and snapshot(tmp_path) == before
