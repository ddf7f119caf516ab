"""Write a model (dense, pruned or optlab-quantized) as one GGUF file for llama.cpp, Ollama,
LM Studio and transformers' GGUF reader.

Every tensor gets a GGUF type:

* block linears: ``--type`` (F16 by default) when they are float; a quantized run's packed
  layers keep their width: b <= 4 bits in groups of a multiple of 32 become Q4_1 blocks
  holding the very same codes (d = s, m = -z s: exact up to m's fp16 rounding), 8 bits (no
  exact GGUF type: Q8_0 is symmetric) are re-rounded to Q8_0, other groupings to Q4_1;
* token embeddings, the untied output head and GPT-2's position table: ``--embed-type``
  (Q8_0 by default, as llama.cpp's own quantized files keep them);
* norms and biases: F32.

A row that does not split into whole blocks of its type falls back to F16 (llama.cpp's
converter does the same). The file is written in a hidden staging file beside ``--out`` and
moved into place when complete. ``--force`` replaces an existing file only if it is a GGUF
file (it starts with the GGUF magic): never a folder, a link or another kind of file.

>>> plan = GGUFPlan(load_model("tiny:llama"), weight_type="q8_0")
>>> plan.write("tiny.gguf")["file_bytes"] == plan.predicted_bytes()
True
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.config import configurable, option
from optlab.core.models import LoadedModel
from optlab.core.run import check_file_target, place_file
from optlab.errors import OptlabError
from optlab.quant.embedding import QuantEmbedding
from optlab.quant.gguf_arch import Family, family_of
from optlab.quant.gguf_types import (
    TYPES,
    decode,
    encode,
    exact_type,
    fits,
    gguf_type,
    nearest_type,
    q4_1_from_codes,
    tensor_bytes,
)
from optlab.quant.gguf_vocab import write_vocab
from optlab.quant.linear import QuantLinear
from optlab.quant.packing import unpack
from optlab.quant.quantizer import dequantize

log = logging.getLogger("optlab")

FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
              "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}  # fmt: skip
ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT


@configurable("gguf-export")
@dataclass(frozen=True)
class ExportConfig:
    """The file's format and its tensor types."""

    format: str = option("gguf", "file format: gguf (llama.cpp, Ollama, LM Studio, "
                         "transformers)", choices=("gguf",))  # fmt: skip
    weight_type: str = option("f16", "GGUF type of float block linears (a quantized run's "
                              "packed layers keep their width: Q4_1 exactly for <= 4 bits, "
                              "Q8_0 for 8)", flag="--type", choices=tuple(TYPES))  # fmt: skip
    embed_type: str = option("q8_0", "GGUF type of the token embeddings and output head",
                             choices=tuple(TYPES))  # fmt: skip

    def __post_init__(self) -> None:
        for name in (self.weight_type, self.embed_type):
            gguf_type(name)


def is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


@dataclass
class Slot:
    """One tensor of the file before it is encoded: where it comes from and its role."""

    key: str  # the Hugging Face state-dict name
    name: str  # the GGUF name
    shape: tuple[int, ...]  # (rows, columns) of the (out, in) matrix, or (n,)
    role: str  # "linear" (a block linear), "table" (embeddings, head), "vector"
    module: nn.Module | None = None
    tensor: torch.Tensor | None = None
    qtype: str = "f32"
    exact: bool = False
    data: np.ndarray | None = field(default=None, repr=False)


def _block_linears(model: nn.Module, anatomy: Anatomy) -> dict[str, nn.Module]:
    found = {}
    for i, block in enumerate(anatomy.blocks):
        for name, module in block.named_modules():
            if isinstance(module, QuantLinear) or name in anatomy.linears(block):
                found[f"{anatomy.blocks_path}.{i}.{name}"] = module
    return found


