"""The exit policy (GREEN-CODE section 2): a gymnasium environment over collected features,
PPO from stable-baselines3, and the trained policy saved as safetensors + JSON.

The environment walks an episode's tokens; at each allowed exit below the final layer the
state is the token's hidden state there and the action is continue (0) or exit (1), rewarded
by :func:`~optlab.early_exit.reward.exit_reward`. An exit, or a continue at the last exit
below L (the token runs to the end), moves on to the next token; the episode ends after its
last token. Under the ``label`` target, tokens no layer predicts are skipped, as the
official ``env_rand.py`` does. The policy is never asked at the final layer: decoders do not
consult it there (:class:`~optlab.early_exit.exits.ExitRule`).

PPO as the official code runs it: ``MlpPolicy`` with pi and vf nets [64, 64] (Tanh), the
learning rate linear from 5e-5 to 0, n_steps 4096, batch 512, 6 epochs, the rest at
stable-baselines3's defaults (discount 0.99, GAE 0.95, clip 0.2). The saved policy is
stable-baselines3's own actor-critic weights (safetensors) and a JSON config; optlab rebuilds
the actor as a plain torch MLP, so no pickle (stable-baselines3's zip unpickles) is read.

>>> rule = load_policy("runs/policy", lm, exits, tau=0.9)
>>> rule.should_exit(5, hidden)  # P(exit) > 0.9 for this state at layer 5
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm.auto import tqdm

from optlab.core.anatomy import Anatomy
from optlab.core.config import configurable, option, require, require_finite, require_positive
from optlab.core.files import read_json_object
from optlab.core.models import LoadedModel
from optlab.core.run import atomic_write
from optlab.early_exit.data import CompletionConfig
from optlab.early_exit.features import Features
from optlab.early_exit.reward import CONTINUE, EXIT, TARGETS, exit_reward
from optlab.errors import OptlabError, first_line

POLICY_JSON, POLICY_WEIGHTS = "policy.json", "policy.safetensors"
FORMAT = "optlab-exit-policy"


@configurable("exit-policy")
@dataclass(frozen=True)
class PolicyConfig:
    """Episodes, reward and PPO of ``optlab exit policy``; defaults as the paper and code."""

    exits: str | None = option(None, "allowed exits: auto, or layers such as 3,5,7 (the final "
                               "layer is always one); default: an exit-train run's own, else "
                               "auto", metavar="auto|LIST")  # fmt: skip
    episodes: int = option(256, "greedy episodes (code samples of the train split) whose "
                           "features PPO learns from, collected once")  # fmt: skip
    context_fraction: tuple[float, ...] = option((0.2, 0.5), "an episode's context: a seeded "
                                                 "U(LOW, HIGH) share of its sample",
                                                 metavar="LOW,HIGH")  # fmt: skip
    new_tokens: int = option(15, "greedy tokens per episode")
    max_context: int = option(1024, "at most this many context tokens (the official cap)")
    target: str = option("final", "l*: the first layer agreeing with the final layer (final) "
                         "or predicting the true next token (label)", choices=TARGETS)  # fmt: skip
    timesteps: int = option(500_000, "PPO timesteps (whole rollouts, so rounded up to "
                            "n-steps)")  # fmt: skip
    lr: float = option(5e-5, "PPO learning rate, decayed linearly to 0")
    n_steps: int = option(4096, "PPO rollout length")
    batch_size: int = option(512, "PPO minibatch size")
    epochs: int = option(6, "PPO epochs per rollout")
    net: tuple[int, ...] = option((64, 64), "hidden layers of the policy and value MLPs",
                                  metavar="64,64")  # fmt: skip
    init: str | None = option(None, "start from this saved policy (its weights, actor and "
                              "critic) instead of fresh ones: more timesteps on an earlier "
                              "run", metavar="POLICY")  # fmt: skip
    alpha: float = option(1.0, "reward: penalty per layer of a late exit")
    beta: float = option(1.0, "reward: penalty per layer of an early, wrong exit")
    gamma: float = option(1.0, "reward: penalty per layer of a needless continue")
    eps: float = option(0.1, "reward: penalty of a wrong exit past l* (target final)")

    def __post_init__(self) -> None:
        require_positive(self, "episodes", "timesteps", "n_steps", "batch_size", "epochs")
        require_finite(self, "lr", "alpha", "beta", "gamma", "eps")
        self.completion(seed=0)  # the episode settings are checked where they are used
        require(self.target in TARGETS, f"--target {self.target!r}: choose final or label")
        require(1 < self.batch_size <= self.n_steps, f"--batch-size {self.batch_size} must be "
                f"at least 2 and at most --n-steps {self.n_steps}")  # fmt: skip
        require(self.lr > 0 and self.gamma > 0, "--lr and --gamma must be positive")
        require(bool(self.net) and all(isinstance(w, int) and w >= 1 for w in self.net),
                f"--net {self.net!r}: give layer widths such as 64,64")  # fmt: skip

    def completion(self, seed: int) -> CompletionConfig:
        """How episodes are cut from the code: the data module's completion samples."""
        return CompletionConfig(context_fraction=self.context_fraction,
                                new_tokens=self.new_tokens, max_context=self.max_context,
                                samples=self.episodes, seed=seed)  # fmt: skip

    @property
    def weights(self) -> dict[str, float]:
        """The reward's constants, as :func:`exit_reward` takes them."""
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "eps": self.eps}


