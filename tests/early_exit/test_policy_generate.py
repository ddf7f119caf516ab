"""``exit generate --exit policy --policy DIR`` end to end on a tiny model: a policy trained
by ``exit_policy``, generation through the API and the CLI, and each token's exit decision
checked against the policy's own P(exit) of the token's state (> tau); a policy made for
another model is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from optlab.api import GenerateConfig, exit_generate, exit_policy
from optlab.core.models import LoadedModel, byte_tokenizer, load_model, save_model
from optlab.early_exit.decode import generate
from optlab.early_exit.generate import prompt_ids
from optlab.early_exit.policy import PolicyConfig, load_policy
from tests.hostile.conftest import run_cli as cli

PROMPTS = ["def f(x):", "import os"]
NEW = 6


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "policy"
    exit_policy("tiny:llama", PolicyConfig(exits="1", episodes=1, timesteps=16, n_steps=16,
                                           batch_size=8), out=out, progress=False)  # fmt: skip
    return out


def expected_layers(lm: LoadedModel, policy: Path, tau: float, prompt: str,
                    tokens: list[int]) -> list[int]:  # fmt: skip
    """Each generated token's depth as the policy decides it, from an uncached forward: the
    state after block 1 of the position fed to produce token i (every position runs block 1,
    so the state is the one the decoder judged); exit at 1 iff P(exit) > tau (and > 1/2)."""
    rule = load_policy(policy, lm, (1, 2), tau)
    ids = prompt_ids(lm, prompt)
    sequence = torch.tensor([ids + tokens])
    with torch.no_grad():
        states = lm.model(sequence, output_hidden_states=True).hidden_states[1][0]
    fed = states[len(ids) - 1 : len(ids) - 1 + len(tokens)]
    p = rule.exit_probability(fed)
    return [1 if (q > tau and q > 0.5) else 2 for q in p.tolist()]


@pytest.mark.parametrize("tau", [0.5, 0.99])
def test_policy_decisions_are_the_policys_probabilities_over_tau(capsys, tmp_path, policy, tau):
    lm = load_model("tiny:llama")
    config = GenerateConfig(exit="policy", policy=str(policy), tau=tau, kv="recompute",
                            exits="1", max_new_tokens=NEW)  # fmt: skip
    result = exit_generate(lm, config, PROMPTS, progress=False)
    decided = []
    for i, prompt in enumerate(PROMPTS, 1):
        sample = result["samples"][str(i)]
        # The tokens themselves: the decoder under the policy's rule, as the command runs it
        # (the text of random bytes does not re-encode to them).
        rule = load_policy(policy, lm, (1, 2), tau)
        direct = generate(lm, prompt_ids(lm, prompt), rule, (1, 2), kv="recompute",
                          max_new_tokens=NEW)  # fmt: skip
        assert sample["executed_layers"] == direct.layers
        assert lm.tokenizer.decode(direct.tokens) == sample["text"]
        assert direct.layers == expected_layers(lm, policy, tau, prompt, direct.tokens)
        decided += sample["executed_layers"]
    if tau == 0.5:  # a barely trained policy sits near 1/2: both decisions occur
        assert set(decided) == {1, 2}
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    code, _, err = cli(capsys, "exit", "generate", "tiny:llama", "--exit", "policy", "--policy",
                       policy, "--tau", tau, "--kv", "recompute", "--exits", 1,
                       "--max-new-tokens", NEW,
                       "--in", prompts, "--out", tmp_path / "run")  # fmt: skip
    assert code == 0, err
    run = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [s["executed_layers"] for s in run["samples"].values()] == \
        [s["executed_layers"] for s in result["samples"].values()]  # fmt: skip


def test_a_policy_for_another_model_is_one_line(capsys, tmp_path, policy) -> None:
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=320,
                                  max_position_embeddings=256)  # fmt: skip
    model = save_model(LoadedModel(AutoModelForCausalLM.from_config(config), byte_tokenizer(),
                                   "three"), tmp_path / "three")  # fmt: skip
    before = sorted(tmp_path.rglob("*"))
    for command in (["generate", "--prompt", "def"], ["bench", "--samples", "1"]):
        code, out, err = cli(capsys, "exit", *command, model, "--exit" if command[0] ==
                             "generate" else "--taus", "policy" if command[0] == "generate"
                             else "0.9", "--policy", policy, "--exits", "1",
                             "--out", tmp_path / "o")  # fmt: skip
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert f"the policy in {str(policy)!r} was trained for 'tiny:llama'" in err
        assert "2 layers), not this model (hidden size 64, 3 layers)" in err
    assert sorted(tmp_path.rglob("*")) == before
