"""Shared fixtures: tiny random models of every family (CPU, seconds) and the real default."""

from __future__ import annotations

import pytest
import torch

from optlab.core.models import TINY_SHAPES, LoadedModel, load_model

TINY_FAMILIES = sorted(TINY_SHAPES)


@pytest.fixture(scope="session", autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(params=TINY_FAMILIES)
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    """A fresh tiny model of each supported family (tests may edit it)."""
    return load_model(f"tiny:{request.param}", seed=0)


@pytest.fixture(scope="session")
def default_lm() -> LoadedModel:
    """The real default model (SmolLM2-135M); prepared into the cache on first use."""
    return load_model("default")


def random_ids(n: int, length: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


# A tiny but complete UPRISE run (scores, encoders, index, evaluation): the input of the
# retrieve train / index / eval tests, hostile ones included.
RETRIEVE_TINY = ["--hold-out", "topic", "--only", "polarity,newsgroups", "--pool-size", "6",
                 "--test-size", "2", "--candidates", "3"]  # fmt: skip


@pytest.fixture(scope="session")
def retrieve_run(tmp_path_factory: pytest.TempPathFactory):
    import contextlib
    import io

    from optlab.cli import main

    out = tmp_path_factory.mktemp("retrieve") / "uprise"
    args = ["retrieve", "run", "tiny:llama", *RETRIEVE_TINY, "--epochs", "2",
            "--train-batch-size", "2", "--k", "2", "--methods", "zero,uprise", "--bootstrap",
            "50", "--out", str(out)]  # fmt: skip
    # Quiet: a test that asks for this fixture checks what its own command prints.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
    return out
