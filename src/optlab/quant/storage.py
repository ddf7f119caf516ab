"""Save a quantized model as safetensors + a JSON bit map, and load it back.

A quantized model folder holds the Hugging Face ``config.json``, the tokenizer,
``model.safetensors`` (packed codes, fp16 scales, uint8 zero points, and every other tensor in
``rest_dtype``) and ``quantization.json`` (format, rest dtype, per-linear bits and group size,
tied-weight aliases). ``load_model(folder)`` (or a run directory holding ``model/``) rebuilds
the model from its config, swaps in empty ``QuantLinear`` layers and loads the tensors, so the
reloaded model computes the same logits. Nothing is unpickled.

>>> save_quantized(lm, "runs/q/model", bitmap, group_size=128)
>>> lm2 = load_model("runs/q")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from optlab.core.anatomy import weight_matrix
from optlab.core.models import folder_tokenizer
from optlab.core.modules import replace_module
from optlab.core.run import atomic_write
from optlab.errors import OptlabError
from optlab.quant.embedding import QuantEmbedding, empty_embeddings
from optlab.quant.linear import QuantLinear

if TYPE_CHECKING:
    from optlab.core.models import LoadedModel

MANIFEST = "quantization.json"
FORMAT = "optlab-quant"
VERSION = 1
WEIGHTS = "model.safetensors"


def quantized_state(
    model: nn.Module, rest_dtype: torch.dtype | None = torch.float16
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write (shared tensors once) and the aliases of the dropped duplicates."""
    packed = {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, QuantLinear | QuantEmbedding)
        for key in ("packed", "scales", "zeros")
    }
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if identity in seen:  # tied embeddings / LM head
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        if key not in packed and tensor.is_floating_point() and rest_dtype is not None:
            tensor = tensor.to(rest_dtype)
        tensors[key] = tensor.detach().contiguous().cpu()
    return tensors, aliases


def save_quantized(
    lm: LoadedModel,
    folder: str | Path,
    bitmap: dict[str, int],
    group_size: int | None,
    rest_dtype: torch.dtype | None = torch.float16,
    embeddings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the quantized ``lm`` to ``folder``; return the manifest.
    ``embeddings`` is what :func:`quantize_embeddings` returned, if it ran."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = lm.model
    layers = {}
    for name, bits in bitmap.items():
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear):
            layers[name] = {"bits": module.bits, "group_size": module.group_size,
                            "in_features": module.in_features,
                            "out_features": module.out_features,
                            "bias": module.bias is not None}  # fmt: skip
        else:
            layers[name] = {"bits": 16, "shape": list(weight_matrix(module).shape)}
        if layers[name]["bits"] != bits:
            raise RuntimeError(f"{name} holds {layers[name]['bits']} bits, the map says {bits}")
    tensors, aliases = quantized_state(model, rest_dtype)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "group_size": group_size,
        "rest_dtype": str(rest_dtype).removeprefix("torch.") if rest_dtype else None,
        "layers": layers,
        "embeddings": embeddings,
        "aliases": aliases,
    }
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def is_quantized_folder(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Rebuild a model saved by :func:`save_quantized`; return (model, tokenizer)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OptlabError(f"cannot read {folder / MANIFEST}: {err}") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise OptlabError(f"{folder / MANIFEST} is not an optlab-quant v{VERSION} manifest")
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, layer in manifest["layers"].items():
        if layer["bits"] < 16:
            replace_module(model, name, QuantLinear(
                layer["in_features"], layer["out_features"], layer["bits"],
                layer["group_size"], layer["bias"], dtype))  # fmt: skip
    if manifest.get("embeddings"):
        empty_embeddings(model, manifest["embeddings"])
    tensors = load_file(folder / WEIGHTS)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = set(missing) - set(manifest["aliases"])
    if missing or unexpected:
        raise OptlabError(
            f"{folder / WEIGHTS} does not match its model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    state = model.state_dict()
    for key, source in manifest["aliases"].items():
        if not torch.equal(state[key], state[source]):  # the config must re-tie them
            raise OptlabError(f"tied tensor {key} does not equal {source} after loading")
    return model, folder_tokenizer(folder)  # refuses a folder that lost its tokenizer
