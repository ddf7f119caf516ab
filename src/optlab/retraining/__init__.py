"""PERP retraining of pruned models: parameter selection, masked LoRA variants, reconstruction.

>>> from optlab.retraining import PerpConfig, retrain
>>> metrics = retrain(lm, PerpConfig(params=("bias", "norm", "lora"), lora="maskl"))
"""

from optlab.retraining.lora import (
    VARIANTS,
    LoraLinear,
    adapters_of,
    add_adapters,
    make_adapter,
    merge_adapters,
)
from optlab.retraining.perp import (
    METHODS,
    PARAM_SETS,
    PerpConfig,
    masks_of,
    retrain,
    select_trainable,
    sparsity_report,
    untie_head,
)

__all__ = [
    "METHODS",
    "PARAM_SETS",
    "VARIANTS",
    "LoraLinear",
    "PerpConfig",
    "adapters_of",
    "add_adapters",
    "make_adapter",
    "masks_of",
    "merge_adapters",
    "retrain",
    "select_trainable",
    "sparsity_report",
    "untie_head",
]
