"""load_model's loader registry: packages above core hook their folder formats in."""

import pytest
import torch

from optlab.core import hooks, models
from optlab.core.models import load_model, register_loader, save_model


@pytest.fixture
def loaders(monkeypatch):
    """An empty registry for the test, and a record of the tables core asked plugins for."""
    asked = []
    monkeypatch.setattr(models, "_LOADERS", [])
    monkeypatch.setattr(hooks, "_importer", asked.append)
    return asked


def test_a_marker_file_or_a_predicate_picks_the_loader(tmp_path, loaders) -> None:
    saved = save_model(load_model("tiny:gpt2"), tmp_path / "run" / "model")
    other = load_model("tiny:llama")
    calls = []

    def load(folder, dtype):
        calls.append((folder, dtype))
        return other.model, other.tokenizer

    register_loader("custom.json", load)
    register_loader("custom.json", load)  # a package imported twice registers once
    assert load_model(str(tmp_path / "run")).family == "gpt2"  # no marker: from_pretrained
    (saved / "custom.json").write_text("{}")
    lm = load_model(str(tmp_path / "run"), dtype="bfloat16")
    assert lm.model is other.model and calls == [(str(saved), torch.bfloat16)]
    assert loaders and set(loaders) == {hooks.MODEL_LOADERS}  # plugins asked before looking

    models._LOADERS.clear()
    register_loader(lambda folder: folder.name == "model", load)
    assert load_model(str(saved)).model is other.model and len(calls) == 2


def test_the_plugin_list_names_the_quantized_loader() -> None:
    """The real importer: quant is named for MODEL_LOADERS and registers when imported."""
    from optlab import plugins
    from optlab.quant.storage import MANIFEST, load_quantized

    assert "optlab.quant" in plugins.PLUGINS[hooks.MODEL_LOADERS]
    plugins.import_plugins(hooks.MODEL_LOADERS)
    assert (MANIFEST, load_quantized) in models._LOADERS
