"""The shared loop under unlearning: exact budgets, a stop that fires, LoRA merged on q/v."""

from __future__ import annotations

import copy

import pytest
import torch

from optlab.core.lora import adapters_of
from optlab.core.models import load_model
from optlab.errors import OptlabError
from optlab.eval.scorer import Scorer
from optlab.unlearning.data import Example
from optlab.unlearning.metrics import qa_accuracy
from optlab.unlearning.scenarios import facts_scenario, known_facts
from optlab.unlearning.trainer import UnlearnConfig, trained_names, unlearn
from tests.unlearning.conftest import capital_questions

FORGET = [Example("Paris", "What is the capital of France?"), Example("Rome", "Capital of Italy?")]
RETAIN = [Example("Berlin", "What is the capital of Germany?"), Example("Oslo", "Norway?")]


@pytest.mark.parametrize("method", ["ga", "ga_kl_rand", "graddiff", "npo", "retain_only"])
def test_every_method_takes_exactly_its_steps(method) -> None:
    lm = load_model("tiny:llama", seed=0)
    config = UnlearnConfig(method=method, steps=3, lr=1e-4, grad_accum=2, random_answers=2)
    result = unlearn(lm, FORGET, RETAIN, config, progress=False)
    assert result.metrics["optimizer_steps"] == 3 and len(result.metrics["losses"]) == 3
    assert not result.metrics["stopped_early"]


def test_gradient_ascent_raises_the_forget_loss() -> None:
    lm = load_model("tiny:gpt2", seed=0)  # another family, another head layout
    result = unlearn(lm, FORGET, None, UnlearnConfig(method="ga", steps=5, lr=1e-3),
                     progress=False)  # fmt: skip
    losses = result.metrics["losses"]  # the loss is -CE: it must fall
    assert losses[-1] < losses[0]


def test_the_stop_on_forget_loss_fires() -> None:
    lm = load_model("tiny:llama", seed=0)
    config = UnlearnConfig(method="ga", steps=50, lr=1e-3, stop_forget_ce=0.0)
    result = unlearn(lm, FORGET, None, config, progress=False)
    assert result.metrics["optimizer_steps"] == 1 and result.metrics["stopped_early"]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gpt_neox"])
def test_lora_changes_only_the_query_value_weights_and_is_merged(family) -> None:
    lm = load_model(f"tiny:{family}", seed=0)
    before = copy.deepcopy(lm.model.state_dict())
    config = UnlearnConfig(method="graddiff", steps=3, lr=1e-2, lora=True)
    result = unlearn(lm, FORGET, RETAIN, config, progress=False)
    assert not adapters_of(lm.model)
    after = lm.model.state_dict()
    assert set(after) == set(before)  # plain HF modules again
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed and changed <= set(result.trained)
    assert result.trained == trained_names(lm.model, lora=True)
    assert all(p.requires_grad for p in lm.model.parameters())  # left as found


def test_nan_loss_names_the_step() -> None:
    lm = load_model("tiny:llama", seed=0)
    with torch.no_grad():
        next(lm.model.parameters()).fill_(float("nan"))
    with pytest.raises(OptlabError, match="nan at step 1"):
        unlearn(lm, FORGET, None, UnlearnConfig(method="ga", steps=2), progress=False)


def test_config_and_data_errors() -> None:
    with pytest.raises(OptlabError, match="Did you mean 'graddiff'"):
        UnlearnConfig(method="gradiff")
    with pytest.raises(OptlabError, match="steps"):
        UnlearnConfig(steps=0)
    with pytest.raises(OptlabError, match="retain_weight"):
        UnlearnConfig(retain_weight=-1.0)
    lm = load_model("tiny:llama", seed=0)
    with pytest.raises(OptlabError, match="needs a retain set"):
        unlearn(lm, FORGET, None, UnlearnConfig(method="graddiff"), progress=False)


