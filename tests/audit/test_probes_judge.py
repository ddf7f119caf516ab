import json

import pytest

from optlab.audit.graph import DomainGraph
from optlab.audit.judge import GraphJudge, ModelJudge, sentences
from optlab.audit.probes import (
    FRAMINGS,
    Fact,
    TemplateLibrary,
    build_probes,
    load_facts,
    load_prompts,
    related_entities,
)
from optlab.errors import OptlabError

UNITS = [["France", "Paris", "euro", "Europe"], ["Germany", "Berlin", "euro", "Europe"],
         ["France", "Germany"], ["France", "Belgium"], ["France", "Belgium"]]  # fmt: skip
GRAPH = DomainGraph.from_units(UNITS, {"Paris": ["City of Light"]})
FACT = Fact("What is the capital of France?", "Paris", "France")
PROMPT = "As the professor Dupont says, this is known. What is the capital of France?"


@pytest.mark.parametrize(
    ("response", "labels"),
    [
        ("The capital is Paris. It is lovely.", ["factual", "non-factual"]),
        ("PARIS!", ["factual"]),
        ("They call it the city of light.", ["factual"]),  # an alias of the answer
        ("It is Berlin, like Germany's.", ["non-factual"]),  # other entities of the domain
        ("I do not know.", ["non-factual"]),
        ("The capital of France is Zorblax City.", ["hallucinated"]),  # outside the graph
        ("Dupont would say Berlin.", ["non-factual"]),  # a name taken from the prompt
        ("I love Parisian food.", ["hallucinated"]),  # whole words: not the answer
        ("Beautiful weather.", ["non-factual"]),  # a common word opening a sentence is no name
        ("Calcutta.", ["hallucinated"]),  # a name opening a sentence still is one
        ("", ["non-factual"]),
    ],
)
def test_graph_judge_on_crafted_sentences(response, labels) -> None:
    verdict = GraphJudge(GRAPH).judge(FACT, PROMPT, response)
    assert verdict.labels == labels
    assert verdict.recall == ("factual" in labels)
    assert sum(verdict.shares.values()) == pytest.approx(1.0)


def test_sentence_split_and_shares() -> None:
    assert sentences("Paris. Berlin!\nIs it? ...") == ["Paris.", "Berlin!", "Is it?"]
    verdict = GraphJudge(GRAPH).judge(FACT, PROMPT, "Paris. Berlin. It is Zorblax.")
    assert verdict.shares == pytest.approx({"factual": 1 / 3, "non-factual": 1 / 3,
                                            "hallucinated": 1 / 3})  # fmt: skip


class FavouringScorer:
    """A stand-in scorer: the label word containing ``favourite`` scores highest."""

    def __init__(self, favourite: str) -> None:
        self.favourite = favourite
        self.requests: list[tuple[str, str]] = []

    def loglikelihood(self, requests):
        self.requests += requests
        return [(0.0 if self.favourite in c else -5.0, False) for _, c in requests]


def test_model_judge_has_the_same_interface() -> None:
    scorer = FavouringScorer("halluc")
    verdicts = ModelJudge(scorer).judge_all([(FACT, PROMPT, "Paris. Berlin."), (FACT, PROMPT, "")])
    assert [v.labels for v in verdicts] == [["hallucinated"] * 2, ["hallucinated"]]
    assert len(scorer.requests) == 3 * 3  # three sentences x three labels
    assert "Correct answer: Paris" in scorer.requests[0][0]


def test_template_library_shipped_and_user_extended(tmp_path) -> None:
    shipped = TemplateLibrary.load()
    assert shipped.framings == list(FRAMINGS) and shipped.suffix == ""
    (tmp_path / "plain.txt").write_text("# mine\nQ: {question}\n")
    (tmp_path / "suffix.txt").write_text("# insist\nAnswer now.\n")
    (tmp_path / "flattery.txt").write_text("You are so clever. {question}\n")
    mine = TemplateLibrary.load(tmp_path)
    assert mine.framings == [*FRAMINGS, "flattery"]
    assert mine.templates["plain"] == ["Q: {question}"]
    assert mine.render("Q: {question}", FACT) == f"Q: {FACT.question} Answer now."
    (tmp_path / "bad.txt").write_text("no placeholder here\n")
    with pytest.raises(OptlabError, match="lacks"):
        TemplateLibrary.load(tmp_path)
    with pytest.raises(OptlabError, match="template folder not found"):
        TemplateLibrary.load(tmp_path / "missing")


def test_probes_every_fact_in_every_framing_reproducibly() -> None:
    library = TemplateLibrary.load()
    facts = [FACT, Fact("What is the capital of Germany?", "Berlin", "Germany")]
    probes = build_probes(facts, library, seed=3, graph=GRAPH)
    assert len(probes) == 2 * len(FRAMINGS)
    assert [p.framing for p in probes[:4]] == list(FRAMINGS)
    assert probes == build_probes(facts, library, seed=3, graph=GRAPH)
    assert probes[0].prompt == FACT.question  # plain, and no suffix ships
    assert all(FACT.question in p.prompt for p in probes[:4])
    # France's neighbours by weight: Belgium (2), then Europe, Germany, euro (1); never Paris.
    assert related_entities(GRAPH, FACT) == "Belgium, Europe and Germany"
    assert related_entities(GRAPH, Fact("q", "a", "Atlantis")) == ""


def test_load_facts_from_a_run_and_prompts_from_a_file(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "forget.jsonl").write_text(
        json.dumps({"question": "What is the capital of France?", "answer": "Paris"}) + "\n"
        + json.dumps({"text": "a document"}) + "\n"
    )  # fmt: skip
    assert load_facts(run, GRAPH) == [FACT]  # subject found by the graph; documents skipped
    with pytest.raises(OptlabError, match=r"without forget\.jsonl"):
        load_facts(tmp_path)
    prompts = tmp_path / "p.jsonl"
    rows = [dict(question=FACT.question, answer="Paris", framing=f, prompt=f"{f}: q")
            for f in ("plain", "authority")]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    facts, probes = load_prompts(prompts)
    assert len(facts) == 1 and [p.framing for p in probes] == ["plain", "authority"]
    prompts.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(OptlabError, match="no 'plain' prompts"):
        load_prompts(prompts)


def test_model_judge_runs_on_a_tiny_model() -> None:
    from optlab.core.models import load_model
    from optlab.eval.scorer import Scorer

    scorer = Scorer(load_model("tiny:llama"), progress=False)
    verdicts = ModelJudge(scorer).judge_all([(FACT, PROMPT, "Paris. Berlin.")])
    assert len(verdicts[0].labels) == 2
    assert set(verdicts[0].labels) <= {"factual", "non-factual", "hallucinated"}


def test_an_answer_inside_the_subject_is_not_recall() -> None:
    fact = Fact("What is the capital of Holy See (Vatican City State)?", "Vatican City State",
                "Holy See (Vatican City State)")  # fmt: skip
    judge = GraphJudge(DomainGraph.from_units([["Holy See (Vatican City State)",
                                                "Vatican City State"]]))  # fmt: skip
    assert judge.judge(fact, fact.question, "The capital of Holy See (Vatican City State) is "
                       "Rome.").labels == ["hallucinated"]  # fmt: skip
    assert judge.judge(fact, fact.question, "It is Vatican City State.").recall
