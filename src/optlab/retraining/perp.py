"""PERP: retrain a pruned model by training only a tiny, expressive subset of parameters.

Zimmer et al., "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs" (2023).
After pruning, a few hundred steps on biases, norms and masked LoRA adapters recover most of
what full retraining recovers, at a fraction of a percent of the parameters.

Contract with the pruning code: a pruned model is an ordinary Hugging Face causal LM whose
block linears hold zeros; the mask M = 1[W != 0] is read from the weights when retraining
starts and must hold **exactly** afterwards (same zero set, checked and reported).

Three methods share one parameter selection and one merge:

- ``perp``: train the chosen subset (``bias``, ``norm``, ``head``, ``lora``) on next-token
  loss with one HF Accelerate loop (``accelerate launch`` runs it on several GPUs as is).
- ``full``: the baseline PERP is compared against: every parameter trains, and the masks are
  re-applied after each optimizer step so pruned weights stay exactly zero.
- ``reconstruct``: block by block (``run_layerwise``), train the block's subset so that its
  output matches the dense block's output on the same (pruned-prefix) inputs.

>>> lm = load_model("runs/wanda50/model")
>>> metrics = retrain(lm, PerpConfig(steps=200))
>>> metrics["mask_held"], metrics["trainable_share"]
(True, 0.0035)
>>> lm.model.save_pretrained("runs/wanda50-perp/model")  # a plain sparse HF model
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.config import configurable, option, require_finite
from optlab.core.data import load_text, sample_windows
from optlab.core.layerwise import BlockContext, batched, call_block, run_layerwise
from optlab.core.models import LoadedModel
from optlab.core.train import (
    TrainConfig,
    autocast,
    check_finite,
    dropout_active,
    local_rows,
    make_accelerator,
    shard_loss,
    train_loop,
)
from optlab.errors import OptlabError, did_you_mean
from optlab.eval.scorer import window_length
from optlab.pruning.masks import masks_of, pruned_linears, sparsity_report
from optlab.retraining.lora import VARIANTS, adapters_of, add_adapters, merge_adapters

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("optlab")

METHODS = ("perp", "full", "reconstruct")
PARAM_SETS = ("bias", "norm", "head", "lora")


@configurable("perp")
@dataclass(frozen=True)
class PerpConfig:
    """How to retrain a pruned model.

    ``params`` defaults to biases, norms and MaskLoRA adapters: MaskLoRA trains exactly the
    function it merges, and leaving the head out keeps a tied embedding tied (training the
    head of SmolLM2/OPT/GPT-2 means untying it, see :func:`untie_head`). ``steps`` are
    optimizer steps, honoured exactly; each sees ``batch_size * grad_accum`` windows of
    ``seq_len`` tokens. ``batch_size`` is the global micro-batch: under ``accelerate launch``
    with N processes each takes ``batch_size / N`` of its windows (N must divide it), so the
    steps match one process's. For ``reconstruct``, ``steps`` counts per block and the
    data is ``windows`` fixed windows; ``params`` and ``lora`` are ignored by ``full``, which
    trains everything.

    >>> PerpConfig(params=("bias", "norm"), steps=100)
    >>> PerpConfig(params="bias,norm,lora", lora="scalel")   # a comma list works too
    """

    method: str = option("perp", "perp, full or reconstruct", choices=METHODS)
    params: tuple[str, ...] = option(("bias", "norm", "lora"), "what perp and reconstruct "
                                     "train: any of bias, norm, head, lora")  # fmt: skip
    lora: str = option("maskl", "adapter: maskl = W + s(BA*M), scalel = W*(BA), prune, plain")
    rank: int = option(16, "LoRA rank")
    alpha: float = option(32.0, "LoRA alpha (scale alpha / rank)")
    dropout: float = option(0.0, "LoRA input dropout")
    steps: int = option(200, "optimizer steps (reconstruct: per block)")
    lr: float = option(5e-4, "AdamW learning rate")
    batch_size: int = option(1, "windows per step")
    grad_accum: int = option(2, "gradient accumulation steps")
    seq_len: int = option(512, "window tokens")
    warmup: float = option(0.1, "linear warmup, a fraction of the steps")
    corpus: str = option("wiki:calib", "training text: a corpus or a .txt file")
    seed: int = option(0, "adapter init, dropout and data order (the command's --seed)",
                       cli=False)  # fmt: skip
    windows: int = option(32, "reconstruct: fixed calibration windows")

    def __post_init__(self) -> None:
        require_finite(self, "alpha", "dropout", "lr", "warmup")
        params = self.params
        if isinstance(params, str):
            params = [p.strip() for p in params.split(",") if p.strip()]
        params = tuple(dict.fromkeys(params))  # lists from YAML, duplicates dropped
        object.__setattr__(self, "params", params)
        if self.method not in METHODS:
            raise did_you_mean("retraining method", self.method, METHODS)
        for name in params:
            if name not in PARAM_SETS:
                raise did_you_mean("parameter set", name, PARAM_SETS)
        if self.lora not in VARIANTS:
            raise did_you_mean("LoRA variant", self.lora, VARIANTS)
        if self.method != "full" and not params:
            raise OptlabError(f"params is empty: pick from {', '.join(PARAM_SETS)}")
        if self.method == "reconstruct" and "head" in params:
            raise OptlabError("reconstruct trains block by block: the head is no block's part")
        for name in ("rank", "steps", "batch_size", "grad_accum", "seq_len", "windows"):
            if getattr(self, name) < 1:
                raise OptlabError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise OptlabError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lora == "scalel" and self.dropout:
            raise OptlabError("ScaleLoRA multiplies the weight: input dropout has no meaning")
        if not self.lr > 0:
            raise OptlabError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise OptlabError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")


# ---------------------------------------------------------------------------------------------
# Masks (M = 1[W != 0] and sparsity accounting live in optlab.pruning.masks, shared with pruning)


def _masks_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """``masks_of`` moved to the CPU layer by layer: two copies of every mask (before and after
    retraining) need not sit in accelerator memory next to the model."""
    return {name: (weight_matrix(m) != 0).cpu() for name, m in pruned_linears(model).items()}


def compare_masks(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict:
    """How the zero set moved: ``regrown`` pruned weights became non-zero, ``newly_zero``
    surviving weights became exactly zero. The mask held iff both are 0."""
    regrown = sum(int((after[n] & ~m).sum()) for n, m in before.items())
    newly_zero = sum(int((m & ~after[n]).sum()) for n, m in before.items())
    return {"mask_held": regrown == 0 and newly_zero == 0, "regrown": regrown,
            "newly_zero": newly_zero}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Parameter selection


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and every family's own norm class (``LlamaRMSNorm``, ...)."""
    return isinstance(module, nn.LayerNorm | nn.RMSNorm | nn.GroupNorm) or (
        "Norm" in type(module).__name__
    )


