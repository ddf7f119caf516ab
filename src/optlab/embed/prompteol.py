"""PromptEOL sentence embeddings from a causal LM (Jiang et al. 2023, arXiv 2307.16645).

Each sentence is wrapped in ``This sentence : "[X]" means in one word:"`` (optionally after
one in-context demonstration), and its embedding is the last layer's hidden state at the
prompt's last token; similarity is the cosine. The encoder follows sentence-transformers'
``encode()`` so it fits the hands of people who use that library.

>>> embedder = Embedder(load_model("tiny:llama"))
>>> embedder.encode(["A man is playing a guitar.", "Someone plays music."]).shape
(2, 64)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from optlab.core.config import configurable, option, require, require_positive
from optlab.core.files import read_json_object
from optlab.core.models import LoadedModel
from optlab.core.run import atomic_write
from optlab.errors import OptlabError

TEMPLATE = 'This sentence : "{}" means in one word:"'  # the paper's, to the character
PROMPT_FILE = "prompt.json"  # beside a saved model: the template and demo it embeds with
# The demonstrations the paper chose per OPT size (spec section 2), by preset name.
PRESETS: dict[str, tuple[str, str]] = {
    "opt-125m": ("A man is smoking.", "Smoking"),
    "opt-350m": ("A man is playing on a guitar and singing.", "Music"),
    "opt-1.3b": ("relating to switzerland or its people.", "Swiss"),
    "opt-2.7b": ("A jockey riding a horse.", "Equestrian"),
    "opt-6.7b": ("The man is riding a horse.", "Horseback-riding"),
    "opt-13b": ("meat from a deer.", "Venison"),
}


def one_word_demo(sentence: str, word: str, where: str) -> tuple[str, str]:
    """A (sentence, word) demonstration, stripped; ``where`` names its source in errors."""
    sentence, word = sentence.strip(), word.strip()
    require(bool(sentence and word), f"{where}: a demonstration needs a sentence and a word")
    require(len(word.split()) == 1, f"{where}: the answer must be one word, got {word!r}")
    return sentence, word


def prompt_file(spec: str | Path) -> Path | None:
    """The ``prompt.json`` of a run (in it or in its ``model/``), a folder, or the file itself."""
    path = Path(spec).expanduser()
    for file in (path / "model" / PROMPT_FILE, path / PROMPT_FILE, path):
        if file.is_file() and file.name == PROMPT_FILE:
            return file
    return None


@lru_cache(maxsize=16)
def _saved_prompt(path: Path, modified: int) -> tuple[tuple[str, str] | None, bool]:
    """(demonstration, preprocess) of a ``prompt.json``, read once per version of the file:
    prompts are built per sentence."""
    record = read_json_object(path, "prompt file")
    try:
        template, demo = record["template"], record["demo"]
        pair = None if demo is None else one_word_demo(demo["sentence"], demo["word"], str(path))
    except (KeyError, TypeError, AttributeError) as err:
        raise OptlabError(f"{path} is damaged ({type(err).__name__}: {err})") from None
    require(template == TEMPLATE, f"{path}: template {template!r} is not PromptEOL's "
            f"{TEMPLATE!r}, the only one optlab embeds with")  # fmt: skip
    return pair, bool(record.get("preprocess", True))


def read_prompt(spec: str | Path) -> tuple[tuple[str, str] | None, bool] | None:
    """(demonstration, preprocess) saved in a run or folder's ``prompt.json``, if it has one."""
    file = prompt_file(spec)
    return None if file is None else _saved_prompt(file.resolve(), file.stat().st_mtime_ns)


def read_demo(spec: str | Path) -> tuple[str, str]:
    """The demonstration saved in a run (``select-demo``'s, or a trained model's prompt)."""
    saved = read_prompt(spec)
    if saved is None or saved[0] is None:
        what = f"no {PROMPT_FILE}" if saved is None else f"its {PROMPT_FILE} has no demonstration"
        raise OptlabError(f"--demo {str(spec)!r}: {what} (give a select-demo run folder, a "
                          "preset or 'SENTENCE=>WORD')")  # fmt: skip
    return saved[0]


def preprocess(sentence: str) -> str:
    """The official evaluation's clean-up: end with a full stop unless the sentence ends in
    one of ``.?"'``, double quotes become single ones, and a final ``?`` becomes ``.``."""
    if not sentence or sentence[-1] not in ".?\"'":
        sentence += "."
    sentence = sentence.replace('"', "'")
    if sentence.endswith("?"):
        sentence = sentence[:-1] + "."
    return sentence


