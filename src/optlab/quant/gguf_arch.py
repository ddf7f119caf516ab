"""What llama.cpp expects of each architecture in a GGUF file: hyperparameter keys, tensor
names, and the few layouts that differ from Hugging Face's.

Tensor names come from gguf-py's own table (``gguf.get_tensor_name_map``), the one llama.cpp's
``convert_hf_to_gguf.py`` and transformers' GGUF reader use. The layout differences, as that
converter writes them:

* llama: the rows of Q and K are permuted per head, from Hugging Face's rotate-half order to
  llama.cpp's interleaved RoPE pairs (transformers undoes it on loading);
* gpt_neox: the fused QKV rows go from per-head [q, k, v] to [all q, all k, all v];
* gemma3: every RMSNorm weight is stored as 1 + w (Gemma's norm multiplies by 1 + w);
* gpt2: Conv1D weights are stored (out, in), as every other linear.

Each is a permutation of whole rows (or a shift of a 1-D norm), so it commutes with block
quantization along a row: a quantized row is moved, not re-rounded.

>>> family = family_of(model.config)       # refuses OPT and the other families llama.cpp lacks
>>> family.arch, family.gguf_name("model.layers.0.self_attn.q_proj.weight")
('llama', 'blk.0.attn_q.weight')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import torch
from transformers import PretrainedConfig

from optlab.errors import OptlabError

# Hugging Face model_type -> llama.cpp architecture.
ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gpt2": "gpt2",
         "gpt_neox": "gptneox"}  # fmt: skip
WHY_NOT = {
    "opt": "llama.cpp has no OPT architecture (convert_hf_to_gguf.py converts no "
    "OPTForCausalLM), so no GGUF file of it would run",
}


def _rope(config: PretrainedConfig, kind: str | None = None) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    return dict(params.get(kind, {})) if kind else params


def _refuse(config: PretrainedConfig, reason: str) -> OptlabError:
    return OptlabError(f"cannot export this {config.model_type} model to GGUF: {reason}")


def _check_plain_rope(config: PretrainedConfig, params: dict[str, Any]) -> None:
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise _refuse(config, f"its RoPE scaling {kind!r} is not one optlab writes "
                      "(default and linear only)")  # fmt: skip


def _rope_keys(writer: gguf.GGUFWriter, params: dict[str, Any]) -> None:
    if params.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(params["rope_theta"]))
    if params.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _decoder_keys(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    """The keys convert_hf_to_gguf.py's TextModel writes for every RMSNorm decoder."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _llama(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    params = _rope(config)
    _check_plain_rope(config, params)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise _refuse(config, "llama.cpp's llama graph has no attention or MLP biases")
    _decoder_keys(writer, config)
    _rope_keys(writer, params)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(_head_dim(config))


def _qwen2(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    params = _rope(config)
    _check_plain_rope(config, params)
    if getattr(config, "use_sliding_window", False):
        raise _refuse(config, "llama.cpp's qwen2 has no sliding-window attention")
    _decoder_keys(writer, config)
    _rope_keys(writer, params)


# llama.cpp (and transformers' GGUF reader) fix Gemma 3's layout: five sliding-window layers
# then one global, RoPE base 10000 on the sliding ones; attention scaled by 1/sqrt(head_dim).
GEMMA3_PATTERN, GEMMA3_LOCAL_BASE = 6, 10000.0


def _gemma3(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    n = config.num_hidden_layers
    pattern = ["full_attention" if (i + 1) % GEMMA3_PATTERN == 0 else "sliding_attention"
               for i in range(n)]  # fmt: skip
    if list(config.layer_types or pattern) != pattern:
        raise _refuse(config, "its layer_types are not Gemma 3's fixed 5 sliding : 1 global "
                      "pattern, which is all a GGUF file can state")  # fmt: skip
    full, local = _rope(config, "full_attention"), _rope(config, "sliding_attention")
    _check_plain_rope(config, full)
    if float(local.get("rope_theta", GEMMA3_LOCAL_BASE)) != GEMMA3_LOCAL_BASE:
        raise _refuse(config, f"llama.cpp fixes the sliding layers' RoPE base at "
                      f"{GEMMA3_LOCAL_BASE:g}")  # fmt: skip
    if getattr(config, "query_pre_attn_scalar", None) not in (None, _head_dim(config)):
        raise _refuse(config, f"query_pre_attn_scalar {config.query_pre_attn_scalar} is not "
                      f"head_dim {_head_dim(config)}: readers scale attention by "
                      "1/sqrt(head_dim)")  # fmt: skip
    _decoder_keys(writer, config)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    _rope_keys(writer, full)
    writer.add_sliding_window(config.sliding_window)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _gpt2(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    if config.n_inner not in (None, 4 * config.n_embd):
        raise _refuse(config, "llama.cpp's gpt2 assumes an MLP of 4 x n_embd")
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(float(config.layer_norm_epsilon))


def _gptneox(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    params = _rope(config)
    _check_plain_rope(config, params)
    fraction = params.get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_rope_dimension_count(int(fraction * _head_dim(config)))
    writer.add_parallel_residual(bool(config.use_parallel_residual))
    writer.add_layer_norm_eps(float(config.layer_norm_eps))
    _rope_keys(writer, params)


_HPARAMS = {"llama": _llama, "qwen2": _qwen2, "gemma3": _gemma3, "gpt2": _gpt2,
            "gptneox": _gptneox}  # fmt: skip


@dataclass
class Family:
    """One model's architecture as llama.cpp knows it."""

    config: PretrainedConfig
    arch: str

    def __post_init__(self) -> None:
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch)
        blocks = getattr(self.config, "num_hidden_layers", None) or self.config.n_layer
        self._names = gguf.get_tensor_name_map(arch_id, blocks)

    def write_hparams(self, writer: gguf.GGUFWriter) -> None:
        _HPARAMS[self.arch](writer, self.config)

    def gguf_name(self, hf_name: str) -> str:
        name = self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise OptlabError(f"no GGUF name for tensor {hf_name!r} of this {self.arch} model")
        return name

    def row_order(self, gguf_name: str, rows: int) -> torch.Tensor | None:
        """The source row each stored row comes from (None: rows as they are)."""
        config = self.config
        if self.arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = config.num_attention_heads if ".attn_q." in gguf_name else (
                config.num_key_value_heads)  # fmt: skip
            # Per head, rotate-half order [x0..x(d/2-1), y0..] -> interleaved pairs (x0, y0, ..).
            index = torch.arange(rows).reshape(heads, 2, rows // heads // 2)
            return index.transpose(1, 2).flatten()
        if self.arch == "gptneox" and ".attn_qkv." in gguf_name:
            heads = config.num_attention_heads
            index = torch.arange(rows).reshape(heads, 3, rows // heads // 3)
            return index.transpose(0, 1).flatten()
        return None

    def shift(self, gguf_name: str) -> float:
        """What llama.cpp adds to a stored 1-D tensor (Gemma's norms hold 1 + w)."""
        return 1.0 if self.arch == "gemma3" and gguf_name.endswith("norm.weight") else 0.0


def family_of(config: PretrainedConfig) -> Family:
    kind = config.model_type
    if kind not in ARCHS:
        why = WHY_NOT.get(kind, "llama.cpp's converter has no such architecture optlab maps")
        raise OptlabError(f"cannot export {kind!r} models to GGUF: {why}; GGUF export "
                          f"supports {', '.join(ARCHS)}")  # fmt: skip
    return Family(config, ARCHS[kind])
