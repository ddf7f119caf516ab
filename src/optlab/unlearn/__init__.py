"""Machine unlearning (gradient-ascent family) and its metric suite.

>>> from optlab.unlearn import UnlearnConfig, unlearn, evaluate_model
>>> result = unlearn(lm, forget, retain, UnlearnConfig(method="graddiff", steps=100))
>>> evaluate_model(lm, forget, retain, holdout, oracle=oracle.model)["FA"]
"""

from optlab.unlearn.data import Example, encode, load_examples
from optlab.unlearn.harm import HarmClassifier
from optlab.unlearn.losses import LOSSES, METHODS
from optlab.unlearn.metrics import EvalConfig, evaluate_model
from optlab.unlearn.tasks import unlearn_task  # registers unlearn:RUN with eval
from optlab.unlearn.trainer import UnlearnConfig, UnlearnResult, unlearn

__all__ = [
    "LOSSES",
    "METHODS",
    "EvalConfig",
    "Example",
    "HarmClassifier",
    "UnlearnConfig",
    "UnlearnResult",
    "encode",
    "evaluate_model",
    "load_examples",
    "unlearn",
    "unlearn_task",
]