def untie_head(model: nn.Module) -> bool:
    """Give a head tied to the input embedding its own copy of the weight; True if it was tied.

    Training a tied head would train the embedding too (they are one tensor), which is not
    the "head" subset. The copy is saved as ``lm_head.weight`` with
    ``tie_word_embeddings=False``, so the retrained model reloads with both matrices (the
    checkpoint grows by vocab x hidden).
    """
    anatomy = Anatomy.of(model)
    head, embed = anatomy.lm_head, anatomy.embed
    if head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return True


def select_trainable(model: nn.Module, params: tuple[str, ...]) -> dict[str, nn.Parameter]:
    """Freeze everything but the chosen subsets; return the trainable parameters by name.

    ``bias``: every parameter named ``bias``; ``norm``: weights and biases of norm modules;
    ``head``: the LM head (untie it first); ``lora``: the adapters' A and B (add them first).
    """
    anatomy = Anatomy.of(model)
    chosen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if (
                ("bias" in params and name == "bias")
                or ("norm" in params and is_norm(module))
                or ("lora" in params and name in ("lora_A", "lora_B"))
                or ("head" in params and module is anatomy.lm_head)
            ):
                chosen.add(id(param))
    if "lora" in params and not adapters_of(model):
        raise OptlabError("params include lora but the model has no adapters")
    trainable = {}
    for name, param in model.named_parameters():  # tied parameters appear once
        param.requires_grad_(id(param) in chosen)
        if id(param) in chosen:
            trainable[name] = param
    return trainable


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied tensors count once, adapters count."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@dataclass
class _Prepared:
    """What ``retrain`` changed on the model, so it can be undone at the end."""

    compute_dtype: torch.dtype  # the model's own dtype: forwards run in it (autocast)
    dtypes: dict[int, torch.dtype] = field(default_factory=dict)  # by id(param)
    requires_grad: dict[int, bool] = field(default_factory=dict)
    head_untied: bool = False

    def restore(self, model: nn.Module) -> None:
        for param in model.parameters():
            if id(param) in self.dtypes:  # trained in fp32, saved in the model's dtype
                param.data = param.data.to(self.dtypes[id(param)])
            param.requires_grad_(self.requires_grad.get(id(param), True))


