"""``optlab exit policy`` end to end on a tiny model: the run, its replay, reloading the
policy, an exit-train run's own exits, and continuing from a saved policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from optlab.api import exit_policy
from optlab.cli import main
from optlab.core.models import load_model, save_model
from optlab.early_exit.exits import record_exits
from optlab.early_exit.policy import POLICY_JSON, POLICY_WEIGHTS, PolicyConfig, load_policy

SMALL = ["--episodes", "2", "--timesteps", "32", "--n-steps", "16", "--batch-size", "8"]


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "policy"
    assert main(["exit", "policy", "tiny:llama", "--exits", "1", *SMALL, "--out", str(out)]) == 0
    return out


def test_the_run_holds_a_policy_that_reloads_and_replays(policy_run, tmp_path) -> None:
    metrics = json.loads((policy_run / "metrics.json").read_text())
    assert metrics["exits"] == [1, 2] and metrics["tokens"] == 30
    assert metrics["timesteps"] == 32 and len(metrics["rollout_mean_reward"]) == 2
    assert set(metrics["decisions"]) == {"0.6", "0.8", "0.9", "0.92", "0.94", "oracle"}
    config = json.loads((policy_run / POLICY_JSON).read_text())
    assert (config["hidden_size"], config["num_layers"], config["exits"]) == (64, 2, [1, 2])
    assert load_policy(policy_run, load_model("tiny:llama"), (1, 2), 0.9).exits == (1, 2)
    assert main(["rerun", str(policy_run), "--out", str(tmp_path / "again")]) == 0
    # Seeded episodes and seeded PPO: the replay trains the very same policy.
    weights = (policy_run / POLICY_WEIGHTS).read_bytes()
    assert (tmp_path / "again" / POLICY_WEIGHTS).read_bytes() == weights


def test_an_exit_train_run_brings_its_exits(tmp_path) -> None:
    """The exits `exit train` records in the model's config.json are the policy's."""
    lm = load_model("tiny:llama")
    record_exits(lm.model, (1, 2), (0.5, 0.5), "uniform")
    save_model(lm, tmp_path / "trained" / "model")
    small = PolicyConfig(episodes=1, timesteps=16, n_steps=16, batch_size=8)  # no --exits
    result = exit_policy(str(tmp_path / "trained"), small, progress=False)
    assert result["exits"] == [1, 2]


def test_init_starts_from_the_saved_policy(policy_run) -> None:
    """With a vanishing learning rate the policy trained from --init is the saved one (seed
    0), not the fresh start another seed draws."""
    config = PolicyConfig(exits="1", episodes=1, timesteps=16, n_steps=16, batch_size=8,
                          lr=1e-12)  # fmt: skip
    saved = load_policy(policy_run, load_model("tiny:llama"), (1, 2), 0.9)
    states = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    for init in (None, str(policy_run)):
        config = PolicyConfig(**{**config.__dict__, "init": init})
        rule = exit_policy("tiny:llama", config, seed=1, progress=False).rule
        same = torch.allclose(rule.exit_probability(states), saved.exit_probability(states),
                              atol=1e-6, rtol=0)  # fmt: skip
        assert same == (init is not None)
