"""The public API in one place; ``optlab/__init__`` re-exports it lazily.

Every command is a function here: it takes a model (a :class:`LoadedModel`, or a spec or run
directory that :func:`resolve_model` loads), its config, and its data as arguments, and
returns a :class:`Result`; with ``out=`` it also writes a run directory through the one run
harness (:func:`optlab.core.run.execute`) whose ``config.yaml`` replays it
(``optlab rerun``).

>>> import optlab
>>> lm = optlab.load_model("tiny:llama")
>>> result = optlab.prune(lm, optlab.WandaConfig(sparsity=0.5),
...                       calib=optlab.Calibration(n=4, seq_len=32), progress=False)
>>> result["sparsity"]["total"]
0.5
"""

from optlab.api._audits import audit_graph, audit_reliability, audit_skeb
from optlab.api._base import rerun, resolve_model
from optlab.api._compress import QUANT_CALIB, export, prune, quantize, retrain
from optlab.api._early_exit import exit_bench, exit_generate, exit_train
from optlab.api._embed import embed_encode, embed_eval, embed_select_demo, embed_train
from optlab.api._evaluation import describe_model, evaluate, info
from optlab.api._exit_policy import exit_policy
from optlab.api._retrieve import (
    retrieve_eval,
    retrieve_index,
    retrieve_run,
    retrieve_score,
    retrieve_train,
)
from optlab.api._robustness import audit_robustness
from optlab.api._unlearning import unlearn, unlearn_sweep
from optlab.audit.graph import GraphConfig
from optlab.audit.reliability import ReliabilityConfig
from optlab.audit.robustness import RobustnessConfig
from optlab.audit.skeb import SkebConfig
from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.calibration import Calibration
from optlab.core.job import Result
from optlab.core.layerwise import BlockContext, run_layerwise
from optlab.core.models import LoadedModel, load_model
from optlab.core.run import Run
from optlab.early_exit.bench import BenchConfig
from optlab.early_exit.data import CodeDataConfig, CompletionConfig
from optlab.early_exit.generate import GenerateConfig, PromptsConfig
from optlab.early_exit.policy import PolicyConfig
from optlab.early_exit.train import ExitTrainConfig
from optlab.embed.baseline import BaselineConfig
from optlab.embed.contrastive import ContrastiveConfig
from optlab.embed.demos import SelectDemoConfig
from optlab.embed.prompteol import Embedder, PromptEOLConfig
from optlab.embed.sts import STSEval
from optlab.embed.transfer import TransferEval
from optlab.embed.triplets import TripletData
from optlab.errors import OptlabError
from optlab.eval.perplexity import PerplexityEval, perplexity
from optlab.eval.scorer import Scorer
from optlab.eval.tasks import TaskEval, get_task, run_tasks
from optlab.pruning.pruner import MagnitudeConfig, SparseGPTConfig, WandaConfig
from optlab.quant.gguf_export import ExportConfig
from optlab.quant.quantize import (
    AvgBitsConfig,
    CMPQConfig,
    GPTQConfig,
    MaxSizeConfig,
    PMPQConfig,
    RTNConfig,
    StorageConfig,
    TDMPQConfig,
    TiersConfig,
    UniformConfig,
)
from optlab.retraining.perp import PerpConfig
from optlab.retrieve.pipeline import RetrievalEval
from optlab.retrieve.retriever import RetrieverConfig
from optlab.retrieve.scoring import ScoreConfig
from optlab.retrieve.tasks import TaskSplit
from optlab.unlearning.data import Example
from optlab.unlearning.metrics import EvalConfig
from optlab.unlearning.scenarios import Scenario, UnlearnData
from optlab.unlearning.trainer import TeachConfig, UnlearnConfig

__all__ = [
    "QUANT_CALIB",
    # the core, for new methods
    "Anatomy",
    # configs and data specs
    "AvgBitsConfig",
    "BaselineConfig",
    "BenchConfig",
    "BlockContext",
    "CMPQConfig",
    "Calibration",
    "CodeDataConfig",
    "CompletionConfig",
    "ContrastiveConfig",
    "Embedder",
    "EvalConfig",
    "Example",
    "ExitTrainConfig",
    "ExportConfig",
    "GPTQConfig",
    "GenerateConfig",
    "GraphConfig",
    "LoadedModel",
    "MagnitudeConfig",
    "MaxSizeConfig",
    "OptlabError",
    "PMPQConfig",
    "PerpConfig",
    "PerplexityEval",
    "PolicyConfig",
    "PromptEOLConfig",
    "PromptsConfig",
    "RTNConfig",
    "ReliabilityConfig",
    "Result",
    "RetrievalEval",
    "RetrieverConfig",
    "RobustnessConfig",
    "Run",
    "STSEval",
    "Scenario",
    "ScoreConfig",
    "Scorer",
    "SelectDemoConfig",
    "SkebConfig",
    "SparseGPTConfig",
    "StorageConfig",
    "TDMPQConfig",
    "TaskEval",
    "TaskSplit",
    "TeachConfig",
    "TiersConfig",
    "TransferEval",
    "TripletData",
    "UniformConfig",
    "UnlearnConfig",
    "UnlearnData",
    "WandaConfig",
    # commands
    "audit_graph",
    "audit_reliability",
    "audit_robustness",
    "audit_skeb",
    "describe_model",
    "embed_encode",
    "embed_eval",
    "embed_select_demo",
    "embed_train",
    "evaluate",
    "exit_bench",
    "exit_generate",
    "exit_policy",
    "exit_train",
    "export",
    "get_task",
    "info",
    "load_model",
    "perplexity",
    "prune",
    "quantize",
    "rerun",
    "resolve_model",
    "retrain",
    "retrieve_eval",
    "retrieve_index",
    "retrieve_run",
    "retrieve_score",
    "retrieve_train",
    "run_layerwise",
    "run_tasks",
    "unlearn",
    "unlearn_sweep",
    "weight_matrix",
]  # fmt: skip