def _prepare(model: nn.Module, config: PerpConfig) -> _Prepared:
    prepared = _Prepared(
        compute_dtype=Anatomy.of(model).embed.weight.dtype,
        requires_grad={id(p): p.requires_grad for p in model.parameters()},
    )
    if config.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        if "head" in config.params:
            prepared.head_untied = untie_head(model)
        if "lora" in config.params:
            add_adapters(model, config.lora, config.rank, config.alpha, config.dropout)
        select_trainable(model, config.params)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            # Trainable tensors in fp32: bf16 updates of size lr * grad round away.
            prepared.dtypes[id(param)] = param.dtype
            param.data = param.data.float()
    return prepared


# ---------------------------------------------------------------------------------------------
# Training


def _train_lm(
    accelerator: Accelerator,
    model: nn.Module,
    config: PerpConfig,
    windows: torch.Tensor,
    dtype: torch.dtype,
    progress: bool,
) -> dict:
    """Next-token training of the parameters with ``requires_grad`` on the shared loop.

    Micro-batch i is windows ``[i * batch_size, (i + 1) * batch_size)`` on every process;
    each process trains on its :func:`local_rows` of it. Windows all have ``seq_len`` tokens,
    so the mean over a share is an equal part of the mean over the micro-batch.
    """
    masks = []
    if config.method == "full":  # in each weight's own layout (Conv1D is in x out)
        masks = [(m.weight, m.weight.detach() != 0) for m in pruned_linears(model).values()]
    size = config.batch_size
    rows, rowwise = local_rows(accelerator, size), dropout_active(model)

    def micro_loss(wrapped: nn.Module, step: int, micro: int) -> torch.Tensor:
        first = ((step - 1) * config.grad_accum + micro) * size

        def loss_of(group: list[int]) -> torch.Tensor:
            ids = windows[[first + row for row in group]].to(accelerator.device)
            return wrapped(input_ids=ids, labels=ids, use_cache=False).loss

        return shard_loss(rows, loss_of, rowwise=rowwise, key=(config.seed, step, micro),
                          device=accelerator.device)  # fmt: skip

    @torch.no_grad()
    def reapply_masks(step: int, loss: float) -> None:
        for weight, mask in masks:
            weight.mul_(mask.to(weight.device))

    train = TrainConfig(steps=config.steps, lr=config.lr, grad_accum=config.grad_accum,
                        warmup=config.warmup, desc=f"retrain {config.method}")  # fmt: skip
    result = train_loop(accelerator, model, micro_loss, train, dtype=dtype,
                        after_step=reapply_masks, progress=progress)  # fmt: skip
    return {"losses": result["losses"], "optimizer_steps": result["optimizer_steps"]}


def _reconstruct(
    model: nn.Module,
    dense: nn.Module,
    config: PerpConfig,
    windows: torch.Tensor,
    dtype: torch.dtype,
    progress: bool,
) -> dict:
    """Per block: fit the block's trainable subset so its output matches the dense block's on
    the inputs the (already reconstructed) pruned prefix produces, then move on.

    Blocks train in eval mode: dropout would only add noise to a regression target.
    """
    dense_blocks = Anatomy.of(dense).blocks
    if len(dense_blocks) != len(Anatomy.of(model).blocks):
        raise OptlabError("the dense model has a different number of blocks than the pruned one")
    accelerator = make_accelerator(config.grad_accum, next(model.parameters()).device)
    losses: list[float] = []
    block_mse: list[dict[str, float]] = []

    def mse(block: nn.Module, ctx: BlockContext, targets: list[torch.Tensor], b: int):
        with autocast(ctx.inputs[b].device, dtype):
            out = call_block(block, ctx.inputs[b], ctx.args[b], ctx.kwargs[b])
        return F.mse_loss(out.float(), targets[b].float())

    def fit(ctx: BlockContext) -> None:
        dense_block = dense_blocks[ctx.index]
        dense_home = next(dense_block.parameters()).device
        dense_block.to(ctx.inputs[0].device)
        with torch.no_grad():
            batches = zip(ctx.inputs, ctx.args, ctx.kwargs, strict=True)
            targets = [call_block(dense_block, x, a, k) for x, a, k in batches]
        dense_block.to(dense_home)
        n = len(ctx.inputs)
        with torch.no_grad():
            before = sum(mse(ctx.block, ctx, targets, b).item() for b in range(n)) / n
        if any(p.requires_grad for p in ctx.block.parameters()):

            def micro_loss(block: nn.Module, step: int, micro: int) -> torch.Tensor:
                b = ((step - 1) * config.grad_accum + micro) % n  # cycle over the batches
                loss = mse(block, ctx, targets, b)
                check_finite(loss, f"block {ctx.index} step {step}")
                return loss

            train = TrainConfig(steps=config.steps, lr=config.lr, grad_accum=config.grad_accum,
                                warmup=config.warmup, desc=f"block {ctx.index}")  # fmt: skip
            # Autocast is mse's own (around the block only), so the loop runs in fp32.
            result = train_loop(accelerator, ctx.block, micro_loss, train, progress=False,
                                train_mode=False)  # fmt: skip
            losses.extend(result["losses"])
        with torch.no_grad():
            after = sum(mse(ctx.block, ctx, targets, b).item() for b in range(n)) / n
        block_mse.append({"block": ctx.index, "before": before, "after": after})

    was_training = model.training
    model.eval()
    try:
        run_layerwise(model, batched(windows, config.batch_size), fit, progress=progress)
    finally:
        model.train(was_training)
    return {"losses": losses, "optimizer_steps": config.steps, "block_mse": block_mse}


