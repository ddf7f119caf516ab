"""PromptEOL: the exact prompt, the embedding it reads, batch independence, STS scoring."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from optlab.cli import main
from optlab.core.models import TINY_SHAPES, load_model
from optlab.embed import TEMPLATE, Embedder, PromptEOLConfig, preprocess
from optlab.embed.sts import spearman_x100, sts_pairs
from optlab.errors import OptlabError

SENTENCES = ["A man is playing a guitar.", "Someone plays music on a long stage tonight", "Hi"]


def test_the_template_and_demonstration_are_the_papers_to_the_character() -> None:
    assert TEMPLATE.format("X") == 'This sentence : "X" means in one word:"'
    assert PromptEOLConfig().prompt("A dog runs") == \
        'This sentence : "A dog runs." means in one word:"'  # fmt: skip
    demo = PromptEOLConfig(demo="A jockey riding a horse.=>Equestrian").prompt("X.")
    assert demo == ('This sentence : "A jockey riding a horse." means in one word:"Equestrian".'
                    'This sentence : "X." means in one word:"')  # fmt: skip
    assert PromptEOLConfig(demo="opt-2.7b").prompt("X.") == demo  # the paper's preset
    assert PromptEOLConfig(preprocess=False).prompt('a "b"') == TEMPLATE.format('a "b"')


@pytest.mark.parametrize(
    ("given", "cleaned"),
    [("A dog runs", "A dog runs."), ("Is it?", "Is it."), ('He said "hi"', "He said 'hi'"),
     ('He said "hi"?', "He said 'hi'."), ("It's 'x'", "It's 'x'"), ("", ".")],
)  # fmt: skip
def test_preprocessing_follows_the_official_evaluation(given, cleaned) -> None:
    assert preprocess(given) == cleaned


@pytest.mark.parametrize("demo", ["word", "=>x", "a sentence=>two words", "s=>"])
def test_a_demonstration_needs_a_sentence_and_a_one_word_answer(demo) -> None:
    with pytest.raises(OptlabError, match="--demo"):
        PromptEOLConfig(demo=demo)


@pytest.mark.parametrize("family", sorted(TINY_SHAPES))
def test_the_embedding_is_the_last_layers_state_at_the_prompts_end_whatever_the_batch(family):
    lm = load_model(f"tiny:{family}")
    embedder = Embedder(lm)
    together = embedder.encode(SENTENCES, batch_size=3)
    assert together.shape == (3, embedder.dimension) and together.dtype == np.float32
    for i, sentence in enumerate(SENTENCES):
        ids = lm.tokenizer(embedder.config.prompt(sentence), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            direct = lm.model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
        alone = embedder.encode(sentence)
        assert alone.shape == (embedder.dimension,)
        np.testing.assert_allclose(alone, direct.numpy(), atol=1e-5)  # no padding
        np.testing.assert_allclose(together[i], alone, atol=1e-5)  # left-padded in a batch


def test_encode_speaks_sentence_transformers() -> None:
    embedder = Embedder(load_model("tiny:opt-350m"))  # projects 64 -> 32 after the norm
    assert embedder.dimension == 32
    plain = embedder.encode(sentences=SENTENCES)
    unit = embedder.encode(SENTENCES, normalize_embeddings=True, convert_to_tensor=True)
    assert isinstance(unit, torch.Tensor) and plain.shape == (3, 32)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3))
    sims = embedder.similarity(plain, plain)
    cosine = plain[0] @ plain[1] / np.linalg.norm(plain[0]) / np.linalg.norm(plain[1])
    assert sims.shape == (3, 3) and sims[0, 1] == pytest.approx(cosine, rel=1e-6)
    with pytest.raises(OptlabError, match="no texts"):
        embedder.encode([])


def test_sts_spearman_by_hand_and_the_shipped_sets() -> None:
    assert spearman_x100(np.array([0.1, 0.4, 0.3]), np.array([1.0, 3.0, 2.0])) == 100.0
    assert spearman_x100(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0])) == -100.0
    x, y = np.array([0.2, 0.9, 0.4, 0.5]), np.array([2.0, 4.0, 1.0, 3.0])
    assert spearman_x100(x, y) == pytest.approx(100 * spearmanr(x, y).statistic)
    assert len(sts_pairs("lee")) == 50 * 49 // 2
    assert len(sts_pairs("wordsim353")) == 353 and len(sts_pairs("simlex999")) == 999


def test_sts_files_in_the_stsb_and_sick_layouts(tmp_path) -> None:
    stsb = tmp_path / "stsb.tsv"
    stsb.write_text("genre\tsentence1\tsentence2\tscore\nx\tA b.\tC d.\t4.5\nx\tE.\tF.\t1\n")
    assert sts_pairs(str(stsb)) == [("A b.", "C d.", 4.5), ("E.", "F.", 1.0)]
    sick = tmp_path / "sick.csv"
    sick.write_text("sentence_A,sentence_B,relatedness_score\nA,B,3.2\n")
    assert sts_pairs(str(sick)) == [("A", "B", 3.2)]
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(OptlabError, match="no sentence1,sentence2,score"):
        sts_pairs(str(bad))


def test_cli_encode_writes_a_plain_npy_and_eval_scores(tmp_path, capsys) -> None:
    texts = tmp_path / "s.jsonl"
    texts.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    out = tmp_path / "e.npy"
    assert main(["embed", "encode", "tiny:llama", str(texts), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == [3, 64]
    saved = np.load(out, allow_pickle=False)
    np.testing.assert_allclose(saved, Embedder(load_model("tiny:llama")).encode(SENTENCES),
                               atol=1e-6)  # fmt: skip
    run = tmp_path / "eval"
    assert main(["embed", "eval", "tiny:llama", "--sts", "wordsim353", "--limit", "10",
                 "--out", str(run), "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["sts"]["wordsim353"]["pairs"] == 10
    assert (run / "config.yaml").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "tiny:llama", "--sts", "leee"], "Did you mean 'lee'"),
        (["eval", "tiny:llama", "--demo", "w=>two words"], "must be one word"),
        (["encode", "tiny:llama", "EMPTY", "--out", "OUT"], "empty"),
        (["encode", "tiny:llama", "EMPTY", "--out", "x.txt"], "is not a .npy file"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else str(tmp_path / "o.npy") if a == "OUT" else a
            for a in args]  # fmt: skip
    assert main(["embed", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("optlab: error:") and message in err[0]
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.slow
def test_the_prompts_token_ids_on_the_default_tokenizer() -> None:
    """Pinned ids of a LLaMA-style tokenizer (SmolLM2): any change of the template shows."""
    lm = load_model("default")
    ids = lm.tokenizer(PromptEOLConfig().prompt("A dog runs"))["input_ids"]
    assert ids == [1348, 6330, 1577, 476, 49, 2767, 7313, 1270, 1530, 281, 582, 2229, 25898]
