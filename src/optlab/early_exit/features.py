"""The exit policy's environment data, collected once (so PPO never reruns the LM).

An episode (spec section 2) is a random sample, a context of U(0.2, 0.5) of its tokens and
15 greedy tokens after it. For every generated token this keeps the hidden state at each
allowed exit below the final layer (the policy's state there), the argmax of every layer
1..L through the model's own head (which gives l* for either target) and the sample's true
next token (the ``label`` target's; -1 past the sample's end).

>>> lm = load_model("tiny:llama")
>>> feats = collect_features(lm, (1, 2), ["def f(x):\\n    return x + 1\\n" * 4], episodes=2,
...                          progress=False)
>>> feats.hidden.shape, feats.predictions.shape  # 2 episodes x 15 tokens, 1 exit below L=2
((30, 1, 64), (30, 2))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from optlab.core.anatomy import Anatomy
from optlab.core.models import LoadedModel
from optlab.errors import OptlabError
from optlab.eval.scorer import context_length


@dataclass(frozen=True)
class Features:
    """Per generated token (rows; an episode's tokens are contiguous, from ``starts``)."""

    hidden: np.ndarray  # [tokens, exits below L, hidden size] float32, before the final norm
    predictions: np.ndarray  # [tokens, L] int64: the argmax after 1..L blocks
    labels: np.ndarray  # [tokens] int64: the sample's true next token, -1 past its end
    starts: np.ndarray  # [episodes + 1]: episode e is rows starts[e]:starts[e + 1]
    contexts: np.ndarray  # [episodes]: each episode's context length in tokens
    exits: tuple[int, ...]  # the allowed exits, ending with L

    def targets(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        """l* per token (1..L; 0 where no layer predicts the target, ``label`` only) and
        whether each decision exit's argmax is the target ([tokens, exits below L])."""
        wanted = self.predictions[:, -1] if target == "final" else self.labels
        hits = self.predictions == wanted[:, None]
        best = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)
        columns = np.asarray(self.exits[:-1]) - 1
        return best, hits[:, columns]


@torch.inference_mode()
def collect_features(
    lm: LoadedModel,
    exits: Sequence[int],
    texts: Sequence[str],
    *,
    episodes: int,
    new_tokens: int = 15,
    context: tuple[float, float] = (0.2, 0.5),
    max_context: int = 1024,
    seed: int = 0,
    progress: bool = True,
) -> Features:
    """Run ``episodes`` seeded greedy episodes on ``texts`` and keep what the policy sees."""
    anatomy = Anatomy.of(lm.model)
    num_layers = len(anatomy.blocks)
    if tuple(exits)[-1] != num_layers or len(exits) < 2:
        raise OptlabError(f"exits {tuple(exits)} must end with the final layer {num_layers} and "
                          "hold at least one exit below it")  # fmt: skip
    # The episode must fit the model's positions: context plus the generated tokens.
    max_context = min(max_context, context_length(lm.model) - new_tokens)
    if max_context < 1:
        raise OptlabError(f"{new_tokens} new tokens leave no room for a context in the model's "
                          f"{context_length(lm.model)} positions")  # fmt: skip
    rng = np.random.default_rng(seed)
    encoded: dict[int, list[int]] = {}
    hidden, predictions, labels, starts, contexts = [], [], [], [0], []
    device = lm.device
    for _ in tqdm(range(episodes), desc="exit features", unit="episode", disable=not progress):
        ids, cut = _episode(lm, texts, encoded, rng, context, max_context)
        out = lm.model(torch.tensor([ids[:cut]], device=device), use_cache=True,
                       output_hidden_states=True)  # fmt: skip
        for step in range(new_tokens):
            states = [h[0, -1] for h in out.hidden_states]
            # One head matmul for all layers below L (the head is the big read on a CPU);
            # the final layer's logits are the model's own (its hidden_states[L] is normed).
            below = anatomy.logits(torch.stack(states[1:num_layers])).argmax(-1)
            final = out.logits[0, -1].argmax(-1, keepdim=True)
            predictions.append(torch.cat([below, final]).cpu().numpy())
            hidden.append(torch.stack([states[e] for e in exits[:-1]]).float().cpu().numpy())
            labels.append(ids[cut + step] if cut + step < len(ids) else -1)
            if step + 1 < new_tokens:
                out = lm.model(final.view(1, 1), cache=out.cache,
                               use_cache=True, output_hidden_states=True)  # fmt: skip
        starts.append(starts[-1] + new_tokens)
        contexts.append(cut)
    return Features(hidden=np.stack(hidden), predictions=np.stack(predictions).astype(np.int64),
                    labels=np.asarray(labels, dtype=np.int64), starts=np.asarray(starts),
                    contexts=np.asarray(contexts), exits=tuple(exits))  # fmt: skip


def _episode(
    lm: LoadedModel,
    texts: Sequence[str],
    encoded: dict[int, list[int]],
    rng: np.random.Generator,
    context: tuple[float, float],
    max_context: int,
) -> tuple[list[int], int]:
    """A random sample's token ids and its context length (at least one token), as the
    official environment draws them: a sample too short for a context is drawn again."""
    for _ in range(100):
        index = int(rng.integers(len(texts)))
        fraction = float(rng.uniform(*context))
        if index not in encoded:
            encoded[index] = lm.tokenizer(texts[index], add_special_tokens=False)["input_ids"]
        ids = encoded[index]
        cut = min(int(len(ids) * fraction), max_context)
        if cut >= 1:
            return ids, cut
    raise OptlabError("the code samples are too short for an episode's context: 100 draws gave "
                      "none with a token of context")  # fmt: skip
