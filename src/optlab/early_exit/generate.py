"""What ``optlab exit generate`` runs: its configs, its prompts, and one record per sample.

>>> config = GenerateConfig(exit="confidence", tau=0.8, kv="recompute")
>>> rows = generate_samples(load_model("tiny:llama"), config, ["def f(x):"], progress=False)
>>> sorted(rows[0])[:4], rows[0]["tokens"]
(['context_tokens', 'executed_layers', 'exit', 'kv_copied'], 15)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from optlab.core.anatomy import Anatomy
from optlab.core.config import configurable, option, require, require_positive
from optlab.core.data import read_jsonl
from optlab.core.files import read_text_file
from optlab.core.models import LoadedModel
from optlab.early_exit.decode import KV_MODES, Generation, generate, speculate
from optlab.early_exit.exits import exits_of, resolve_exits
from optlab.early_exit.rules import ExitHead, exit_rule, require_tau
from optlab.errors import OptlabError


@configurable("exit-generate")
@dataclass(frozen=True)
class GenerateConfig:
    """How each token exits, how the skipped layers' cache is filled, or exact speculation."""

    exit: str = option("none", "where a token stops: none (all layers), fixed:L, confidence "
                       "(max softmax of the exit's logits >= --tau, CALM), policy (the PPO "
                       "policy of --policy)", metavar="none|fixed:L|confidence|policy")  # fmt: skip
    tau: float = option(0.9, "threshold in (0, 1) of confidence and policy exits")
    kv: str = option("copy", "keys/values of the layers a token skipped: copy (run them on "
                     "the exit state, CALM) or recompute (lazily, when a later token goes "
                     "deeper: exact)", choices=KV_MODES)  # fmt: skip
    exits: str | None = option(None, "allowed exits: auto or L,L,... (default: the set an "
                               "`exit train` run stored, else auto)",
                               metavar="auto|L,L,...")  # fmt: skip
    policy: str | None = option(None, "a run of `optlab exit policy` (for --exit policy)",
                                metavar="DIR")  # fmt: skip
    speculative: int | None = option(None, "exact self-speculative decoding: draft with the "
                                     "first E layers and the shared head, verify with the "
                                     "full model (output = full greedy)", metavar="E")  # fmt: skip
    draft_tokens: int = option(4, "tokens drafted per round of --speculative")
    max_new_tokens: int = option(15, "tokens generated per prompt (GREEN-CODE: 15)")

    def __post_init__(self) -> None:
        require_positive(self, "draft_tokens", "max_new_tokens")
        require_tau(self.tau)
        require(self.kv in KV_MODES, f"--kv {self.kv!r}: choose copy or recompute")
        require(isinstance(self.exit, str) and (self.exit in ("none", "confidence", "policy")
                                                or self.exit.startswith("fixed:")),
                f"--exit {self.exit!r}: choose none, fixed:L, confidence or policy")  # fmt: skip
        if self.exits is not None:
            resolve_exits(self.exits, 10**6)  # the syntax now; the range once the model is known
        if self.speculative is not None:
            require(not isinstance(self.speculative, bool) and isinstance(self.speculative, int)
                    and self.speculative >= 1, f"--speculative must be a layer of at least 1, "
                    f"got {self.speculative!r}")  # fmt: skip
            require(self.exit == "none", "--speculative decodes exactly as the full model: "
                    f"it takes no --exit (got {self.exit!r})")  # fmt: skip


@configurable("exit-prompts")
@dataclass(frozen=True)
class PromptsConfig:
    """The prompts: one ``--prompt`` text, or a file of them (exactly one of the two)."""

    prompt: str | None = option(None, "the text to continue", metavar="TEXT")
    file: str | None = option(None, "prompts: a .jsonl of {\"context\": ...} (or \"prompt\") "
                              "objects, or a text file with one prompt per line", flag="--in",
                              metavar="FILE")  # fmt: skip

    def __post_init__(self) -> None:
        require((self.prompt is None) != (self.file is None),
                "give exactly one of --prompt TEXT and --in FILE")  # fmt: skip
        require(self.prompt is None or bool(self.prompt), "--prompt is empty")

    def texts(self) -> list[str]:
        if self.prompt is not None:
            return [self.prompt]
        assert self.file is not None
        if Path(self.file).suffix == ".jsonl":
            texts = []
            for number, obj in read_jsonl(self.file, "--in file"):
                text = next((obj[k] for k in ("context", "prompt") if isinstance(obj, dict)
                             and isinstance(obj.get(k), str)), None)  # fmt: skip
                if not text:
                    raise OptlabError(f"{self.file}:{number}: expected an object with a "
                                      "'context' (or 'prompt') text")  # fmt: skip
                texts.append(text)
        else:
            texts = [line for line in read_text_file(self.file, "--in file").splitlines()
                     if line.strip()]  # fmt: skip
        if not texts:
            raise OptlabError(f"{self.file}: no prompts in it")
        return texts


