"""MTEB 2.x runs our PromptEOL model through its own evaluator, offline: an STS task whose
data is built locally (WordSim-353 pairs), scored by mteb and checked by direct computation."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from optlab.core.models import load_model
from optlab.embed import Embedder
from optlab.embed.sts import sts_pairs

mteb = pytest.importorskip("mteb")
from datasets import Dataset, DatasetDict  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.models.models_protocols import EncoderProtocol  # noqa: E402

from optlab.embed.mteb_model import PromptEOLModel  # noqa: E402

PAIRS = sts_pairs("wordsim353")[:40]


class LocalWordSim(AbsTaskSTS):
    metadata = TaskMetadata(
        name="LocalWordSim", description="WordSim-353 pairs, built locally (no hub).",
        reference=None, dataset={"path": "local/wordsim353", "revision": "local"}, type="STS",
        category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
        main_score="cosine_spearman", date=None, domains=None, task_subtypes=None,
        license="not specified", annotations_creators="human-annotated", dialect=[],
        sample_creation="found", bibtex_citation="",
    )  # fmt: skip
    min_score, max_score = 0, 10

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        columns = {"sentence1": [a for a, _, _ in PAIRS], "sentence2": [b for _, b, _ in PAIRS],
                   "score": [s for *_, s in PAIRS]}  # fmt: skip
        self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
        self.data_loaded = True


def test_mteb_evaluates_our_model_and_gets_our_spearman() -> None:
    embedder = Embedder(load_model("tiny:llama"))
    model = PromptEOLModel("tiny:llama", embedder=embedder)
    assert isinstance(model, EncoderProtocol)
    results = mteb.evaluate(model, LocalWordSim(), cache=None, show_progress_bar=False,
                            encode_kwargs={"batch_size": 8})  # fmt: skip
    score = results.task_results[0].scores["test"][0]
    vectors = embedder.encode([t for a, b, _ in PAIRS for t in (a, b)])
    cosine = Embedder.similarity(vectors[0::2], vectors[1::2]).diagonal()
    expected = spearmanr(cosine, [s for *_, s in PAIRS]).statistic
    assert score["cosine_spearman"] == pytest.approx(expected, abs=1e-6)
    pairwise = model.similarity_pairwise(vectors[0::2], vectors[1::2]).numpy()
    np.testing.assert_allclose(pairwise, cosine, atol=1e-9)