def test_a_few_ga_steps_lower_forget_accuracy_on_the_facts_scenario(taught_model) -> None:
    lm = load_model(str(taught_model))
    asked = capital_questions(40)  # the 16 taught and 24 the model does not know
    known = known_facts(lm, max_new_tokens=12, progress=False, questions=asked, cache=False)
    assert 10 <= len(known) < len(asked)
    scenario = facts_scenario(lm, seed=0, forget_fraction=0.25, known=known)
    scorer = Scorer(lm, progress=False)
    before = qa_accuracy(scorer, scenario.forget, 12)
    assert before == 1.0  # filtered to what the model answers
    unlearn(lm, scenario.forget, None, UnlearnConfig(method="ga", steps=5, lr=1e-3),
            progress=False)  # fmt: skip
    assert qa_accuracy(scorer, scenario.forget, 12) <= 0.25


def test_known_facts_are_cached_by_weights(taught_model, tmp_path, monkeypatch) -> None:
    import optlab.unlearning.scenarios as scenarios

    monkeypatch.setenv("OPTLAB_CACHE", str(tmp_path))
    lm = load_model(str(taught_model))
    asked = capital_questions(20)
    first = known_facts(lm, max_new_tokens=12, progress=False, questions=asked)

    def no_generation(*args, **kwargs):
        raise AssertionError("answers were generated again")

    monkeypatch.setattr(scenarios, "answers", no_generation)
    assert known_facts(lm, max_new_tokens=12, progress=False, questions=asked) == first
    with torch.no_grad():
        next(lm.model.parameters()).add_(1.0)  # other weights: another cache entry
    with pytest.raises(AssertionError, match="generated again"):
        known_facts(lm, max_new_tokens=12, progress=False, questions=asked)


@pytest.mark.parametrize("family", ["tiny:llama", "tiny:gpt2"])  # Linear and Conv1D weights
def test_sure_trains_only_the_salient_weights(family) -> None:
    """--saliency: the chosen weights are the top share by the forget-CE gradient norm,
    computed here directly; only they change, every other parameter stays bit for bit."""
    from optlab.unlearning.data import encode
    from optlab.unlearning.losses import answer_ce
    from optlab.unlearning.trainer import block_linear_weights

    lm = load_model(family, seed=0)
    forget = [*FORGET, Example("Madrid", "What is the capital of Spain?")]
    weights = block_linear_weights(lm.model)
    lm.model.zero_grad()
    answer_ce(lm.model, encode(lm.tokenizer, forget)).backward()  # one batch: the same mean
    norms = {name: weights[name].grad.norm().item() for name in weights}
    lm.model.zero_grad(set_to_none=True)
    expected = sorted(norms, key=lambda n: -norms[n])[: round(0.25 * len(norms))]
    before = copy.deepcopy(lm.model.state_dict())
    config = UnlearnConfig(method="graddiff", steps=3, lr=1e-3, saliency=0.25)
    result = unlearn(lm, forget, RETAIN, config, progress=False)
    assert result.metrics["salient"] == expected == result.trained
    assert result.metrics["saliency_gamma"] == pytest.approx(norms[expected[-1]], rel=1e-4)
    after = lm.model.state_dict()
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed == set(expected)
    assert all(p.requires_grad for p in lm.model.parameters())  # flags restored
    with pytest.raises(OptlabError, match="does not combine with --lora"):
        UnlearnConfig(saliency=0.5, lora=True)
    with pytest.raises(OptlabError, match=r"\(0, 1\]"):
        UnlearnConfig(saliency=1.5)