class GGUFPlan:
    """The tensors of ``lm`` with the GGUF type each is written in.

    ``linear_types`` (block linear name -> GGUF type) overrides ``weight_type`` per linear:
    what a GGUF allocation decides.
    """

    def __init__(
        self,
        lm: LoadedModel,
        *,
        weight_type: str = "f16",
        embed_type: str = "q8_0",
        linear_types: dict[str, str] | None = None,
    ) -> None:
        self.lm = lm
        self.family: Family = family_of(lm.model.config)
        self.embed_type = embed_type
        self.slots = self._slots(lm.model)
        self._kv_bytes: int | None = None
        self.fallbacks: list[str] = []
        for slot in self.slots:
            slot.qtype, slot.exact = self._type(slot, weight_type, linear_types or {})

    # --- which tensors, in which type ------------------------------------------------------

    def _slots(self, model: nn.Module) -> list[Slot]:
        anatomy = Anatomy.of(model)
        linears = _block_linears(model, anatomy)
        packed = {n: m for n, m in model.named_modules()
                  if isinstance(m, QuantLinear | QuantEmbedding)}  # fmt: skip
        slots, seen = [], set()
        for key, tensor in model.state_dict(keep_vars=True).items():
            owner, _, attr = key.rpartition(".")
            module = packed.get(owner)
            if module is not None and attr in ("scales", "zeros"):
                continue
            # Tied tensors once (the head then is the embedding table, as llama.cpp reads it).
            identity = (tensor.data_ptr(), tuple(tensor.shape))
            if identity in seen or not (tensor.is_floating_point() or attr == "packed"):
                continue
            seen.add(identity)
            name = f"{owner}.weight" if module is not None else key
            gguf_name = self.family.gguf_name(name)
            if module is not None:
                role = "linear" if owner in linears else "table"
                slot = Slot(name, gguf_name, _packed_shape(module), role, module)
            elif tensor.dim() == 1:
                slot = Slot(key, gguf_name, tuple(tensor.shape), "vector", tensor=tensor)
            else:
                holder = model.get_submodule(owner)
                matrix = weight_matrix(holder) if owner in linears else tensor.data
                slot = Slot(key, gguf_name, tuple(matrix.shape),
                            "linear" if owner in linears else "table", holder)  # fmt: skip
            slots.append(slot)
        return slots

    def _type(self, slot: Slot, weight_type: str, linear_types: dict[str, str]) -> tuple[str, bool]:
        if slot.role == "vector":
            return "f32", False
        module_name = slot.key.removesuffix(".weight")
        wanted = self.embed_type if slot.role == "table" else linear_types.get(
            module_name, weight_type)  # fmt: skip
        exact = False
        if isinstance(slot.module, QuantLinear | QuantEmbedding):
            bits, group = slot.module.bits, slot.module.group_size
            exact_name = exact_type(bits, group, slot.shape[1])
            if slot.role == "linear" and module_name not in linear_types:
                wanted = exact_name or nearest_type(bits)
            exact = wanted == exact_name
        if not fits(wanted, slot.shape[1]):
            self.fallbacks.append(slot.name)
            return "f16", False
        return wanted, exact

    # --- sizes -----------------------------------------------------------------------------

    def tensor_bytes(self, slot: Slot, qtype: str | None = None) -> int:
        """Bytes ``slot`` takes in the file at ``qtype`` (its own by default), padding included."""
        qtype = qtype or slot.qtype
        if not fits(qtype, slot.shape[-1]):
            qtype = "f16"
        return gguf.GGUFWriter.ggml_pad(tensor_bytes(slot.shape, qtype), ALIGNMENT)

    def fixed_bytes(self) -> int:
        """Bytes of the file outside the tensors' data: header, metadata, tensor infos."""
        if self._kv_bytes is None:
            self._kv_bytes = self._measure_kv()
        infos = sum(8 + len(s.name.encode()) + 4 + 8 * len(s.shape) + 4 + 8 for s in self.slots)
        return gguf.GGUFWriter.ggml_pad(self._kv_bytes + infos, ALIGNMENT)

    def predicted_bytes(self) -> int:
        """The exact size of the file :meth:`write` writes."""
        return self.fixed_bytes() + sum(self.tensor_bytes(s) for s in self.slots)

    def _measure_kv(self) -> int:
        """The header and metadata as written (the vocabulary is most of it), in bytes."""
        fd, scratch = tempfile.mkstemp(suffix=".gguf")
        os.close(fd)
        try:
            writer = gguf.GGUFWriter(scratch, self.family.arch)
            self._metadata(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.close()
            return Path(scratch).stat().st_size
        finally:
            os.unlink(scratch)

    # --- encoding and writing --------------------------------------------------------------

    def _metadata(self, writer: gguf.GGUFWriter) -> dict[str, Any]:
        writer.add_type("model")
        writer.add_name(Path(self.lm.spec).name or self.lm.spec)
        self.family.write_hparams(writer)
        counts = Counter(s.qtype for s in self.slots if s.role == "linear")
        main = counts.most_common(1)[0][0] if counts else "f32"
        writer.add_file_type(FILE_TYPES[main])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("optlab.source", self.lm.spec)
        rows = next(s.shape[0] for s in self.slots if s.name == "token_embd.weight")
        return write_vocab(writer, self.lm.tokenizer, rows, self.family.arch)

    @torch.no_grad()
    def encode(self, *, apply: bool = False, progress: bool = True) -> None:
        """Encode every tensor; with ``apply``, also set the model's weights to what the file
        holds (the reader's dequantization), so that measuring the model measures the file."""
        for slot in tqdm(self.slots, desc="encode GGUF tensors", leave=False,
                         disable=not progress or None):  # fmt: skip
            slot.data = self._encode(slot, apply)

    def _encode(self, slot: Slot, apply: bool) -> np.ndarray:
        order = self.family.row_order(slot.name, slot.shape[0])
        module = slot.module
        if slot.role == "vector":
            shift = self.family.shift(slot.name)
            value = slot.tensor.detach().float().cpu() + shift  # type: ignore[union-attr]
            if apply and shift:  # the reader subtracts it again, in fp32
                slot.tensor.data.copy_(value - shift)  # type: ignore[union-attr]
            return value.numpy()
        if isinstance(module, QuantLinear | QuantEmbedding):
            codes, scales, zeros = _packed_parts(module)
            if order is not None:
                codes, scales, zeros = codes[order], scales[order], zeros[order]
            if slot.exact:
                return q4_1_from_codes(codes, scales, zeros, module.group_size)
            weight = dequantize(codes, scales, zeros, module.group_size)
            return encode(weight, slot.qtype)
        matrix = weight_matrix(module) if slot.role == "linear" else module.weight.data  # type: ignore[union-attr]
        data = encode(matrix, slot.qtype)
        if apply:
            matrix.copy_(torch.from_numpy(decode(data, slot.qtype)).reshape(matrix.shape))
        return data[order.numpy()] if order is not None else data

    def write(
        self, path: str | Path, *, force: bool = False, progress: bool = True
    ) -> dict[str, Any]:
        """Encode (unless done) and write the file atomically; return its summary."""
        target = check_file_target(path, ".gguf", force, is_gguf_file)
        if any(s.data is None for s in self.slots):
            self.encode(progress=progress)
        folder = target.parent if str(target.parent) else Path(".")
        fd, staging = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=folder)
        os.close(fd)
        staged = Path(staging)
        try:
            writer = gguf.GGUFWriter(staged, self.family.arch)
            vocab = self._metadata(writer)
            for slot in self.slots:
                data = slot.data
                raw = None if data.dtype in (np.float32, np.float16) else gguf_type(slot.qtype)  # type: ignore[union-attr]
                writer.add_tensor(slot.name, data, raw_dtype=raw)  # type: ignore[arg-type]
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
            writer.close()
            os.chmod(staged, 0o644)
            place_file(staged, target, replace=force)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        if self.fallbacks:
            log.warning("%d tensor(s) do not split into blocks of their type; written as "
                        "F16: %s", len(self.fallbacks), ", ".join(self.fallbacks[:3]))  # fmt: skip
        return self.summary(target, vocab)

    def summary(self, target: Path, vocab: dict[str, Any]) -> dict[str, Any]:
        file_bytes = target.stat().st_size
        parameters = sum(int(np.prod(s.shape)) for s in self.slots)
        return {
            "file": str(target),
            "file_bytes": file_bytes,
            "file_mb": file_bytes / 1e6,
            "parameters": parameters,
            "bits_per_parameter": 8 * file_bytes / parameters,
            "architecture": self.family.arch,
            "tensor_types": dict(Counter(s.qtype for s in self.slots)),
            "exact_tensors": sum(s.exact for s in self.slots),
            "f16_fallbacks": list(self.fallbacks),
            "tokenizer": vocab,
        }


