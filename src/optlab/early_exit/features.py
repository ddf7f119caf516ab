"""The exit policy's environment data, collected once (so PPO never reruns the LM).

An episode (spec section 2) is a random sample, a context of U(0.2, 0.5) of its tokens and
15 greedy tokens after it: a completion :class:`~optlab.early_exit.data.Sample` cut with
``context_fraction=(0.2, 0.5)``. For every generated token this keeps the hidden state at
each allowed exit below the final layer (the policy's state there), the argmax of every
layer 1..L through the model's own head (which gives l* for either target) and the sample's
true next token (the ``label`` target's; -1 past the sample's end).

>>> lm = load_model("tiny:llama")
>>> samples = completion_samples(code_items("code:stdlib", "train")[:2], lm.tokenizer,
...                              CompletionConfig(context_fraction=(0.2, 0.5), samples=2))
>>> feats = collect_features(lm, (1, 2), samples, progress=False)
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
from optlab.early_exit.data import Sample
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
    samples: Sequence[Sample],
    *,
    new_tokens: int = 15,
    progress: bool = True,
) -> Features:
    """Run one greedy episode of ``new_tokens`` per sample and keep what the policy sees."""
    anatomy = Anatomy.of(lm.model)
    num_layers = len(anatomy.blocks)
    if tuple(exits)[-1] != num_layers or len(exits) < 2:
        raise OptlabError(f"exits {tuple(exits)} must end with the final layer {num_layers} and "
                          "hold at least one exit below it")  # fmt: skip
    # The episode must fit the model's positions: a longer context keeps its last tokens.
    room = context_length(lm.model) - new_tokens
    if room < 1:
        raise OptlabError(f"{new_tokens} new tokens leave no room for a context in the model's "
                          f"{context_length(lm.model)} positions")  # fmt: skip
    if not samples:
        raise OptlabError("no episodes to collect: the code gave no completion samples")
    hidden, predictions, labels, starts, contexts = [], [], [], [0], []
    device = lm.device
    for sample in tqdm(samples, desc="exit features", unit="episode", disable=not progress):
        context = sample.context_ids[-room:]
        # Only the last position's logits: the context's full [n, vocab] would cost a fifth of
        # the forward (SmolLM2, 1024 tokens) for nothing.
        out = lm.model(context[None].to(device), use_cache=True, output_hidden_states=True,
                       logits_to_keep=1)  # fmt: skip
        truth = sample.target_ids.tolist()
        for step in range(new_tokens):
            states = [h[0, -1] for h in out.hidden_states]
            # One head matmul for all layers below L (the head is the big read on a CPU);
            # the final layer's logits are the model's own (its hidden_states[L] is normed).
            below = anatomy.logits(torch.stack(states[1:num_layers])).argmax(-1)
            final = out.logits[0, -1].argmax(-1, keepdim=True)
            predictions.append(torch.cat([below, final]).cpu().numpy())
            hidden.append(torch.stack([states[e] for e in exits[:-1]]).float().cpu().numpy())
            labels.append(truth[step] if step < len(truth) else -1)
            if step + 1 < new_tokens:
                out = lm.model(final.view(1, 1), cache=out.cache, use_cache=True,
                               output_hidden_states=True)  # fmt: skip
        starts.append(starts[-1] + new_tokens)
        contexts.append(len(context))
    return Features(hidden=np.stack(hidden), predictions=np.stack(predictions).astype(np.int64),
                    labels=np.asarray(labels, dtype=np.int64), starts=np.asarray(starts),
                    contexts=np.asarray(contexts), exits=tuple(exits))  # fmt: skip
