"""Run a model one decoder block at a time over calibration batches.

``run_layerwise`` captures what every block receives (hidden states and every keyword
argument: masks, RoPE ``position_embeddings``, which differ per block in Gemma 3), then for
each block in turn moves it to the device, hands it to ``on_block`` (collect statistics with
hooks, edit weights), re-runs it so the next block sees the edited outputs, and moves it back.
Only one block's weights need to be on the device at a time.

A model loaded with ``device_map`` (accelerate hooks, blocks spread over devices, CPU or disk
offload) stays where accelerate put it: its hooks move each block's inputs and weights, and
edits to an offloaded block are written back to its offload store (see ``_held_on_device``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from optlab.core.anatomy import Anatomy

Batch = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass
class BlockContext:
    """One block and what enters it: ``inputs[b]`` with ``args[b]``/``kwargs[b]`` per batch."""

    index: int
    block: nn.Module
    inputs: list[torch.Tensor]
    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]
    outputs: list[torch.Tensor] | None = field(default=None, repr=False)
    _reuse: bool = False

    @torch.no_grad()
    def run(self) -> list[torch.Tensor]:
        """Run the block on every batch; hooks registered on it see each batch."""
        self.outputs = [
            call_block(self.block, x, a, k)
            for x, a, k in zip(self.inputs, self.args, self.kwargs, strict=True)
        ]
        self._reuse = False
        return self.outputs

    def keep_outputs(self) -> None:
        """Promise that no weight changed since the last ``run()``: its outputs are propagated
        as they are, saving the second forward pass that read-only scans would otherwise pay."""
        if self.outputs is None:
            raise RuntimeError("keep_outputs() needs a run() first")
        self._reuse = True


def call_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _StopForward(Exception):
    pass


def run_layerwise(
    model: nn.Module,
    batches: Iterable[Batch],
    on_block: Callable[[BlockContext], None] | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Call ``on_block`` on each block in order; return the hidden states after the last block.

    ``batches`` are token-id tensors [b, L] (or dicts of model inputs). ``device`` is where
    blocks run; by default the model's own device. Apply ``Anatomy.of(model).logits`` to the
    result to get the logits of the (edited) model.

    >>> def zero_q(ctx):
    ...     ctx.block.self_attn.q_proj.weight.data.zero_()
    >>> hidden = run_layerwise(model, [ids], zero_q)
    """
    anatomy = Anatomy.of(model)
    home = _execution_device(model)
    device = torch.device(device) if device is not None else home
    offload = device != home and not _dispatched(model)
    if offload:
        _move_outside_blocks(model, anatomy, device)
    try:
        inputs, args, kwargs = _capture(model, anatomy, batches, device)
    finally:
        if offload:
            _move_outside_blocks(model, anatomy, home)
    blocks = anatomy.blocks
    for index in tqdm(range(len(blocks)), desc="blocks", disable=not progress or None, leave=False):
        block = blocks[index]
        if offload:
            block.to(device)
        ctx = BlockContext(
            index, block, inputs, [a[index] for a in args], [k[index] for k in kwargs]
        )
        with _held_on_device(block):
            if on_block is not None:
                on_block(ctx)
            inputs = ctx.outputs if ctx._reuse else ctx.run()
        if offload:
            block.to(home)
    return inputs


def _capture(
    model: nn.Module, anatomy: Anatomy, batches: Iterable[Batch], device: torch.device
) -> tuple[list[torch.Tensor], list[list[tuple]], list[list[dict]]]:
    """Record the input of block 0 and the arguments of every block, for each batch.

    Each block's forward is swapped for a recorder that passes its input straight through,
    so capturing costs no block computation; the pass stops at the last block.
    """
    blocks = anatomy.blocks
    last = len(blocks) - 1
    inputs: list[torch.Tensor] = []
    all_args: list[list[tuple]] = []
    all_kwargs: list[list[dict]] = []
    seen_args: list[tuple] = [()] * len(blocks)
    seen_kwargs: list[dict] = [{}] * len(blocks)

    def recorder(index: int) -> Callable[..., torch.Tensor]:
        def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if index == 0:
                inputs.append(hidden.detach())
            seen_args[index] = args
            seen_kwargs[index] = kwargs
            if index == last:
                raise _StopForward
            return hidden

        return forward

    # accelerate's hooks live in an instance ``forward`` of a dispatched block: keep it.
    hooked = [block.__dict__.get("forward") for block in blocks]
    for index, block in enumerate(blocks):
        block.forward = recorder(index)
    try:
        with torch.no_grad():
            for batch in batches:
                feed = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
                # A cache object (``cache=``) goes as it is.
                feed = {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in feed.items()
                }
                with contextlib.suppress(_StopForward):
                    model(**feed, use_cache=False)
                all_args.append(list(seen_args))
                all_kwargs.append(list(seen_kwargs))
    finally:
        for block, forward in zip(blocks, hooked, strict=True):
            del block.forward  # back to the class's forward, or to accelerate's hooked one
            if forward is not None:
                block.forward = forward
    if not inputs:
        raise ValueError("run_layerwise needs at least one batch")
    return inputs, all_args, all_kwargs


