"""In-context demonstrations (selection by dev Spearman, the saved run, --demo RUN), the
honest dev/test halves, transfer classification and the MiniLM column."""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from optlab.cli import main
from optlab.core.models import load_model
from optlab.embed import Embedder, PromptEOLConfig
from optlab.embed.demos import builtin_candidates, read_candidates
from optlab.embed.sts import sts_pairs, sts_spearman
from optlab.embed.transfer import classification_set, cross_val_accuracy
from optlab.errors import OptlabError

CANDIDATES = [("A man is smoking.", "Smoking"), ("meat from a deer.", "Venison"),
              ("A jockey riding a horse.", "Equestrian")]  # fmt: skip


def test_the_demonstration_format_is_the_papers_exactly(tmp_path) -> None:
    saved = tmp_path / "run"
    saved.mkdir()
    PromptEOLConfig(demo="meat from a deer.=>Venison").save(saved)
    expected = ('This sentence : "meat from a deer." means in one word:"Venison".'
                'This sentence : "A dog runs." means in one word:"')  # fmt: skip
    for demo in ("opt-13b", "meat from a deer.=>Venison", str(saved), str(saved / "prompt.json")):
        assert PromptEOLConfig(demo=demo).prompt("A dog runs") == expected
    # the word is what follows the last "=>": a sentence may hold one
    assert PromptEOLConfig(demo="a => b.=>C").demonstration() == ("a => b.", "C")


def test_the_halves_are_disjoint_and_cover_the_sets() -> None:
    for name in ("lee", "wordsim353", "simlex999"):
        dev, test = sts_pairs(f"{name}:dev"), sts_pairs(f"{name}:test")
        assert not set(dev) & set(test)
        assert set(dev) | set(test) <= set(sts_pairs(name))
    docs = lambda pairs: {t for a, b, _ in pairs for t in (a, b)}  # noqa: E731
    assert not docs(sts_pairs("lee:dev")) & docs(sts_pairs("lee:test"))  # split by document
    assert len(docs(sts_pairs("lee:dev"))) == 25
    assert len(sts_pairs("simlex999:dev")) + len(sts_pairs("simlex999:test")) == 999


