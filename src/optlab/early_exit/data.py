"""Code-completion data: source files split by file into train / dev / test, packed training
windows, and completion samples cut as in GREEN-CODE's evaluation.

Data specs (``--data``):

- ``code:stdlib``: the Python standard library this interpreter ships
  (``sysconfig.get_paths()["stdlib"]``), every ``.py`` file outside test suites,
  ``site-packages`` and the machine-generated ``_sysconfigdata*`` modules.
- ``code:FOLDER``: the source files under a folder whose names end in one of ``extensions``.
  A folder holding CodeXGLUE's ``train.txt`` / ``dev.txt`` / ``test.txt`` (the token-level
  code-completion sets, PY150 and JavaCorpus) is read as that data set, with its own splits.
- ``code:FILE.txt``: one CodeXGLUE sample per line (``<s> ... <EOL> ... </s>``).
- ``code:FILE.jsonl``: ``{"context": ..., "target": ...}`` objects (CodeXGLUE's line-level
  ``{"input": ..., "gt": ...}`` too): completion pairs whose split point is given.

**Splits.** Every item (a file, a line of a ``.txt``, an object of a ``.jsonl``) falls in one
split by a SHA-256 hash of its name (the path relative to the folder, with ``/``; the
content for lines and objects): the first 8 bytes as a fraction in [0, 1), below 0.8 train,
below 0.9 dev, else test. The rule needs no file list, so it is the same on every machine,
and a Python release that adds or drops a file moves no other file between splits. The
``all`` split is every item. CodeXGLUE text lines keep the data set's form, as the official
code reads them: the tokens joined by spaces, ``<s>`` / ``</s>`` dropped, ``<EOL>`` kept.

>>> train = code_items("code:stdlib", "train")
>>> test = code_items("code:stdlib", "test")
>>> {item.name for item in train} & {item.name for item in test}
set()
>>> samples = completion_samples(test[:2], tokenizer, CompletionConfig())
>>> samples[0].context_ids.shape, samples[0].target   # 20% of the file, then 15 tokens
"""

from __future__ import annotations

import functools
import hashlib
import random
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from optlab.core.config import configurable, option, require, require_positive
from optlab.core.data import read_jsonl, read_text_file
from optlab.errors import OptlabError

SPLITS = ("train", "dev", "test", "all")
SPLIT_BOUNDS = {"train": (0.0, 0.8), "dev": (0.8, 0.9), "test": (0.9, 1.0)}
CODE_EXTENSIONS = (".py", ".java", ".js", ".ts", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs",
                   ".go", ".rs", ".rb", ".php", ".kt", ".scala", ".swift", ".lua")  # fmt: skip
