"""PromptEOL as an MTEB 2.x model: ``PromptEOLModel`` follows mteb's ``EncoderProtocol``
(``mteb/models/models_protocols.py``): ``__init__(model_name, revision, *, device)``,
``encode(DataLoader of batches, *, task_metadata, hf_split, hf_subset, prompt_type)``,
``similarity``, ``similarity_pairwise`` (cosine) and a ``mteb_model_meta`` property, so
``mteb.evaluate`` runs it like any registered model.

With hub access, the real MTEB tasks run like this (the tasks' data is downloaded by mteb)::

    import mteb
    from optlab.embed.mteb_model import PromptEOLModel

    model = PromptEOLModel("facebook/opt-1.3b", demo="opt-1.3b")  # or "default", a run folder
    tasks = mteb.get_tasks(tasks=["STS12", "STS13", "STS14", "STS15", "STS16",
                                  "STSBenchmark", "SICK-R"])
    results = mteb.evaluate(model, tasks, encode_kwargs={"batch_size": 32})
    for task in results.task_results:
        print(task.task_name, task.get_score())

mteb writes its results under ``~/.cache/mteb`` (``cache=None`` keeps nothing). Offline, a
task whose ``load_data`` builds its dataset locally runs the same way (tests/embed/
test_mteb.py does this with an STS task).

>>> model = PromptEOLModel("tiny:llama")
>>> model.mteb_model_meta.embed_dim, model.mteb_model_meta.similarity_fn_name.value
(64, 'cosine')
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mteb.models.model_meta import ModelMeta
from torch.utils.data import DataLoader

from optlab.core.models import load_model
from optlab.embed.prompteol import Embedder, PromptEOLConfig


class PromptEOLModel:
    """An MTEB encoder around :class:`Embedder`. ``model_name`` is any optlab model spec
    (``default``, a hub id, a folder, a run); ``demo``, ``preprocess`` and ``batch_size``
    are :class:`PromptEOLConfig`'s; ``embedder`` wraps one already loaded instead."""

    def __init__(
        self,
        model_name: str,
        revision: str | None = None,
        *,
        device: str | None = None,
        dtype: str = "float32",
        embedder: Embedder | None = None,
        **prompt: Any,
    ) -> None:
        if embedder is None:
            lm = load_model(model_name, dtype=dtype, device=device or "cpu")
            embedder = Embedder(lm, PromptEOLConfig(**prompt))
        self.embedder = embedder
        lm = embedder.lm
        name = model_name if "/" in model_name else f"optlab/{model_name.replace(':', '-')}"
        self._meta = ModelMeta(
            loader=PromptEOLModel, loader_kwargs=dict(prompt), name=name, revision=revision,
            release_date=None, languages=None,
            n_parameters=sum(p.numel() for p in lm.model.parameters()), memory_usage_mb=None,
            max_tokens=getattr(lm.model.config, "max_position_embeddings", None),
            embed_dim=embedder.dimension, license=None, open_weights=True,
            public_training_code=None, public_training_data=None, framework=["PyTorch"],
            similarity_fn_name="cosine", use_instructions=False, training_datasets=None,
        )  # fmt: skip

    @property
    def mteb_model_meta(self) -> ModelMeta:
        return self._meta

    @mteb_model_meta.setter
    def mteb_model_meta(self, meta: ModelMeta) -> None:  # ModelMeta.load_model sets it
        self._meta = meta

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: Any = None,
        hf_split: str | None = None,
        hf_subset: str | None = None,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """The [n, d] embeddings of every text the loader yields, in its order (the same
        PromptEOL prompt for queries and documents: the method has none per task)."""
        texts = [text for batch in inputs for text in batch["text"]]
        bar = kwargs.get("show_progress_bar", False)
        return self.embedder.encode(texts, batch_size=kwargs.get("batch_size"),
                                    show_progress_bar=bar)  # fmt: skip

    def similarity(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """Cosine similarity of every row with every row: [n1, n2]."""
        return torch.from_numpy(Embedder.similarity(embeddings1, embeddings2))

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """Cosine similarity of each row with its partner: [n]."""
        a = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings1)).double(), dim=-1)
        b = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings2)).double(), dim=-1)
        return (a * b).sum(-1)
