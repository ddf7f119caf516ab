"""Machine unlearning (gradient-ascent family) and its metric suite.

The runs (teach, oracle, unlearn, measure, sweeps) are :func:`optlab.api.unlearn` and
:func:`optlab.api.unlearn_sweep`; this package holds their parts.

>>> from optlab.unlearning import UnlearnConfig, unlearn, evaluate_model
>>> result = unlearn(lm, forget, retain, UnlearnConfig(method="graddiff", steps=100))
>>> evaluate_model(lm, forget, retain, holdout, oracle=oracle.model)["FA"]
"""

from optlab.unlearning.data import Example, encode, load_examples
from optlab.unlearning.harm import HarmClassifier
from optlab.unlearning.losses import LOSSES, Loss, offered_methods
from optlab.unlearning.metrics import EvalConfig, evaluate_model
from optlab.unlearning.scenarios import Scenario, UnlearnData
from optlab.unlearning.tasks import unlearn_task  # registers unlearn:RUN with eval
from optlab.unlearning.trainer import TeachConfig, UnlearnConfig, UnlearnResult, unlearn

__all__ = [
    "LOSSES",
    "EvalConfig",
    "Example",
    "HarmClassifier",
    "Loss",
    "Scenario",
    "TeachConfig",
    "UnlearnConfig",
    "UnlearnData",
    "UnlearnResult",
    "encode",
    "evaluate_model",
    "load_examples",
    "offered_methods",
    "unlearn",
    "unlearn_task",
]
