"""The exit policy: features against a direct forward, the environment step by step, PPO,
the plain-torch actor against stable-baselines3's, save/reload, and mismatch errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from optlab.core.models import LoadedModel, byte_tokenizer
from optlab.early_exit.data import CodeItem, CompletionConfig, Sample, completion_samples
from optlab.early_exit.features import Features, collect_features
from optlab.early_exit.policy import (
    POLICY_JSON,
    POLICY_WEIGHTS,
    ExitEnv,
    PolicyNet,
    PolicyRule,
    decision_summary,
    load_policy,
    save_policy,
    train_ppo,
)
from optlab.early_exit.reward import CONTINUE, EXIT
from optlab.errors import OptlabError

CODE = (
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x = 0\n    y = 1\n"
    "import os\nfor name in os.listdir('.'):\n    print(name.upper())\n"
) * 2


def tiny_llama(layers: int = 4, hidden: int = 64) -> LoadedModel:
    """A tiny Llama deeper than tiny:llama, so exits have room between them."""
    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=128,
                                  num_hidden_layers=layers, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=320,
                                  max_position_embeddings=256, bos_token_id=256,
                                  eos_token_id=256, pad_token_id=256)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(model, byte_tokenizer(), f"test:llama-{layers}x{hidden}")


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny_llama()


@pytest.fixture(scope="module")
def samples(lm: LoadedModel) -> list[Sample]:
    items = [CodeItem(f"f{i}.py", CODE) for i in range(3)]
    episodes = CompletionConfig(context_fraction=(0.2, 0.5), samples=3, seed=1)
    return completion_samples(items, lm.tokenizer, episodes)


@pytest.fixture(scope="module")
def features(lm: LoadedModel, samples: list[Sample]) -> Features:
    return collect_features(lm, (1, 2, 4), samples, progress=False)


def test_features_are_a_plain_forward_of_the_greedy_episode(lm, samples, features) -> None:
    """Replaying each episode without a cache gives the same states, argmaxes and labels."""
    assert features.hidden.shape == (45, 2, 64) and features.predictions.shape == (45, 4)
    assert len(set(features.contexts.tolist())) == 3  # U(0.2, 0.5) of the sample, seeded
    for episode, (sample, cut) in enumerate(zip(samples, features.contexts, strict=True)):
        assert cut == len(sample.context_ids)
        rows = slice(features.starts[episode], features.starts[episode + 1])
        assert features.labels[rows].tolist() == sample.target_ids.tolist()
        generated = features.predictions[rows, -1]
        ids = torch.tensor([[*sample.context_ids.tolist(), *generated[:-1]]])
        with torch.no_grad():
            out = lm.model(ids, output_hidden_states=True)
        positions = range(cut - 1, cut + 14)
        for column, layer in enumerate((1, 2)):
            want = out.hidden_states[layer][0, positions]
            torch.testing.assert_close(torch.from_numpy(features.hidden[rows, column]), want,
                                       atol=1e-4, rtol=1e-4)  # fmt: skip
        assert (out.logits[0, positions].argmax(-1).numpy() == generated).all()
        normed = lm.model.model.norm(out.hidden_states[3][0, positions])
        assert (lm.model.lm_head(normed).argmax(-1).numpy() == features.predictions[rows, 2]).all()


def handmade() -> Features:
    """One episode, two tokens, L = 4, exits (1, 2, 4). Token 0: argmaxes 5,7,7,7 (l* = 2 for
    final; label 5: l* = 1). Token 1: 3,3,3,3 (l* = 1 for final); label 9: nobody, skipped."""
    hidden = np.array([[[0.0], [1.0]], [[10.0], [11.0]]], dtype=np.float32)
    return Features(hidden=hidden, predictions=np.array([[5, 7, 7, 7], [3, 3, 3, 3]]),
                    labels=np.array([5, 9]), starts=np.array([0, 2]), contexts=np.array([4]),
                    exits=(1, 2, 4))  # fmt: skip


def test_the_environment_step_by_step() -> None:
    env = ExitEnv(handmade(), "final")
    state, _ = env.reset(seed=0)
    assert state.tolist() == [0.0]
    steps = [env.step(CONTINUE), env.step(EXIT), env.step(CONTINUE), env.step(CONTINUE)]
    assert [s[0].tolist() for s in steps[:3]] == [[1.0], [10.0], [11.0]]
    # continue at 1 < l* = 2: +1; exit at 2 = l*: +1; token 1 (l* = 1): continue at 1 goes
    # to 2: -(2 - 1) / 4; continue at the last exit runs the token to L: -(4 - 1) / 4, done.
    assert [s[1] for s in steps] == [1.0, 1.0, -0.25, -0.75]
    assert [s[2] for s in steps] == [False, False, False, True]


def test_the_label_target_skips_tokens_no_layer_predicts() -> None:
    env = ExitEnv(handmade(), "label")
    state, _ = env.reset(seed=0)
    assert state.tolist() == [0.0]
    _, reward, done, truncated, _ = env.step(EXIT)  # layer 1 predicts the label 5: +1
    assert (reward, done, truncated) == (1.0, True, False)
    bare = Features(**{**handmade().__dict__, "labels": np.array([8, 9])})
    with pytest.raises(OptlabError, match="nothing to learn"):
        ExitEnv(bare, "label")


def test_ppo_learns_a_rule_written_in_the_state() -> None:
    """States that say 'exit here' (first coordinate 1 at the first exit >= l*): after a
    few thousand steps the policy exits there and continues before it."""
    rng = np.random.default_rng(0)
    exits, tokens = (2, 4, 6, 8), 600
    best = rng.choice([2, 4, 6, 8], size=tokens)
    at_best = np.asarray(exits[:-1])[None, :] >= best[:, None]
    hidden = np.stack([at_best, ~at_best], axis=-1).astype(np.float32)
    predictions = np.where(np.arange(1, 9)[None, :] >= best[:, None], 1, 0)
    feats = Features(hidden=hidden, predictions=predictions, labels=np.full(tokens, -1),
                     starts=np.arange(0, tokens + 1, 15), contexts=np.full(40, 8),
                     exits=exits)  # fmt: skip
    weights, info = train_ppo(ExitEnv(feats), timesteps=2048, lr=1e-2, n_steps=256,
                              batch_size=64, epochs=4, net=(16,), progress=False)  # fmt: skip
    assert info["timesteps"] == 2048 and len(info["rollout_mean_reward"]) == 8
    assert info["rollout_mean_reward"][-1] > info["rollout_mean_reward"][0] + 0.3
    net = PolicyNet.from_weights(weights, 2, (16,))
    p_exit = net(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))[:, EXIT]
    assert p_exit[0] > 0.7 and p_exit[1] < 0.3


def test_the_plain_actor_gives_stable_baselines_probabilities(
    features, tmp_path, monkeypatch
) -> None:
    from stable_baselines3 import PPO

    env = ExitEnv(features)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where stable-baselines3 logs by default
    monkeypatch.setattr("tempfile.tempdir", None)
    weights, info = train_ppo(env, timesteps=64, n_steps=32, batch_size=16, progress=False)
    assert not list(tmp_path.iterdir()), "PPO wrote a log folder"
    assert info["timesteps"] == 64 and len(info["rollout_mean_reward"]) == 2
    sb3 = PPO("MlpPolicy", env, policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]}},
              device="cpu", seed=0)  # fmt: skip
    fresh = sb3.policy.state_dict()
    assert any(not torch.equal(fresh[k], weights[k]) for k in weights), "PPO changed nothing"
    sb3.policy.load_state_dict(weights)
    states = torch.from_numpy(features.hidden.reshape(-1, 64))
    with torch.no_grad():
        want = sb3.policy.get_distribution(states).distribution.probs
    got = PolicyNet.from_weights(weights, 64, (64, 64))(states)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def saved(lm, features, tmp_path_factory) -> tuple[object, dict]:
    weights, _ = train_ppo(ExitEnv(features), timesteps=32, n_steps=32, batch_size=16,
                           progress=False)  # fmt: skip
    folder = tmp_path_factory.mktemp("policy")
    save_policy(folder, weights, lm, (1, 2, 4), (64, 64), "final")
    return folder, weights


def test_save_and_reload_give_identical_decisions(lm, features, saved) -> None:
    folder, weights = saved
    assert json.loads((folder / POLICY_JSON).read_text())["exits"] == [1, 2, 4]
    before = PolicyRule(PolicyNet.from_weights(weights, 64, (64, 64)), (1, 2, 4), 0.5)
    states = torch.from_numpy(features.hidden.reshape(-1, 64))
    p = before.exit_probability(states)
    for tau in (0.3, 0.5, 0.51, 0.9):
        after = load_policy(folder, lm, (1, 2, 4), tau)
        assert torch.equal(after.exit_probability(states), p)
        for layer in (1, 2):
            for state, prob in zip(features.hidden[:, layer - 1], p.view(-1, 2)[:, layer - 1],
                                   strict=True):  # fmt: skip
                decision = after.should_exit(layer, torch.from_numpy(state))
                assert decision == bool(prob > max(tau, 0.5))
        assert not after.should_exit(4, states[0])  # never asked at the final layer
    # A bfloat16 model's states are read in float32, as rounded to bfloat16.
    half = after.exit_probability(states.bfloat16())
    assert torch.equal(half, after.exit_probability(states.bfloat16().float()))
    summary = decision_summary(after, features, (0.5, 0.9))
    assert set(summary) == {"0.5", "0.9", "oracle"}
    assert all(1 <= row["mean_exit_layer"] <= 4 for row in summary.values())


def test_a_policy_for_another_model_is_refused(lm, saved) -> None:
    folder, _ = saved
    with pytest.raises(OptlabError, match=r"hidden size 64, 4 layers.*hidden size 32, 4 layers"):
        load_policy(folder, tiny_llama(hidden=32), (1, 2, 4), 0.9)
    with pytest.raises(OptlabError, match=r"4 layers.*6 layers"):
        load_policy(folder, tiny_llama(layers=6), (1, 2, 6), 0.9)
    with pytest.raises(OptlabError, match="exits 1,2,4, not 2,4"):
        load_policy(folder, lm, (2, 4), 0.9)
    for tau in (0.0, 1.0, 1.5):
        with pytest.raises(OptlabError, match="between 0 and 1"):
            load_policy(folder, lm, (1, 2, 4), tau)


@pytest.mark.parametrize("damage", ["no weights", "bad json", "foreign json", "wrong shapes"])
def test_a_damaged_policy_is_one_clear_error(lm, saved, tmp_path, damage) -> None:
    folder, _ = saved
    for name in (POLICY_JSON, POLICY_WEIGHTS):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    if damage == "no weights":
        (tmp_path / POLICY_WEIGHTS).unlink()
    elif damage == "bad json":
        (tmp_path / POLICY_JSON).write_text("{")
    elif damage == "foreign json":
        (tmp_path / POLICY_JSON).write_text('{"hidden_size": 64}')
    else:
        config = json.loads((tmp_path / POLICY_JSON).read_text())
        (tmp_path / POLICY_JSON).write_text(json.dumps({**config, "net": [32, 32]}))
    needle = {"no weights": "holds no exit policy", "bad json": "not valid JSON",
              "foreign json": "not an optlab exit policy",
              "wrong shapes": "does not hold"}  # fmt: skip
    with pytest.raises(OptlabError, match=needle[damage]):
        load_policy(tmp_path, lm, (1, 2, 4), 0.9)