@configurable("prompteol")
@dataclass(frozen=True)
class PromptEOLConfig:
    """The prompt around each sentence: the template, and one optional demonstration
    (``demo``: a preset name such as ``opt-2.7b``, ``SENTENCE=>WORD``, or a ``select-demo``
    run folder or its ``demo.json``).

    >>> print(PromptEOLConfig(demo="opt-2.7b").prompt('He said "hi"?'))
    This sentence : "A jockey riding a horse." means in one word:"Equestrian".This sentence : "He said 'hi'." means in one word:"
    """  # noqa: E501

    demo: str | None = option(None, "one in-context demonstration: a preset (opt-125m ... "
                              "opt-13b), 'SENTENCE=>WORD' or a select-demo run folder",
                              metavar="DEMO")  # fmt: skip
    preprocess: bool = option(True, "keep sentences as given (no end-of-sentence clean-up)",
                              flag="--no-preprocess")  # fmt: skip
    batch_size: int = option(32, "sentences per forward pass")

    def __post_init__(self) -> None:
        require_positive(self, "batch_size")
        self.demonstration()  # a malformed demo fails here

    def demonstration(self) -> tuple[str, str] | None:
        if self.demo is None:
            return None
        if self.demo in PRESETS:
            return PRESETS[self.demo]
        sentence, arrow, word = self.demo.rpartition("=>")  # the word has no "=>" in it
        if not arrow and (self.demo.endswith(".json") or Path(self.demo).expanduser().is_dir()):
            return read_demo(self.demo)
        require(bool(arrow and sentence.strip() and word.strip()), f"--demo {self.demo!r}: give "
                f"a preset ({', '.join(PRESETS)}), 'SENTENCE=>WORD' or a select-demo run "
                "folder")  # fmt: skip
        return one_word_demo(sentence, word, f"--demo {self.demo!r}")

    def save(self, folder: str | Path) -> Path:
        """Write the template and demonstration to ``folder/prompt.json`` (atomically)."""
        demo = self.demonstration()
        pair = None if demo is None else {"sentence": demo[0], "word": demo[1]}
        record = {"template": TEMPLATE, "demo": pair, "preprocess": self.preprocess}
        path = Path(folder) / PROMPT_FILE
        atomic_write(path, json.dumps(record, indent=2) + "\n")
        return path

    @classmethod
    def saved(cls, spec: str | Path) -> PromptEOLConfig | None:
        """The prompt a model folder or run was saved with (its ``prompt.json``), if any."""
        saved = read_prompt(spec)
        if saved is None:
            return None
        demo, preprocess = saved
        return cls(demo=None if demo is None else "=>".join(demo), preprocess=preprocess)

    def prompt(self, sentence: str) -> str:
        """The full prompt of one sentence (demonstration first, with no separator)."""
        text = preprocess(sentence) if self.preprocess else sentence
        demo = self.demonstration()
        prefix = "" if demo is None else TEMPLATE.format(demo[0]) + f'{demo[1]}".'
        return prefix + TEMPLATE.format(text)


def left_padded(ids: list[list[int]], pad: int | None, device: torch.device) -> dict[str, Any]:
    """A left-padded batch (``input_ids``, ``attention_mask``, ``position_ids``): the last
    position is every row's last token, and positions count from each row's first real token
    so that padding changes nothing."""
    width = max(len(row) for row in ids)
    tokens = torch.full((len(ids), width), 0 if pad is None else pad, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for index, row in enumerate(ids):
        tokens[index, width - len(row) :] = torch.tensor(row)
        mask[index, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": tokens.to(device), "attention_mask": mask.to(device),
            "position_ids": positions.to(device)}  # fmt: skip


class Embedder:
    """Sentence embeddings of a causal LM by PromptEOL, with sentence-transformers' encode().

    Batches are sorted by length and left-padded with positions counted from each row's first
    real token, so a sentence's embedding does not depend on its batch; only the base model
    runs (the last layer's state after its final norm, and OPT-350m's ``project_out``): no LM
    head, no logits.
    """

    def __init__(self, lm: LoadedModel, config: PromptEOLConfig | None = None) -> None:
        self.lm = lm
        # A saved embedder (a trained run) brings its own prompt when none is given.
        self.config = config or PromptEOLConfig.saved(lm.spec) or PromptEOLConfig()
        self.base = lm.model.base_model  # the decoder stack without the LM head
        config = self.base.config  # OPT-350m projects its 1024-wide states out to 512
        self.dimension = int(getattr(config, "word_embed_proj_dim", None) or config.hidden_size)

    def encode(
        self,
        inputs: str | Sequence[str] | None = None,
        *,
        sentences: str | Sequence[str] | None = None,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        normalize_embeddings: bool = False,
        convert_to_tensor: bool = False,
        convert_to_numpy: bool = True,
        **_: Any,
    ) -> np.ndarray | torch.Tensor:
        """Embed texts: an [n, d] float32 array (one text: [d]), as sentence-transformers'
        ``encode`` returns; ``sentences=`` is accepted as its older name."""
        texts = sentences if inputs is None else inputs
        if texts is None:
            raise OptlabError("encode() needs the texts to embed")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts:
            raise OptlabError("no texts to embed")
        prompts = [self.config.prompt(t) for t in texts]
        embeddings = self._embed(prompts, batch_size or self.config.batch_size,
                                 show_progress_bar)  # fmt: skip
        if normalize_embeddings:
            embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
        result: np.ndarray | torch.Tensor = embeddings
        if not convert_to_tensor and convert_to_numpy:
            result = embeddings.numpy()
        return result[0] if single else result

    @torch.inference_mode()
    def _embed(self, prompts: list[str], batch_size: int, progress: bool | None) -> torch.Tensor:
        tokenizer, device = self.lm.tokenizer, self.lm.device
        ids = tokenizer(prompts)["input_ids"]  # default special tokens (OPT: </s>); batched
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # little padding per batch
        out = torch.empty(len(ids), self.dimension, dtype=torch.float32)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="embed", leave=False,
                          disable=(not progress) if progress is not None else None):  # fmt: skip
            inputs = left_padded([ids[i] for i in batch], tokenizer.pad_token_id, device)
            hidden = self.base(**inputs, use_cache=False).last_hidden_state
            out[batch] = hidden[:, -1].float().cpu()
        return out

    @staticmethod
    def similarity(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
        """Cosine similarity of every row of ``a`` with every row of ``b``: [len(a), len(b)]."""
        a, b = (np.atleast_2d(np.asarray(x, dtype=np.float64)) for x in (a, b))
        a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
        b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
        return a @ b.T