def _dispatched(model: nn.Module) -> bool:
    """Placed by accelerate (``device_map``, ``cpu_offload``): its hooks move the weights."""
    return hasattr(model, "hf_device_map") or hasattr(model, "_hf_hook")


def _execution_device(model: nn.Module) -> torch.device:
    """Where the model computes: its parameters' device or, for a dispatched model (whose
    offloaded parameters sit on the meta device), the first device its hooks name."""
    if _dispatched(model):
        for module in model.modules():  # the model's own hook first
            device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if device is not None:
                return torch.device(device)
    return next(model.parameters()).device


def _offloaded(block: nn.Module) -> list[nn.Module]:
    """The modules of ``block`` whose weights accelerate keeps in an offload store."""
    return [m for m in block.modules() if getattr(getattr(m, "_hf_hook", None), "offload", 0)]


@contextlib.contextmanager
def _held_on_device(block: nn.Module) -> Iterator[None]:
    """Hold an offloaded block's weights on its execution device while it is processed.

    accelerate keeps an offloaded module's weights on the meta device and reloads them from
    its store (CPU memory, or files on disk) at every forward, so an edit made by
    ``on_block`` would be lost. Inside, the weights are real tensors that forwards use as
    they are; on exit the changed ones are written back to the store (never to the
    checkpoint it may read from) and the module goes back to meta.
    """
    modules = _offloaded(block)
    for module in modules:
        module._hf_hook.pre_forward(module)  # load from the store
        module._hf_hook.offload = False
    try:
        yield
    finally:
        for module in modules:
            hook = module._hf_hook
            recurse = hook.place_submodules
            tensors = [
                *module.named_parameters(recurse=recurse),
                *(module.named_buffers(recurse=recurse) if hook.offload_buffers else []),
            ]
            for name, tensor in tensors:  # the store holds no non-persistent buffers
                if name in hook.weights_map and not torch.equal(
                    tensor.detach().cpu(), hook.weights_map[name].cpu()
                ):
                    _store(hook.weights_map, name, tensor.detach().cpu())
            hook.offload = True
            hook.post_forward(module, None)  # back to meta


def _store(weights_map: Any, name: str, value: torch.Tensor) -> None:
    """Replace one tensor of an accelerate offload store: in memory for CPU offload, as a new
    file in the offload folder for disk offload (its ``index`` then points there)."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    if isinstance(weights_map, PrefixedDataset):
        loader, key = weights_map.dataset, weights_map.prefix + name
        if isinstance(loader, OffloadedWeightsLoader):
            if key in loader.state_dict or loader.save_folder is None:
                loader.state_dict[key] = value
            else:
                offload_weight(value, key, loader.save_folder, index=loader.index)
            return
        weights_map, name = loader, key
    if not hasattr(weights_map, "__setitem__"):
        raise TypeError(f"cannot write {name} back to a {type(weights_map).__name__} store")
    weights_map[name] = value


def _move_outside_blocks(model: nn.Module, anatomy: Anatomy, device: torch.device) -> None:
    """Move embeddings, norms, head and rotary buffers, leaving the blocks where they are."""
    prefix = anatomy.blocks_path
    for name, module in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for param in module._parameters.values():
            if param is not None:
                param.data = param.data.to(device)
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)


def batched(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split [n, L] token windows into batches of at most ``batch_size`` rows."""
    return list(torch.split(ids, batch_size))
