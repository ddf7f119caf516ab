"""Exit layers, their loss weights, and the exit path shared by training, policies and decoding.

An exit at layer ``l`` (1 <= l <= L) reads the hidden state after ``l`` decoder blocks through
the model's own final norm and LM head (:meth:`Anatomy.logits`): no new heads. Exit ``L`` is the
full model. Hugging Face's ``hidden_states[l]`` is that state for ``l < L``, but its last entry
is already normed, so the final exit takes the model's own logits instead.

>>> resolve_exits("auto", 32)  # OPT-2.7B's exits in the official code, plus the final layer
(3, 5, 7, 9, 11, 13, 15, 19, 23, 27, 32)
>>> resolve_exits("auto", 28)  # Llama-3.2-3B's
(3, 5, 7, 9, 11, 13, 17, 21, 25, 28)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from optlab.core.anatomy import Anatomy
from optlab.core.models import LoadedModel
from optlab.errors import OptlabError

WEIGHTS = ("geometric", "uniform")


def resolve_exits(spec: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The allowed exits, ascending, always ending with the final layer ``num_layers``.

    ``auto`` is the official code's rule for both of its models: every other layer from 3 in
    the first half, then every fourth, stopping short of the last two layers. Otherwise a
    comma list (or sequence) of layers in 1..L.
    """
    if isinstance(spec, str) and spec.strip() == "auto":
        first = list(range(3, (num_layers + 1) // 2, 2))
        later, layer = [], (first[-1] if first else 1) + 4
        while layer < num_layers - 1:
            later.append(layer)
            layer += 4
        return (*first, *later, num_layers)
    if isinstance(spec, str):
        try:
            layers = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise OptlabError(f"--exits {spec!r}: give 'auto' or layers such as 3,5,7") from None
    else:
        layers = [int(layer) for layer in spec]
    outside = [layer for layer in layers if not 1 <= layer <= num_layers]
    if outside:
        raise OptlabError(f"exit layer {outside[0]} is outside the model: it has {num_layers} "
                          f"layers, so exits are 1..{num_layers}")  # fmt: skip
    if not layers:
        raise OptlabError("no exit layers given: give 'auto' or layers such as 3,5,7")
    return tuple(sorted({*layers, num_layers}))


def exit_weights(
    exits: Sequence[int], num_layers: int, scheme: str = "geometric"
) -> tuple[float, ...]:
    """Loss weight of each exit (the final layer last); they sum to 1.

    ``geometric`` (the official fine-tuning script): the exits in the first half of the model
    share 0.7 and the later ones 0.2, each group in proportion to 0.9^k (earliest largest),
    and the final layer gets 0.1; a group that is empty passes its share to the final layer.
    ``uniform`` (the RL model files' loss): 1 / (|E| + 1) each.

    >>> [round(w, 4) for w in exit_weights((3, 5, 19, 32), 32)]
    [0.3684, 0.3316, 0.2, 0.1]
    """
    if scheme not in WEIGHTS:
        raise OptlabError(f"--weights {scheme!r}: choose one of {', '.join(WEIGHTS)}")
    if scheme == "uniform":
        return tuple(1.0 / len(exits) for _ in exits)
    early = [e for e in exits[:-1] if e <= num_layers // 2]
    late = [e for e in exits[:-1] if e > num_layers // 2]
    weights: list[float] = []
    final = 0.1
    for group, share in ((early, 0.7), (late, 0.2)):
        if not group:
            final += share
            continue
        powers = [0.9**k for k in range(len(group))]
        weights += [share * p / sum(powers) for p in powers]
    return (*weights, final)


def exit_logits(
    anatomy: Anatomy, hidden_states: Sequence[torch.Tensor], logits: torch.Tensor, layer: int
) -> torch.Tensor:
    """Logits of exit ``layer`` from a forward with ``output_hidden_states=True``."""
    if layer == len(anatomy.blocks):
        return logits
    return anatomy.logits(hidden_states[layer])


class ExitRule(Protocol):
    """Decides, at an allowed exit, whether the current token stops there.

    ``layer`` counts the blocks run so far; ``hidden`` is the token's state after them
    ([hidden_size], before the final norm). Decoders consult it at allowed exits below the
    final layer only.
    """

    def should_exit(self, layer: int, hidden: torch.Tensor) -> bool: ...


CONFIG_KEY = "early_exit"  # the HF config entry `exit train` writes (config.json keeps it)


def record_exits(model: nn.Module, exits: Sequence[int], weights: Sequence[float],
                 scheme: str) -> None:  # fmt: skip
    """Store the exit set a model was trained for in its HF config, so ``save_pretrained``
    writes it into ``config.json`` and every later load (optlab's or plain transformers')
    carries it."""
    setattr(model.config, CONFIG_KEY, {"exits": [int(e) for e in exits],
                                       "weights": [float(w) for w in weights],
                                       "scheme": scheme})  # fmt: skip


def exits_of(
    source: LoadedModel | nn.Module | str | Path, spec: str | Sequence[int] | None = None
) -> tuple[int, ...]:
    """The exits of a model, a model folder or a run directory: ``spec`` (``--exits``)
    resolved for its depth when given, else the set ``exit train`` stored in its config,
    else the ``auto`` rule.

    >>> exits_of(load_model("default"))       # an untrained model: the official rule
    (3, 5, 7, 9, 11, 13, 17, 21, 25, 30)
    >>> exits_of("runs/exit-3-5")             # an `exit train --exits 3,5` run
    (3, 5, 30)
    """
    if isinstance(source, LoadedModel):
        source = source.model
    if isinstance(source, nn.Module):
        config = source.config
    else:
        folder = Path(source)
        if not (folder / "config.json").is_file() and (folder / "model" / "config.json").is_file():
            folder = folder / "model"
        if not (folder / "config.json").is_file():
            raise OptlabError(f"{str(source)!r} holds no model (no config.json, nor model/)")
        from transformers import AutoConfig  # only paths need it

        config = AutoConfig.from_pretrained(folder)
    num_layers = int(config.num_hidden_layers)
    if spec is not None:
        return resolve_exits(spec, num_layers)
    record = getattr(config, CONFIG_KEY, None)
    if isinstance(record, dict) and isinstance(record.get("exits"), list):
        return resolve_exits(record["exits"], num_layers)
    return resolve_exits("auto", num_layers)
