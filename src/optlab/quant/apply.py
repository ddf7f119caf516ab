"""Quantize the block linears of a model in place to a bit map, with RTN or GPTQ.

Each targeted ``nn.Linear`` / ``Conv1D`` is *replaced* by a :class:`QuantLinear` in its parent
module (the official CPTQuant code ``setattr``s a dotted name on the root model, which only
adds an unused attribute, so nothing but the LM head was ever quantized). Units at 16 bits
stay ordinary linears. Everything that is not packed (embeddings, norms, biases, 16-bit
linears, the head) is rounded to ``rest_dtype`` (fp16 by default), which is how it is saved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.layerwise import BlockContext, run_layerwise
from optlab.core.modules import replace_module
from optlab.core.stats import Hessian, record_inputs
from optlab.quant.embedding import QuantEmbedding
from optlab.quant.gptq import gptq_quantize
from optlab.quant.linear import QuantLinear
from optlab.quant.quantizer import QuantizedWeight, quantize_rtn


def to_quant_linear(module: nn.Module, qw: QuantizedWeight) -> QuantLinear:
    bias = getattr(module, "bias", None)
    return QuantLinear.from_quantized(qw, bias.detach() if bias is not None else None)


@torch.no_grad()
def quantize_rtn_model(
    model: nn.Module, bitmap: dict[str, int], group_size: int | None = 128
) -> None:
    """Round-to-nearest every linear named in ``bitmap`` (full names; 16 = leave as is)."""
    for name, bits in bitmap.items():
        if bits >= 16:
            continue
        module = model.get_submodule(name)
        replace_module(model, name, to_quant_linear(module, quantize_rtn(
            weight_matrix(module), bits, group_size)))  # fmt: skip


@torch.no_grad()
def quantize_gptq_model(
    model: nn.Module,
    bitmap: dict[str, int],
    batches: Sequence[torch.Tensor],
    group_size: int | None = 128,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    progress: bool = True,
) -> None:
    """GPTQ layer by layer: each block's linears see the outputs of the already quantized
    blocks before them (the layer-wise runner propagates them)."""
    anatomy = Anatomy.of(model)

    def on_block(ctx: BlockContext) -> None:
        prefix = f"{anatomy.blocks_path}.{ctx.index}."
        linears = {
            name: module
            for name, module in anatomy.linears(ctx.block).items()
            if bitmap.get(prefix + name, 16) < 16
        }
        device = ctx.inputs[0].device
        stats = {n: Hessian(weight_matrix(m).shape[1], device) for n, m in linears.items()}
        with record_inputs(linears, stats):
            ctx.run()
        for name, module in linears.items():
            qw = gptq_quantize(weight_matrix(module), stats[name].matrix, bitmap[prefix + name],
                               group_size, block_size=block_size, damp=damp,
                               act_order=act_order)  # fmt: skip
            replace_module(ctx.block, name, to_quant_linear(module, qw))

    run_layerwise(model, batches, on_block, progress=progress)


@torch.no_grad()
def round_rest(model: nn.Module, dtype: torch.dtype | None = torch.float16) -> None:
    """Round every floating parameter and buffer outside ``QuantLinear`` packs to ``dtype``
    and back, so the in-memory model computes exactly what the saved one will."""
    if dtype is None:
        return
    for module in model.modules():
        tensors = list(module._parameters.values())
        if not isinstance(module, QuantLinear | QuantEmbedding):  # RoPE tables are rebuilt
            skip = module._non_persistent_buffers_set
            tensors += [b for key, b in module._buffers.items() if key not in skip]
        for tensor in tensors:
            if tensor is not None and tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype).to(tensor.dtype)
