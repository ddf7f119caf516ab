import pytest
import torch
from transformers import BertConfig

from optlab.core.models import RANDOM_SHAPES, byte_tokenizer, load_model
from optlab.errors import OptlabError
from tests.conftest import random_ids


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(ids).logits


def test_tiny_models_are_seeded() -> None:
    ids = random_ids(1, 10)
    a, b = load_model("tiny:llama", seed=1), load_model("tiny:llama", seed=1)
    c = load_model("tiny:llama", seed=2)
    torch.testing.assert_close(_logits(a, ids), _logits(b, ids))
    assert not torch.allclose(_logits(a, ids), _logits(c, ids))


def test_run_directory_round_trip(tmp_path) -> None:
    lm = load_model("tiny:gpt2")
    lm.model.save_pretrained(tmp_path / "run" / "model")
    lm.tokenizer.save_pretrained(tmp_path / "run" / "model")
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    again = load_model(str(tmp_path / "run"))
    ids = random_ids(2, 8)
    torch.testing.assert_close(_logits(again, ids), _logits(lm, ids))
    assert again.tokenizer("héllo")["input_ids"] == lm.tokenizer("héllo")["input_ids"]


def test_dtype_and_pad_token() -> None:
    lm = load_model("tiny:opt", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.tokenizer.pad_token_id is not None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tiny:lama", "unknown tiny model family 'lama'. Did you mean 'llama'"),
        ("random:opt-13m", "unknown random shape 'opt-13m'. Did you mean 'opt-350m'"),
        ("org/not-a-model", "Offline, use 'default'"),
    ],
)
def test_bad_specs(spec, message, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(OptlabError, match=message):
        load_model(spec)


def test_bad_dtype_and_device() -> None:
    with pytest.raises(OptlabError, match="Did you mean 'float16'"):
        load_model("tiny:opt", dtype="float61")
    with pytest.raises(OptlabError, match="bad device"):
        load_model("tiny:opt", device="gpu0")


def test_folder_problems(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(OptlabError, match="holds no model"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(OptlabError, match="is a file"):
        load_model(str(tmp_path / "weights.bin"))


def test_non_causal_checkpoint_is_refused(tmp_path) -> None:
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(OptlabError, match="not a causal language model"):
        load_model(str(tmp_path))


def test_pickled_weights_are_refused(tmp_path) -> None:
    lm = load_model("tiny:opt")
    lm.model.config.save_pretrained(tmp_path)
    torch.save(lm.model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OptlabError, match="safetensors only"):
        load_model(str(tmp_path))


def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = byte_tokenizer()
    text = "Raskolnikov — «£5», naïve 東京\n\tend"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert max(ids) < 256 and tok.eos_token_id == 256


@pytest.mark.slow
def test_random_opt_125m_has_the_published_shape() -> None:
    lm = load_model("random:opt-125m")
    config = lm.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.ffn_dim) == (768, 12, 3072)
    assert config.vocab_size == 50272
    # OPT-125m has 125.2M parameters (embedding tied with the head).
    assert abs(sum(p.numel() for p in lm.model.parameters()) - 125.24e6) < 0.01e6
    assert len(lm.tokenizer) <= config.vocab_size  # real subword ids fit the embedding
    assert set(RANDOM_SHAPES) >= {"opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "gpt2",
                                  "pythia-160m", "llama-135m"}  # fmt: skip
