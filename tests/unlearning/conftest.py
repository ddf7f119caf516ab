"""Tiny models on one thread (see tests/retraining/conftest.py for why), and a tiny model that
has memorised the capitals of a dozen countries, so that unlearning has something to remove."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from optlab.core.models import load_model, save_model
from optlab.unlearning.scenarios import country_questions
from optlab.unlearning.trainer import UnlearnConfig, unlearn

TAUGHT_COUNTRIES = 16


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def capital_questions(n: int = TAUGHT_COUNTRIES):
    """(country, example) for the first n capital questions with short answers."""
    pairs = [(c, e) for c, e in country_questions() if "capital" in e.question]
    return [(c, e) for c, e in pairs if len(e.answer) <= 8][:n]


@pytest.fixture(scope="session")
def taught_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny:llama fine-tuned until it answers the capital questions (saved once per session)."""
    torch.set_num_threads(1)
    lm = load_model("tiny:llama", seed=0)
    examples = [e for _, e in capital_questions()]
    config = UnlearnConfig(method="finetune", steps=150, lr=3e-3, batch_size=8, seed=0)
    unlearn(lm, examples, None, config, progress=False)
    folder = tmp_path_factory.mktemp("taught") / "model"
    save_model(lm, folder)
    return folder