def _packed_shape(module: QuantLinear | QuantEmbedding) -> tuple[int, int]:
    if isinstance(module, QuantEmbedding):
        return module.num_embeddings, module.embedding_dim
    return module.out_features, module.in_features


def _packed_parts(module: QuantLinear | QuantEmbedding) -> tuple[torch.Tensor, ...]:
    """Codes [rows, columns] (uint8), fp16 scales and uint8 zeros [rows, groups], on the CPU."""
    codes = unpack(module.packed, module.bits, _packed_shape(module)[1])
    return codes.cpu(), module.scales.cpu(), module.zeros.cpu()


def export_gguf(
    lm: LoadedModel,
    config: ExportConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``lm`` to ``out`` as GGUF with the types of ``config``; return the summary."""
    if config.format != "gguf":
        raise OptlabError(f"unknown export format {config.format!r}; optlab writes gguf")
    check_file_target(out, ".gguf", force, is_gguf_file)  # before any encoding work
    plan = GGUFPlan(lm, weight_type=config.weight_type, embed_type=config.embed_type)
    summary = plan.write(out, force=force, progress=progress)
    if summary["file_bytes"] != plan.predicted_bytes():  # the allocator relies on the formula
        raise RuntimeError(f"wrote {summary['file_bytes']} bytes, predicted "
                           f"{plan.predicted_bytes()}")  # fmt: skip
    return summary