def prompt_ids(lm: LoadedModel, text: str) -> list[int]:
    """The prompt's tokens with the tokenizer's own special tokens (as ``generate`` sees it)."""
    ids = lm.tokenizer(text).input_ids
    if not ids:
        raise OptlabError(f"the prompt {text[:40]!r} has no tokens")
    return list(ids)


def decode_one(
    lm: LoadedModel, config: GenerateConfig, ids: Sequence[int], rule: Any, exits: Sequence[int],
    head: ExitHead,
) -> Generation:  # fmt: skip
    """One prompt's continuation under ``config`` (a rule from :func:`exit_rule`)."""
    if config.speculative is not None:
        return speculate(lm, ids, config.speculative, draft_tokens=config.draft_tokens,
                         max_new_tokens=config.max_new_tokens)  # fmt: skip
    return generate(lm, ids, rule, exits, kv=config.kv, max_new_tokens=config.max_new_tokens,
                    head=head)  # fmt: skip


def generate_samples(
    lm: LoadedModel,
    config: GenerateConfig,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Decode every prompt (a text, or token ids as given: a completion sample's cut
    context, which decoding and re-encoding may not reproduce); per sample its text,
    tokens, layers run per token (mean and each), context tokens, seconds and tokens/s
    (with ``speculative``: drafted, accepted, acceptance)."""
    anatomy = Anatomy.of(lm.model)
    num_layers = len(anatomy.blocks)
    if config.speculative is not None and not 1 <= config.speculative < num_layers:
        raise OptlabError(f"--speculative {config.speculative}: the draft exit must be in "
                          f"1..{num_layers - 1} (the model has {num_layers} layers)")  # fmt: skip
    head = ExitHead(anatomy)
    allowed = exits_of(lm, config.exits)
    rule, exits = exit_rule(config.exit, lm, allowed, config.tau, head=head,
                            policy=config.policy)  # fmt: skip
    encoded = [prompt_ids(lm, p) if isinstance(p, str) else list(p) for p in prompts]
    rows = []
    for prompt, ids in zip(tqdm(prompts, desc="samples", disable=not progress or None,
                                leave=False), encoded, strict=True):  # fmt: skip
        out = decode_one(lm, config, ids, rule, exits, head)
        text = prompt if isinstance(prompt, str) else lm.tokenizer.decode(ids)
        row: dict[str, Any] = {
            "prompt": text, "context_tokens": len(ids),
            "text": lm.tokenizer.decode(out.tokens), "tokens": len(out.tokens),
            "layers": out.mean_layers, "executed_layers": out.layers, "seconds": out.seconds,
            "tokens_per_second": out.tokens_per_second,
            "exit": "speculative" if config.speculative is not None else config.exit,
        }  # fmt: skip
        if config.speculative is not None:
            row |= {"drafted": out.drafted, "accepted": out.accepted,
                    "acceptance": out.acceptance, "rounds": out.rounds,
                    "recomputed": out.recomputed}  # fmt: skip
        else:
            row |= {"recomputed": out.recomputed, "kv_copied": out.filled}
        rows.append(row)
    return rows


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over samples; tokens/s as total tokens over total seconds."""
    tokens = sum(r["tokens"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    layers = sum(r["layers"] * r["tokens"] for r in rows)
    out = {"samples": len(rows), "tokens": tokens, "seconds": seconds,
           "tokens_per_second": tokens / seconds if seconds else 0.0,
           "layers": layers / tokens if tokens else 0.0}  # fmt: skip
    if rows and "drafted" in rows[0]:
        drafted = sum(r["drafted"] for r in rows)
        out["acceptance"] = sum(r["accepted"] for r in rows) / drafted if drafted else None
    return out
