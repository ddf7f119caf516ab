"""Forget / retain data: question-answer pairs or plain documents, tokenised so that losses
see answer tokens only.

A question-answer pair renders as ``### Question: {q}\\n ### Answer: {a}`` (the format of
Yao et al.'s code); the loss covers the answer tokens. A document has no question: the loss
covers all of it. Padding is marked by the attention mask and ``-100`` labels, never by a pad
id, so any tokenizer works (OPT's pad id 1 is not assumed, as the reference code did).

>>> examples = load_examples("forget.jsonl")      # {"question": ..., "answer": ...} lines
>>> batch = encode(tokenizer, examples[:2])
>>> batch.labels                                   # -100 on question tokens and padding
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from optlab.core.data import read_jsonl, read_text_file
from optlab.errors import OptlabError

IGNORE = -100  # label of a position the loss skips (question tokens, padding)


@dataclass(frozen=True)
class Example:
    """A question-answer pair, or a document when ``question`` is None."""

    answer: str
    question: str | None = None

    @property
    def prompt(self) -> str:
        """What the model is given before the answer ("" for a document)."""
        return "" if self.question is None else f"### Question: {self.question}\n ### Answer:"

    @property
    def text(self) -> str:
        return self.answer if self.question is None else f"{self.prompt} {self.answer}"

    def to_json(self) -> dict[str, str]:
        if self.question is None:
            return {"text": self.answer}
        return {"question": self.question, "answer": self.answer}


@dataclass
class Batch:
    """Right-padded token ids with the attention mask and the answer-only labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def load_examples(path: str | Path) -> list[Example]:
    """Read a ``.jsonl`` file of ``{"question", "answer"}`` (or ``{"text"}``) objects, or a
    ``.txt`` file of documents separated by blank lines."""
    path = data_file(path)
    if path.suffix == ".txt":
        docs = re.split(r"\n\s*\n", read_text_file(path, "data file", allow_empty=True))
        examples = [Example(doc.strip()) for doc in docs if doc.strip()]
    else:
        examples = [_example(obj, path, n) for n, obj in read_jsonl(path, "data file")]
    if not examples:
        raise OptlabError(f"{path} holds no examples")
    return examples


def data_file(path: str | Path, suffixes: tuple[str, ...] = (".jsonl", ".txt")) -> Path:
    """``path`` as a file that exists and has a readable suffix (checked before any work)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OptlabError(f"data file {str(path)!r} is a folder, not a file")
    if not path.is_file():
        raise OptlabError(f"data file not found: {str(path)!r} (no such file)")
    if path.suffix not in suffixes:
        raise OptlabError(f"unsupported data file {path}: use {' or '.join(suffixes)}")
    return path


def _example(obj: object, path: Path, number: int) -> Example:
    if isinstance(obj, dict) and isinstance(obj.get("question"), str):
        if not isinstance(obj.get("answer"), str) or not obj["answer"].strip():
            raise OptlabError(f"{path}:{number}: 'answer' must be a non-empty string")
        return Example(obj["answer"].strip(), obj["question"].strip())
    if isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip():
        return Example(obj["text"].strip())
    raise OptlabError(f"{path}:{number}: expected {{'question', 'answer'}} or {{'text'}}")


RUN_SETS = ("forget", "retain", "holdout")


def run_sets(folder: str | Path) -> dict[str, list[Example]]:
    """The forget, retain and holdout sets an ``optlab unlearn`` run saved (an empty set is
    saved as an empty file)."""
    sets = {}
    for part in RUN_SETS:
        path = Path(folder) / f"{part}.jsonl"
        text = read_text_file(path, f"{part} set", allow_empty=True)
        sets[part] = load_examples(path) if text.strip() else []
    return sets


def save_examples(path: Path, examples: Sequence[Example]) -> None:
    from optlab.core.run import atomic_write

    atomic_write(path, "".join(json.dumps(e.to_json()) + "\n" for e in examples))


def encode(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int = 256
) -> Batch:
    """Tokenise, right-pad and label: prompt tokens and padding get ``IGNORE``.

    The prompt is tokenised on its own and the answer after it, so the boundary is exact for
    any tokenizer (a merged token across the boundary cannot leak question text into the
    loss). Sequences longer than ``max_length`` keep their start.
    """
    if not examples:
        raise OptlabError("no examples to encode")
    # A document's first token is scored after a prefix token, as the Scorer does; a
    # question is encoded bare, exactly as Scorer.generate will be prompted with it.
    prefix = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    rows, label_rows = [], []
    for example in examples:
        prompt = _ids(tokenizer, example.prompt) if example.question is not None else [prefix]
        answer = _ids(tokenizer, (" " if example.question is not None else "") + example.answer)
        ids = (prompt + answer)[:max_length]
        labels = ([IGNORE] * len(prompt) + answer)[:max_length]
        if all(label == IGNORE for label in labels):
            raise OptlabError(f"example {example.text[:60]!r} has no answer token within "
                              f"{max_length} tokens")  # fmt: skip
        rows.append(ids)
        label_rows.append(labels)
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # pad value never read
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, labs) in enumerate(zip(rows, label_rows, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, : len(labs)] = torch.tensor(labs)
    return Batch(input_ids, mask, labels)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def passages(
    tokenizer: PreTrainedTokenizerBase, text: str, tokens: int, limit: int | None = None
) -> list[Example]:
    """Cut ``text`` into consecutive documents of ``tokens`` tokens (decoded back to text)."""
    ids = _ids(tokenizer, text)
    chunks = [ids[i : i + tokens] for i in range(0, len(ids) - tokens + 1, tokens)][:limit]
    if not chunks:
        raise OptlabError(f"text has {len(ids)} tokens; a passage needs {tokens}")
    return [Example(tokenizer.decode(chunk).strip()) for chunk in chunks]
