"""A Hugging Face tokenizer as GGUF metadata: the vocabulary, merges, special ids and chat
template, under the keys llama.cpp reads (``tokenizer.ggml.*``).

Two kinds of BPE vocabulary are written, as llama.cpp's converter does:

* byte-level BPE (GPT-2, SmolLM2, Qwen2, Pythia): ``tokenizer.ggml.model = "gpt2"``, tokens in
  the byte alphabet, the merges, and a pre-tokenizer name (``tokenizer.ggml.pre``);
* sentencepiece-style BPE with byte fallback (Llama 2, Gemma): ``"llama"``, tokens with their
  scores (here ``-id``: the vocabulary is in merge order) and types (byte tokens ``<0xXX>``).

The list is padded to the embedding's rows with unused ``[PADn]`` tokens, as llama.cpp does.
llama.cpp picks a byte-level vocabulary's pre-tokenizer by name; optlab writes the family's
(``gpt-2``, ``qwen2``), or ``smollm`` for the default model's vocabulary (read from the shipped
file), else ``default``.

>>> write_vocab(writer, lm.tokenizer, vocab_size=49152, pre="default")
"""

from __future__ import annotations

import json
from typing import Any

import gguf
from transformers import PreTrainedTokenizerBase

from optlab.core.models import default_gguf_path
from optlab.errors import OptlabError

FAMILY_PRE = {"gpt2": "gpt-2", "qwen2": "qwen2", "gptneox": "gpt-2"}


def _shipped_pre(tokens: list[str]) -> str | None:
    """The pre-tokenizer of the shipped default GGUF if ``tokens`` are its vocabulary."""
    path = default_gguf_path()
    if path is None:
        return None
    reader = gguf.GGUFReader(path)
    field = reader.fields["tokenizer.ggml.tokens"]
    if len(field.data) != len(tokens):
        return None
    shipped = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return str(reader.fields["tokenizer.ggml.pre"].contents()) if shipped == tokens else None


def _flags(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS to a plain text (what llama.cpp is told to do)."""
    ids = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    eos = tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id
    return bos, eos


def write_vocab(
    writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int, arch: str
) -> dict[str, Any]:
    """Add the tokenizer's keys to ``writer``; return a summary (kind, pre, tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise OptlabError("GGUF export needs a fast (tokenizers) tokenizer")
    data = json.loads(backend.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise OptlabError(f"cannot write a {model.get('type')} tokenizer to GGUF; optlab "
                          "writes BPE vocabularies (byte-level or sentencepiece)")  # fmt: skip
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise OptlabError(f"the tokenizer has {len(vocab)} tokens, more than the model's "
                          f"{vocab_size} embedding rows")  # fmt: skip
    added = tokenizer.added_tokens_decoder
    sentencepiece = bool(model.get("byte_fallback"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
        if index in added:
            types[index] = gguf.TokenType.CONTROL if added[index].special else (
                gguf.TokenType.USER_DEFINED)  # fmt: skip
        elif sentencepiece and token.startswith("<0x") and len(token) == 6:
            types[index] = gguf.TokenType.BYTE
        else:
            types[index] = gguf.TokenType.NORMAL
    if tokenizer.unk_token_id is not None and sentencepiece:
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        pre = "default"
        writer.add_token_scores([-float(i) for i in range(vocab_size)])
        # A space is prepended to the text by a Metaspace pre-tokenizer (unless "never") or a
        # Prepend normalizer: llama.cpp's add_space_prefix.
        steps = json.dumps([data.get("pre_tokenizer"), data.get("normalizer")])
        prefix = '"Prepend"' in steps or any(f'"prepend_scheme": "{s}"' in steps
                                             for s in ("always", "first"))  # fmt: skip
        writer.add_add_space_prefix(prefix)
    else:
        writer.add_tokenizer_model("gpt2")
        pre = _shipped_pre(tokens) if vocab_size == len(vocab) else None
        pre = pre or FAMILY_PRE.get(arch, "default")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    elif not sentencepiece:
        # GGUF has no empty arrays: a vocabulary without merges (bytes only) states scores
        # instead, from which readers derive the (here absent) merges.
        writer.add_token_scores([-float(i) for i in range(vocab_size)])
    for kind, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    add_bos, add_eos = _flags(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)
    return {"kind": "llama" if sentencepiece else "gpt2", "pre": pre, "tokens": vocab_size}