def test_selection_keeps_the_candidate_with_the_best_dev_spearman(tmp_path, capsys) -> None:
    lm = load_model("tiny:llama")
    dev = sts_pairs("wordsim353:dev")[:30]
    by_hand = []  # the direct computation: each demo's prompt, embed, Spearman
    for sentence, word in CANDIDATES:
        embedder = Embedder(lm, PromptEOLConfig(demo=f"{sentence}=>{word}"))
        by_hand.append(sts_spearman(embedder.encode, dev))
    pairs = tmp_path / "dev.tsv"
    pairs.write_text("sentence1\tsentence2\tscore\n" +
                     "".join(f"{a}\t{b}\t{s}\n" for a, b, s in dev))  # fmt: skip
    candidates = tmp_path / "c.jsonl"
    candidates.write_text("".join(json.dumps({"sentence": s, "word": w}) + "\n"
                                  for s, w in CANDIDATES))  # fmt: skip
    run = tmp_path / "sel"
    assert main(["embed", "select-demo", "tiny:llama", "--candidates", str(candidates),
                 "--dev", str(pairs), "--out", str(run), "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    scores = [c["spearman"] for c in result["candidates"]]
    np.testing.assert_allclose(scores, by_hand, atol=1e-6)
    best = CANDIDATES[int(np.argmax(by_hand))]
    saved = json.loads((run / "prompt.json").read_text())["demo"]
    assert (saved["sentence"], saved["word"]) == best
    plain = sts_spearman(Embedder(lm).encode, dev)
    assert result["plain"]["spearman"] == pytest.approx(plain, abs=1e-6)
    # --demo RUN on the other commands: the same prompt as the demo written out
    assert main(["embed", "eval", "tiny:llama", "--sts", str(pairs), "--demo", str(run),
                 "--no-minilm", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["sts"][str(pairs)]["spearman"] == \
        pytest.approx(max(by_hand), abs=1e-6)  # fmt: skip


def test_the_builtin_candidates_are_real_one_word_glosses() -> None:
    candidates = builtin_candidates()
    assert len(candidates) >= 100 and len(set(candidates)) == len(candidates)
    assert ("relating to switzerland or its people.", "Swiss") in candidates  # the paper's
    assert ("the capital city of Syria.", "Damascus") in candidates
    assert all(len(word.split()) == 1 for _, word in candidates)
    assert read_candidates("builtin") == candidates


def test_candidate_files_in_every_layout(tmp_path) -> None:
    txt, tsv = tmp_path / "c.txt", tmp_path / "c.tsv"
    txt.write_text("A man is smoking.=>Smoking\n\nmeat from a deer. => Venison\n")
    tsv.write_text("sentence\tword\nA man is smoking.\tSmoking\n")
    assert read_candidates(txt) == CANDIDATES[:2]
    assert read_candidates(tsv) == CANDIDATES[:1]


def test_transfer_accuracy_is_logistic_regression_over_stratified_folds() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    labels = [str(int(v > 0)) for v in x[:, 0] + 0.5 * rng.normal(size=40)]
    mean, std = cross_val_accuracy(x, labels, folds=4, seed=3)
    y = np.asarray(labels)
    accuracy = []  # the direct computation
    for train, test in StratifiedKFold(4, shuffle=True, random_state=3).split(x, y):
        scaler = StandardScaler().fit(x[train])
        model = LogisticRegression(max_iter=2000).fit(scaler.transform(x[train]), y[train])
        accuracy.append(100 * np.mean(model.predict(scaler.transform(x[test])) == y[test]))
    assert (mean, std) == pytest.approx((np.mean(accuracy), np.std(accuracy)))
    assert 70 < mean <= 100  # the label follows the first feature


def test_classification_files(tmp_path) -> None:
    tsv = tmp_path / "t.tsv"
    tsv.write_text("id\ttext\tlabel\n1\tgood\tpos\n2\tbad\tneg\n")
    assert classification_set(str(tsv)) == (["good", "bad"], ["pos", "neg"])
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    assert classification_set(str(jsonl)) == (["good", "bad"], ["1", "0"])
    assert len(classification_set("sentiment")[0]) == 200


def test_eval_scores_minilm_beside_on_the_same_pairs_and_folds(tmp_path, capsys) -> None:
    run = tmp_path / "eval"
    assert main(["embed", "eval", "tiny:llama", "--sts", "wordsim353:test", "--limit", "20",
                 "--classify", "sentiment", "--folds", "3", "--out", str(run),
                 "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    from optlab.embed.baseline import minilm_encoder

    minilm = minilm_encoder()
    pairs = sts_pairs("wordsim353:test")[:20]
    assert result["sts"]["wordsim353:test"]["minilm"]["spearman"] == \
        pytest.approx(sts_spearman(minilm, pairs), abs=1e-6)  # fmt: skip
    texts, labels = classification_set("sentiment")
    accuracy, std = cross_val_accuracy(np.asarray(minilm(texts)), labels, 3, 0)
    task = result["classify"]["sentiment"]
    assert task["minilm"] == pytest.approx({"accuracy": accuracy, "std": std})
    assert task["examples"] == 200 and task["folds"] == 3 and 0 <= task["accuracy"] <= 100
    assert "minilm" in (run / "metrics.json").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["select-demo", "tiny:llama", "--candidates", "TWO_WORDS", "--out", "OUT"],
         "must be one word"),
        (["select-demo", "tiny:llama", "--candidates", "EMPTY", "--out", "OUT"], "empty"),
        (["select-demo", "tiny:llama", "--candidates", "NO_ARROW", "--out", "OUT"],
         "SENTENCE=>WORD"),
        (["select-demo", "tiny:llama", "--dev", "wordsim:dev", "--out", "OUT"],
         "Did you mean 'wordsim353:dev'"),
        (["select-demo", "tiny:llama", "--demo", "opt-13b", "--out", "OUT"], "drop --demo"),
        (["eval", "tiny:llama", "--classify", "sentimnt", "--out", "OUT"],
         "Did you mean 'sentiment'"),
        (["eval", "tiny:llama", "--classify", "NO_LABEL", "--out", "OUT"], "'label' columns"),
        (["eval", "tiny:llama", "--classify", "FEW", "--out", "OUT"], "fewer than the 10 folds"),
        (["eval", "tiny:llama", "--demo", "NOT_A_RUN", "--out", "OUT"], "no prompt.json"),
        (["eval", "tiny:llama", "--sts", "lee:devv", "--out", "OUT"], "Did you mean 'lee:dev'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message) -> None:
    files = {"TWO_WORDS": ("c.txt", "A man is smoking.=>Smoking\nmeat.=>deer meat\n"),
             "EMPTY": ("e.txt", ""), "NO_ARROW": ("n.txt", "A man is smoking.\n"),
             "NO_LABEL": ("l.csv", "text,class\ngood,1\n"),
             "FEW": ("f.csv", "text,label\ngood,1\nbad,0\n")}  # fmt: skip
    for name, text in files.values():
        (tmp_path / name).write_text(text)
    (tmp_path / "plain").mkdir()
    where = {key: str(tmp_path / name) for key, (name, _) in files.items()}
    where |= {"OUT": str(tmp_path / "out"), "NOT_A_RUN": str(tmp_path / "plain")}
    assert main(["embed", *[where.get(a, a) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("optlab: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()
    with pytest.raises(OptlabError):
        PromptEOLConfig(demo=str(tmp_path / "plain"))