CODEXGLUE_SPLITS = {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"}
# Test suites are repetitive assertion code with deliberately malformed files; config-* and
# _sysconfigdata* are generated for the machine that built Python.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@configurable("code-data")
@dataclass(frozen=True)
class CodeDataConfig:
    """Where the code comes from (see the module's docstring for the specs and splits)."""

    data: str = option("code:stdlib", "code: code:stdlib, code:FOLDER (source files), "
                       "code:FILE.txt (CodeXGLUE lines) or code:FILE.jsonl ({context, "
                       "target})", metavar="SPEC")  # fmt: skip
    extensions: tuple[str, ...] = option(
        CODE_EXTENSIONS, "file name endings read from a code:FOLDER", metavar="EXT,..."
    )

    def __post_init__(self) -> None:
        require(self.data.startswith("code:") and len(self.data) > 5,
                f"--data {self.data!r}: give code:stdlib, code:FOLDER, code:FILE.txt or "
                "code:FILE.jsonl")  # fmt: skip
        require(bool(self.extensions) and all(e.strip() for e in self.extensions),
                "--extensions: give file name endings such as .py,.java")  # fmt: skip


@configurable("completion")
@dataclass(frozen=True)
class CompletionConfig:
    """How a completion sample is cut: GREEN-CODE's evaluation gives the model the first 20%
    of a sample's tokens and compares 15 greedy tokens with the next 15 of the sample."""

    context_fraction: tuple[float, ...] = option(
        (0.2,), "share of a sample's tokens given as context: one value, or LOW,HIGH for a "
        "seeded U(LOW, HIGH) per sample (policy episodes: 0.2,0.5)", metavar="F[,F]"
    )  # fmt: skip
    new_tokens: int = option(15, "tokens to complete (the reference is the sample's next ones)")
    max_context: int = option(
        2048, "longest context in tokens (the official cap); a longer cut is shortened to it"
    )
    samples: int | None = option(
        1000, "samples drawn (seeded, in data order); 0 or none for all", metavar="N"
    )
    seed: int = option(0, "seed of the sample draw and of U(LOW, HIGH) context fractions (the "
                       "command's --seed)", cli=False)  # fmt: skip

    def __post_init__(self) -> None:
        require_positive(self, "new_tokens", "max_context")
        fractions = self.context_fraction
        require(len(fractions) in (1, 2) and all(0 < f < 1 for f in fractions)
                and list(fractions) == sorted(fractions),
                f"--context-fraction {','.join(map(str, fractions))}: give a share in (0, 1), "
                "or LOW,HIGH with 0 < LOW <= HIGH < 1")  # fmt: skip
        require(
            self.samples is None or (isinstance(self.samples, int) and self.samples >= 0),
            f"--samples must be a whole number (0 for all), got {self.samples!r}",
        )


@dataclass(frozen=True)
class CodeItem:
    """One sample of code: a whole file (or CodeXGLUE line), or a given completion pair.

    ``name`` identifies it within its source (a relative path, or ``FILE:LINE``). A pair
    has ``context`` set and ``text`` = context + target; a file is cut by the sampler.
    """

    name: str
    text: str
    context: str | None = None


@dataclass(frozen=True)
class Sample:
    """A completion task: the context's token ids and the reference continuation."""

    name: str
    context_ids: torch.Tensor  # [n] long, the tokenizer's own special tokens included
    target_ids: torch.Tensor  # [<= new_tokens] long (a given pair's target: all of it)
    target: str


def split_of(key: str) -> str:
    """The split of an item named ``key``, from its SHA-256 (stable anywhere, any time).

    >>> split_of("json/decoder.py")
    'train'
    """
    digest = hashlib.sha256(("optlab-code-split:" + key).encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return next(name for name, (low, high) in SPLIT_BOUNDS.items() if low <= position < high)


def code_items(
    spec: str, split: str, extensions: Sequence[str] = CODE_EXTENSIONS
) -> list[CodeItem]:
    """The items of data spec ``spec`` in ``split`` (train, dev, test or all), in a fixed
    order (sorted names; file order for lines and objects)."""
    if split not in SPLITS:
        raise OptlabError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    if not spec.startswith("code:") or spec == "code:":
        raise OptlabError(f"--data {spec!r}: give code:stdlib, code:FOLDER, code:FILE.txt or "
                          "code:FILE.jsonl")  # fmt: skip
    target = spec[len("code:") :]
    if target == "stdlib":
        items = list(_stdlib_items())
    else:
        path = Path(target).expanduser()
        # A .jsonl / .txt name is a file, whatever is there: read_text_file says what is wrong.
        if path.suffix == ".jsonl":
            items = _pair_items(path)
        elif path.suffix == ".txt":
            items = _codexglue_items(path)
        elif path.is_dir() and all((path / f).is_file() for f in CODEXGLUE_SPLITS.values()):
            return _codexglue_split(path, split)
        elif path.is_dir():
            items = _folder_items(path, tuple(extensions))
        elif path.exists():
            raise OptlabError(f"--data {spec!r}: use a folder, a .txt (CodeXGLUE lines) or a "
                              ".jsonl file")  # fmt: skip
        else:
            raise OptlabError(f"--data {spec!r}: no such file or folder (or give code:stdlib)")
    if not items:
        raise OptlabError(f"--data {spec!r} holds no code"
                          + (f" (no files ending in {','.join(extensions)})"
                             if Path(target).is_dir() else ""))  # fmt: skip
    return _in_split(items, split, by_content=not Path(target).is_dir() and target != "stdlib")


def code_texts(spec: str, split: str, extensions: Sequence[str] = CODE_EXTENSIONS) -> list[str]:
    """The whole text of each item in ``split`` (training text)."""
    return [item.text for item in code_items(spec, split, extensions)]


def _in_split(items: list[CodeItem], split: str, *, by_content: bool) -> list[CodeItem]:
    if split == "all":
        return items
    # Lines and objects split by content, so a duplicate never lands in two splits.
    return [i for i in items if split_of(i.text if by_content else i.name) == split]


@functools.cache
def _stdlib_items() -> tuple[CodeItem, ...]:
    return tuple(_folder_items(Path(sysconfig.get_paths()["stdlib"]), (".py",), stdlib=True))


def _folder_items(
    root: Path, extensions: tuple[str, ...], *, stdlib: bool = False
) -> list[CodeItem]:
    items = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or not path.name.endswith(extensions):
            continue
        if stdlib and (_SKIPPED_DIRS.intersection(relative.parts[:-1])
                       or relative.parts[0].startswith("config-")
                       or path.name.startswith("_sysconfigdata")):  # fmt: skip
            continue
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (UnicodeDecodeError, OSError):
            continue  # not UTF-8 text (a binary or legacy-encoded file): not a sample
        if text.strip():
            items.append(CodeItem(relative.as_posix(), text.replace("\r\n", "\n")))
    return items


def _codexglue_text(line: str) -> str:
    tokens = line.split()
    return " ".join(t for t in tokens if t not in ("<s>", "</s>"))


def _codexglue_items(path: Path) -> list[CodeItem]:
    lines = read_text_file(path, "CodeXGLUE file").splitlines()
    return [CodeItem(f"{path.name}:{n}", _codexglue_text(line))
            for n, line in enumerate(lines, 1) if _codexglue_text(line)]  # fmt: skip


def _codexglue_split(folder: Path, split: str) -> list[CodeItem]:
    names = CODEXGLUE_SPLITS.values() if split == "all" else [CODEXGLUE_SPLITS[split]]
    items = [item for name in names for item in _codexglue_items(folder / name)]
    if not items:
        raise OptlabError(f"CodeXGLUE folder {str(folder)!r} holds no samples for {split}")
    return items


def _pair_items(path: Path) -> list[CodeItem]:
    items = []
    for number, obj in read_jsonl(path, "completion file"):
        keys = next((k for k in (("context", "target"), ("input", "gt"))
                     if isinstance(obj, dict) and all(isinstance(obj.get(x), str) for x in k)),
                    None)  # fmt: skip
        if keys is None:
            raise OptlabError(f"{path}:{number}: expected an object with string 'context' and "
                              "'target' fields (or CodeXGLUE's 'input' and 'gt')")  # fmt: skip
        context, target = obj[keys[0]], obj[keys[1]]
        if keys[0] == "input":  # CodeXGLUE line-level: the same token form as its .txt files
            context = _codexglue_text(context)
        items.append(CodeItem(f"{path.name}:{number}", context + target, context))
    return items


def completion_samples(
    items: Sequence[CodeItem], tokenizer: PreTrainedTokenizerBase, config: CompletionConfig
) -> list[Sample]:
    """Completion samples from ``items``, cut as the official evaluation does.

    A file is tokenized whole with the tokenizer's own special tokens; its context is the
    first ``int(n * fraction)`` tokens (at most ``max_context``) and the reference is the
    next ``new_tokens`` tokens. Items too short for one context and one target token are
    skipped. ``samples`` items are drawn with the seed (kept in data order) before cutting;
    with a LOW,HIGH fraction each sample draws its own, from the same seed.
    """
    rng = random.Random(config.seed)
    chosen = list(items)
    if config.samples and config.samples < len(chosen):
        keep = sorted(rng.sample(range(len(chosen)), config.samples))
        chosen = [chosen[i] for i in keep]
    samples = []
    for item in chosen:
        fraction = config.context_fraction[0]
        if len(config.context_fraction) == 2:
            fraction = rng.uniform(*config.context_fraction)
        if item.context is not None:
            context_ids = _encode(tokenizer, item.context)[-config.max_context :]
            target_ids = _encode(tokenizer, item.text[len(item.context) :], special=False)
            target = item.text[len(item.context) :]
        else:
            ids = _encode(tokenizer, item.text)
            cut = min(int(len(ids) * fraction), config.max_context)
            context_ids, target_ids = ids[:cut], ids[cut : cut + config.new_tokens]
            target = tokenizer.decode(target_ids)
        if len(context_ids) and len(target_ids):
            samples.append(Sample(item.name, context_ids, target_ids, target))
    if not samples:
        raise OptlabError("no completion samples: every item is too short to cut a context "
                          "and a target from")  # fmt: skip
    return samples


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, *, special: bool = True) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def packed_windows(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    limit: int | None = None,
) -> torch.Tensor:
    """Training windows [n, seq_len]: the texts' tokens joined by the EOS token and cut into
    consecutive windows (packing, as the paper's ConstantLengthDataset); tokenizing stops once
    ``limit`` windows are full, so a short run reads only what it needs."""
    if seq_len < 1:
        raise OptlabError(f"--context-length must be at least 1, got {seq_len}")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    need = None if limit is None else limit * seq_len
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        stream += separator
        if need is not None and len(stream) >= need:
            break
    count = len(stream) // seq_len if limit is None else min(limit, len(stream) // seq_len)
    if count < 1:
        raise OptlabError(f"the code holds {len(stream)} tokens; one window needs {seq_len}")
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)