def retrain(
    lm: LoadedModel,
    config: PerpConfig | None = None,
    *,
    dense: LoadedModel | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Retrain the pruned ``lm`` in place; adapters are merged, so it ends a plain sparse model.

    ``dense`` (the model before pruning) is needed by ``method="reconstruct"`` only. Returns
    metrics: ``losses`` (one per optimizer step), ``trainable_parameters``,
    ``total_parameters`` (of the model as trained: adapters and an untied head copy count),
    ``trainable_share``, ``seconds``, ``sparsity_before`` / ``sparsity_after`` and
    ``mask_held`` (the zero set of every block linear is unchanged).

    >>> metrics = retrain(lm, PerpConfig(params=("bias", "norm", "lora"), steps=200))
    >>> metrics["sparsity_after"]["total"] == metrics["sparsity_before"]["total"]
    True
    """
    config = config or PerpConfig()
    if config.method == "reconstruct" and dense is None:
        raise OptlabError("method 'reconstruct' needs the dense model (dense=...)")
    model = lm.model
    if adapters_of(model):
        raise OptlabError("the model already has LoRA adapters: merge_adapters() it first")
    torch.manual_seed(config.seed)  # adapter init and dropout
    accelerator = None
    if config.method == "reconstruct":
        count = config.windows
    else:
        # accelerate.Accelerator: imported here, as it is slow and only training needs it.
        accelerator = make_accelerator(config.grad_accum, next(model.parameters()).device)
        local_rows(accelerator, config.batch_size)  # a batch that does not split fails now
        count = config.steps * config.grad_accum * config.batch_size
    windows = sample_windows(lm.tokenizer, load_text(config.corpus), count,
                             window_length(model, config.seq_len, default=PerpConfig.seq_len),
                             config.seed)  # fmt: skip
    masks_before = _masks_on_cpu(model)
    sparsity_before = sparsity_report(model)
    start = time.perf_counter()
    prepared = _prepare(model, config)
    trainable, total = parameter_counts(model)
    log.info("retraining %d of %d parameters (%.3f%%)", trainable, total, 100 * trainable / total)
    try:
        if config.method == "reconstruct":
            assert dense is not None
            result = _reconstruct(
                model, dense.model, config, windows, prepared.compute_dtype, progress
            )
        else:
            assert accelerator is not None
            result = _train_lm(
                accelerator, model, config, windows, prepared.compute_dtype, progress
            )
    finally:
        merged = merge_adapters(model)
        prepared.restore(model)
    seconds = time.perf_counter() - start
    moved = compare_masks(masks_before, _masks_on_cpu(model))
    if config.method != "full" and config.lora == "plain" and "lora" in config.params:
        log.warning("plain LoRA merged densely: the pruned weights are no longer zero")
    return {
        "method": config.method,
        "params": "all" if config.method == "full" else ",".join(config.params),
        "lora": config.lora if config.method != "full" and "lora" in config.params else None,
        **result,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": trainable / total,
        "seconds": seconds,
        "head_untied": prepared.head_untied,
        "merged_adapters": merged,
        "sparsity_before": sparsity_before,
        "sparsity_after": sparsity_report(model),
        **moved,
    }


__all__ = [
    "METHODS",
    "PARAM_SETS",
    "PerpConfig",
    "compare_masks",
    "is_norm",
    "masks_of",
    "parameter_counts",
    "retrain",
    "select_trainable",
    "sparsity_report",
    "untie_head",
]