@pytest.mark.parametrize("family", ["tiny:llama", "tiny:gpt2"])  # Linear and Conv1D weights
def test_quant_aware_unlearning_computes_its_loss_on_the_rounded_weights(family) -> None:
    """--quant-aware q4_1: the loss of the first step is the one of the rounded model (not of
    the float one), and every block linear ends exactly on the Q4_1 grid (blocks along the
    input, as a GGUF file stores them), the embeddings and head on Q8_0 (tied ones still
    tied), so `optlab export --type q4_1` changes nothing; the gradient reaches the float
    weights (straight-through)."""
    from optlab.core.anatomy import weight_matrix
    from optlab.core.grids import round_like
    from optlab.unlearning.data import encode
    from optlab.unlearning.losses import answer_ce

    def matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from optlab.unlearning.trainer import block_linear_weights

        return {name: weight_matrix(model.get_submodule(name.rpartition(".")[0]))
                for name in block_linear_weights(model)}  # fmt: skip

    lm = load_model(family, seed=0)
    for module in lm.model.modules():  # tiny:gpt2 has dropout: the losses must be comparable
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    lm.model.config.attn_pdrop = 0.0
    forget = FORGET[:1]  # batch_size 2 of one example: the first batch is it, twice
    rounded = copy.deepcopy(lm.model)
    with torch.no_grad():
        for matrix in matrices(rounded).values():
            matrix.copy_(round_like(matrix, "q4_1"))
        for table in (rounded.get_input_embeddings(), rounded.get_output_embeddings()):
            table.weight.copy_(round_like(table.weight, "q8_0"))
        batch = encode(lm.tokenizer, forget * 2)
        expected, plain = answer_ce(rounded, batch).item(), answer_ce(lm.model, batch).item()
    assert expected != pytest.approx(plain, rel=1e-6)  # the rounding is visible in the loss
    config = UnlearnConfig(method="ga", steps=5, lr=1e-3, quant_aware="q4_1")
    result = unlearn(lm, forget, None, config, progress=False)
    assert result.metrics["losses"][0] == pytest.approx(-expected, rel=1e-6)
    weights = matrices(lm.model)
    assert all(torch.equal(round_like(w, "q4_1"), w) for w in weights.values())
    start = matrices(rounded)
    assert any(not torch.equal(weights[n], start[n]) for n in weights)  # trained across the grid
    assert result.metrics["losses"][-1] < result.metrics["losses"][0]
    assert not any(n for n, _ in lm.model.named_parameters() if "parametrizations" in n)
    for table in (lm.model.get_input_embeddings(), lm.model.get_output_embeddings()):
        assert torch.equal(round_like(table.weight, "q8_0"), table.weight)  # export's embed type
    model = lm.model
    tied = rounded.get_input_embeddings().weight is rounded.get_output_embeddings().weight
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    with pytest.raises(OptlabError, match="does not combine with --lora"):
        UnlearnConfig(quant_aware="q4_1", lora=True)
    with pytest.raises(OptlabError, match="q4_1"):
        UnlearnConfig(quant_aware="q4_k")


def test_teaching_through_a_grid_leaves_the_taught_model_on_it() -> None:
    """--teach-quant-aware q4_1 (book): the taught model's block linears lie on the Q4_1 grid
    (its Q4_1 file holds what was taught) and moved across it; the oracle, copied from the
    model before teaching, is left as it was; the flag needs full fine-tuning."""
    from optlab.core.grids import round_like
    from optlab.unlearning.job import prepare
    from optlab.unlearning.scenarios import Scenario
    from optlab.unlearning.trainer import TeachConfig, block_linear_weights

    lm = load_model("tiny:llama", seed=0)
    start = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    book = [Example("", "the quick brown fox jumps over the lazy dog " * 3)] * 2
    teach = TeachConfig(steps=4, lr=1e-2, full=True, quant_aware="q4_1")
    oracle, info = prepare(lm, Scenario("book", book, [], book[:1], teach=True),
                           UnlearnConfig(method="ga"), teach, progress=False)  # fmt: skip
    taught = dict(lm.model.named_parameters())
    names = block_linear_weights(lm.model)
    assert all(torch.equal(round_like(taught[n], "q4_1"), taught[n]) for n in names)
    assert any(not torch.equal(round_like(start[n], "q4_1"), taught[n]) for n in names)
    assert all(torch.equal(p, start[n]) for n, p in oracle.model.named_parameters())
    assert info["teaching"]["optimizer_steps"] == 4
    with pytest.raises(OptlabError, match="--teach-full"):
        TeachConfig(quant_aware="q4_1")
    with pytest.raises(OptlabError, match="q4_1"):
        TeachConfig(full=True, quant_aware="q4_k")
