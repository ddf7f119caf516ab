"""The early-exit policy by PPO: ``exit_policy``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from optlab.api._base import execute_job, job_of, resolve_model
from optlab.core.anatomy import Anatomy
from optlab.core.job import Result
from optlab.core.models import LoadedModel
from optlab.core.run import Run
from optlab.early_exit.bench import TAUS  # the summary of decisions uses the bench's sweep
from optlab.early_exit.data import CodeDataConfig, code_items, completion_samples
from optlab.early_exit.exits import CONFIG_KEY, exits_of
from optlab.early_exit.features import collect_features
from optlab.early_exit.policy import (
    POLICY_JSON,
    ExitEnv,
    PolicyConfig,
    PolicyNet,
    PolicyRule,
    check_policy,
    decision_summary,
    read_policy,
    save_policy,
    train_ppo,
)
from optlab.errors import OptlabError

log = logging.getLogger("optlab")


def exit_policy(
    model: LoadedModel | str | Path,
    config: PolicyConfig | None = None,
    data: CodeDataConfig | None = None,
    *,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Train GREEN-CODE's exit policy by PPO on ``model`` (an ``exit train`` run gives its
    own exits): greedy episodes on the train split of ``data``, their features collected
    once, PPO over them; with ``out``, the policy (``policy.safetensors`` + ``policy.json``)
    that :func:`optlab.early_exit.policy.load_policy` reads. ``result.rule`` is the policy
    as an exit rule (tau 0.9).

    >>> config = PolicyConfig(exits="1", episodes=2, timesteps=64, n_steps=32, batch_size=16)
    >>> result = exit_policy("tiny:llama", config, progress=False)
    >>> result["exits"], result["tokens"], result["timesteps"]
    ([1, 2], 30, 64)
    >>> result.rule.exits, result.rule.tau
    ((1, 2), 0.9)
    """
    config = config or PolicyConfig()
    data = data or CodeDataConfig()
    lm = resolve_model(model)
    num_layers = len(Anatomy.of(lm.model).blocks)
    own = exits_of(lm)  # the set `exit train` recorded in the model's config, else auto
    exits = exits_of(lm, config.exits)
    if exits != own and getattr(lm.model.config, CONFIG_KEY, None) is not None:
        log.warning("--exits %s differs from the exits this model was trained for (%s): the "
                    "policy fits this exit set only", config.exits,
                    ",".join(map(str, own)))  # fmt: skip
    if len(exits) < 2:
        raise OptlabError(f"--exits {config.exits or 'auto'} leaves no exit below the final "
                          f"layer {num_layers}: the policy would have nothing to "
                          "decide")  # fmt: skip
    items = code_items(data.data, "train", data.extensions)  # bad data fails before the run
    init = None
    if config.init is not None:  # a policy for another model, or another net, fails here
        init_config, init = read_policy(config.init)
        check_policy(init_config, config.init, lm, exits)
        if tuple(init_config["net"]) != tuple(config.net):
            raise OptlabError(f"--init {config.init!r} has net {init_config['net']}, not "
                              f"--net {list(config.net)}")  # fmt: skip
    job = job_of("exit policy", lm, seed, data=data, policy=config)
    trained: dict[str, PolicyRule] = {}

    def body(run: Run | None) -> dict[str, Any]:
        samples = completion_samples(items, lm.tokenizer, config.completion(seed))
        start = time.perf_counter()
        features = collect_features(lm, exits, samples, new_tokens=config.new_tokens,
                                    progress=progress)  # fmt: skip
        feature_seconds = time.perf_counter() - start
        env = ExitEnv(features, config.target, **config.weights)
        start = time.perf_counter()
        weights, info = train_ppo(env, timesteps=config.timesteps, lr=config.lr,
                                  n_steps=config.n_steps, batch_size=config.batch_size,
                                  epochs=config.epochs, net=config.net, seed=seed,
                                  init=init, progress=progress)  # fmt: skip
        ppo_seconds = time.perf_counter() - start
        hidden = features.hidden.shape[-1]
        trained["rule"] = PolicyRule(PolicyNet.from_weights(weights, hidden, config.net), exits,
                                     0.9)  # fmt: skip
        if run is not None:
            save_policy(run.dir, weights, lm, exits, config.net, config.target)
        rewards = info["rollout_mean_reward"]
        log.info("exit policy: %d episodes in %.1f s, %d PPO steps in %.1f s, mean reward per "
                 "step %.3f -> %.3f", len(samples), feature_seconds, info["timesteps"],
                 ppo_seconds, rewards[0], rewards[-1])  # fmt: skip
        return {"model": lm.spec, "exits": list(exits), "hidden_size": hidden,
                "target": config.target, "episodes": len(samples),
                "tokens": int(features.hidden.shape[0]),
                "mean_context_tokens": float(features.contexts.mean()),
                "feature_seconds": feature_seconds,
                "seconds_per_episode": feature_seconds / len(samples),
                "timesteps": info["timesteps"], "ppo_seconds": ppo_seconds,
                "ppo_steps_per_second": info["timesteps"] / ppo_seconds,
                "rollout_mean_reward": rewards,
                "decisions": decision_summary(trained["rule"], features, TAUS),
                **({"policy": str(run.path / POLICY_JSON)} if run else {})}  # fmt: skip

    result = execute_job(job, body, out, force)
    result.rule = trained["rule"]  # type: ignore[attr-defined]
    return result