class ExitEnv(gym.Env):
    """Continue-or-exit decisions over collected :class:`Features` (no LM in the loop)."""

    def __init__(self, features: Features, target: str = "final", **weights: float) -> None:
        super().__init__()
        self.features, self.target, self.weights = features, target, weights
        self.decisions = features.exits[:-1]
        self.best, self.matches = features.targets(target)
        starts = features.starts
        episodes = [np.flatnonzero(self.best[a:b] > 0) + a for a, b in pairwise(starts)]
        self.episodes = [tokens for tokens in episodes if len(tokens)]
        if not self.episodes:
            raise OptlabError(f"no token of the {len(starts) - 1} episodes has a layer "
                              f"predicting its {target} token: nothing to learn from")  # fmt: skip
        size = features.hidden.shape[-1]
        self.observation_space = spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.action_space = spaces.Discrete(2)
        self._tokens, self._position, self._exit = self.episodes[0], 0, 0

    def _state(self) -> np.ndarray:
        return self.features.hidden[self._tokens[self._position], self._exit].copy()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._tokens = self.episodes[int(self.np_random.integers(len(self.episodes)))]
        self._position, self._exit = 0, 0
        return self._state(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        token, state = self._tokens[self._position], self._state()
        reward = exit_reward(int(action), self.decisions[self._exit], best=int(self.best[token]),
                             exits=self.features.exits, matches=bool(self.matches[token,
                             self._exit]), target=self.target, **self.weights)  # fmt: skip
        if int(action) == EXIT or self._exit == len(self.decisions) - 1:
            self._position, self._exit = self._position + 1, 0
        else:
            self._exit += 1
        done = self._position == len(self._tokens)
        return (state if done else self._state()), reward, done, False, {}


def _progress(total: int, show: bool) -> Any:
    """A stable-baselines3 callback: a bar over the timesteps, the mean reward per rollout."""
    from stable_baselines3.common.callbacks import BaseCallback

    class Progress(BaseCallback):
        def _on_training_start(self) -> None:
            self.bar = tqdm(total=total, desc="PPO", unit="step", disable=not show)
            self.rewards: list[float] = []
            self.rollout_means: list[float] = []

        def _on_step(self) -> bool:
            self.bar.update(1)
            self.rewards.append(float(self.locals["rewards"][0]))
            return True

        def _on_rollout_end(self) -> None:
            self.rollout_means.append(float(np.mean(self.rewards)))
            self.rewards.clear()

        def _on_training_end(self) -> None:
            self.bar.close()

    return Progress()


def train_ppo(
    env: ExitEnv,
    *,
    timesteps: int,
    lr: float = 5e-5,
    n_steps: int = 4096,
    batch_size: int = 512,
    epochs: int = 6,
    net: Sequence[int] = (64, 64),
    seed: int = 0,
    init: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PPO on ``env`` for ``timesteps`` (whole rollouts of ``n_steps``, so rounded up),
    from the actor-critic weights ``init`` if given (a fresh learning-rate schedule); the
    weights and a summary (steps run, mean reward per rollout)."""
    from stable_baselines3 import PPO  # slow import: only training needs it
    from stable_baselines3.common.logger import Logger

    model = PPO("MlpPolicy", env, learning_rate=lambda remaining: remaining * lr,
                n_steps=n_steps, batch_size=batch_size, n_epochs=epochs, seed=seed,
                policy_kwargs={"net_arch": {"pi": list(net), "vf": list(net)}}, device="cpu",
                verbose=0)  # fmt: skip
    # Without a logger of its own, learn() makes a folder SB3-<time> in the temp dir per call.
    model.set_logger(Logger(folder=None, output_formats=[]))
    if init is not None:
        model.policy.load_state_dict(init)
    callback = _progress(-(-timesteps // n_steps) * n_steps, progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide MLP: more threads only add contention (10x, measured)
    try:
        model.learn(total_timesteps=timesteps, callback=callback)
    finally:
        torch.set_num_threads(threads)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.policy.state_dict().items()}
    return weights, {"timesteps": int(model.num_timesteps),
                     "rollout_mean_reward": callback.rollout_means}  # fmt: skip


class PolicyNet(nn.Module):
    """stable-baselines3's actor as plain torch: MLP (Tanh) -> action logits -> softmax."""

    def __init__(self, hidden_size: int, net: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = hidden_size
        for size in net:
            layers += [nn.Linear(width, size), nn.Tanh()]
            width = size
        self.policy_net = nn.Sequential(*layers)
        self.action_net = nn.Linear(width, 2)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """P(continue), P(exit) per state ([..., hidden_size] -> [..., 2])."""
        return torch.softmax(self.action_net(self.policy_net(states)), dim=-1)

    @classmethod
    def from_weights(
        cls, weights: dict[str, torch.Tensor], hidden_size: int, net: Sequence[int]
    ) -> PolicyNet:
        """The actor out of stable-baselines3's state dict (its ``mlp_extractor.policy_net``
        and ``action_net``; the critic is kept in the file for nothing else)."""
        actor = cls(hidden_size, net)
        mine = {k.removeprefix("mlp_extractor."): v for k, v in weights.items()
                if k.startswith(("mlp_extractor.policy_net.", "action_net."))}  # fmt: skip
        actor.load_state_dict(mine)  # strict: a missing or misshapen tensor fails here
        return actor.eval()


class PolicyRule:
    """:class:`~optlab.early_exit.exits.ExitRule` of a trained policy: exit when the policy
    picks exit with P(exit) > tau. As in the official inference the pick is the argmax too,
    so a tau below 0.5 acts as 0.5."""

    def __init__(self, net: PolicyNet, exits: Sequence[int], tau: float) -> None:
        if not 0.0 < tau < 1.0:
            raise OptlabError(f"--tau {tau!r} must lie strictly between 0 and 1")
        self.net, self.exits, self.tau = net, tuple(exits), tau
        self._device = torch.device("cpu")

    @torch.inference_mode()
    def exit_probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(exit) of states [..., hidden_size] (any dtype), computed in float32 on their
        device (the net follows the states there, as the official agent runs on the GPU)."""
        if hidden.device != self._device:
            self.net.to(hidden.device)
            self._device = hidden.device
        return self.net(hidden.detach().float())[..., EXIT]

    def should_exit(self, layer: int, hidden: torch.Tensor) -> bool:
        if layer not in self.exits[:-1]:
            return False
        p = float(self.exit_probability(hidden))
        return p > self.tau and p > 1.0 - p


def save_policy(
    folder: Path, weights: dict[str, torch.Tensor], lm: LoadedModel, exits: Sequence[int],
    net: Sequence[int], target: str,
) -> None:  # fmt: skip
    """Write ``policy.safetensors`` and ``policy.json`` (what :func:`load_policy` checks)."""
    anatomy = Anatomy.of(lm.model)
    config = {"format": FORMAT, "version": 1, "model": lm.spec, "family": lm.family,
              "hidden_size": int(lm.model.config.hidden_size),
              "num_layers": len(anatomy.blocks), "exits": list(exits), "net": list(net),
              "activation": "tanh", "target": target,
              "rule": "exit when P(exit) > tau and P(exit) > P(continue)"}  # fmt: skip
    atomic_write(folder / POLICY_WEIGHTS, save_safetensors(weights))
    atomic_write(folder / POLICY_JSON, json.dumps(config, indent=2) + "\n")


def read_policy(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A saved policy's config and actor-critic weights (checked to build the actor); a
    damaged or foreign folder is one clear line."""
    folder = Path(folder)
    config_path, weights_path = folder / POLICY_JSON, folder / POLICY_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise OptlabError(f"{str(folder)!r} holds no exit policy ({POLICY_JSON} and "
                          f"{POLICY_WEIGHTS}): make one with `optlab exit policy`")  # fmt: skip
    config = read_json_object(config_path, "policy config")
    fields = {"hidden_size": int, "num_layers": int, "exits": list, "net": list}
    if not isinstance(config, dict) or config.get("format") != FORMAT or any(
            not isinstance(config.get(k), t) for k, t in fields.items()):  # fmt: skip
        raise OptlabError(f"{config_path} is not an optlab exit policy config")
    try:
        weights = load_safetensors(weights_path.read_bytes())
        PolicyNet.from_weights(weights, config["hidden_size"], config["net"])
    except (SafetensorError, RuntimeError, TypeError, ValueError) as err:
        raise OptlabError(f"{weights_path} does not hold the policy its {POLICY_JSON} "
                          f"describes: {first_line(err)}") from None  # fmt: skip
    return config, weights


def check_policy(
    config: dict[str, Any], folder: str | Path, lm: LoadedModel, exits: Sequence[int]
) -> None:
    """Refuse a policy made for another model: hidden size, layers and exit set must match."""
    hidden, layers = int(lm.model.config.hidden_size), len(Anatomy.of(lm.model).blocks)
    made_for = f"the policy in {str(folder)!r} was trained for {config.get('model')!r}"
    if (config["hidden_size"], config["num_layers"]) != (hidden, layers):
        raise OptlabError(f"{made_for} (hidden size {config['hidden_size']}, "
                          f"{config['num_layers']} layers), not this model (hidden size "
                          f"{hidden}, {layers} layers): train one for it with "
                          "`optlab exit policy`")  # fmt: skip
    if tuple(config["exits"]) != tuple(exits):
        raise OptlabError(f"{made_for} with exits {_layers(config['exits'])}, not "
                          f"{_layers(exits)}: use its exits or train a policy for "
                          "these")  # fmt: skip


def load_policy(
    run_dir: str | Path, lm: LoadedModel, exits: Sequence[int], tau: float
) -> PolicyRule:
    """The :class:`PolicyRule` of a saved policy, checked against the model it will steer:
    the same hidden size, number of layers and exit set, else one clear line.

    >>> rule = load_policy("runs/policy", load_model("default"), (3, 5, 7, 30), tau=0.9)
    """
    config, weights = read_policy(run_dir)
    check_policy(config, run_dir, lm, exits)
    return PolicyRule(PolicyNet.from_weights(weights, config["hidden_size"], config["net"]),
                      exits, tau)  # fmt: skip


def _layers(exits: Sequence[int]) -> str:
    return ",".join(map(str, exits))


def decision_summary(rule: PolicyRule, features: Features, taus: Sequence[float]) -> dict[str, Any]:
    """Per tau, over the collected tokens: the mean exit layer (L when it never exits) and
    the fraction of tokens whose exit prediction equals the final layer's; and the same for
    the oracle that exits at the first allowed exit >= l* (target ``final``)."""
    exits = np.asarray(features.exits)
    p_exit = rule.exit_probability(torch.from_numpy(features.hidden)).numpy()  # [tokens, D]
    final = features.predictions[:, -1]
    best, _ = features.targets("final")
    summary: dict[str, Any] = {}
    rows = np.arange(len(final))
    for tau in taus:
        leaves = p_exit > max(tau, 0.5)
        first = np.where(leaves.any(axis=1), leaves.argmax(axis=1), len(exits) - 1)
        layer = exits[first]
        agree = features.predictions[rows, layer - 1] == final
        summary[str(tau)] = {"mean_exit_layer": float(layer.mean()),
                             "agreement": float(agree.mean())}  # fmt: skip
    oracle = exits[np.searchsorted(exits, best)]  # the first allowed exit >= l*
    agree = features.predictions[rows, oracle - 1] == final
    summary["oracle"] = {"mean_exit_layer": float(oracle.mean()), "agreement": float(agree.mean())}
    return summary


__all__ = ["CONTINUE", "EXIT", "ExitEnv", "PolicyConfig", "PolicyNet", "PolicyRule", "load_policy"]
