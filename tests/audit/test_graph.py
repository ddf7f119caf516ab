import numpy as np
import pytest

from optlab.audit.entangle import METRIC_NAMES, entanglement, spreading_activation
from optlab.audit.graph import DomainGraph, EntityMatcher, country_graph, load_domain
from optlab.errors import OptlabError

TEXTS = [
    "Harry met Hermione at Hogwarts.",
    "Potter and Ron flew to Hogwarts; Harry smiled.",  # Potter is Harry: counted once
    "Ron and Hermione argued. Ronald is not Ron's full name here.",
    "Dumbledore was alone.",
]
ENTITIES = ["Harry", "Hermione", "Ron", "Hogwarts", "Dumbledore", "Voldemort"]
ALIASES = {"Harry": ["Potter", "Harry Potter"]}


@pytest.fixture(scope="module")
def hp() -> DomainGraph:
    return DomainGraph.from_corpus(TEXTS, ENTITIES, ALIASES)


def test_counts_on_a_hand_made_corpus(hp) -> None:
    assert hp.frequency == {"Harry": 2, "Hermione": 2, "Ron": 2, "Hogwarts": 2,
                            "Dumbledore": 1, "Voldemort": 0}  # fmt: skip
    assert hp.edges == {("Harry", "Hermione"): 1, ("Harry", "Hogwarts"): 2,
                        ("Hermione", "Hogwarts"): 1, ("Harry", "Ron"): 1,
                        ("Hogwarts", "Ron"): 1, ("Hermione", "Ron"): 1}  # fmt: skip
    assert all(a != b for a, b in hp.edges)  # alias merging made no self-loop
    summary = hp.summary()
    assert (summary["nodes"], summary["edges"], summary["units"]) == (6, 6, 4)
    assert summary["total_weight"] == 7 and summary["isolated"] == 2
    assert summary["components"] == 3 and summary["density"] == pytest.approx(6 / 15)


def test_save_and_load_round_trip(hp, tmp_path) -> None:
    back = DomainGraph.load(hp.save(tmp_path / "g.json"))
    assert (back.frequency, back.edges, back.aliases) == (hp.frequency, hp.edges, hp.aliases)
    assert back.match("harry potter") == ["Harry"]
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(OptlabError, match="not a domain graph"):
        DomainGraph.load(tmp_path / "bad.json")
    with pytest.raises(OptlabError, match="unknown domain"):
        load_domain("countriez")


def test_matching_whole_words_aliases_longest_first_and_substrings(hp) -> None:
    assert hp.match("HARRY POTTER and hermione") == ["Harry", "Hermione"]
    assert hp.match("Ronald and Harrys") == []  # whole words only
    m = EntityMatcher(["Guinea", "Papua New Guinea", "New York", "York"], {})
    assert m.match("Guinea and Papua New Guinea") == ["Papua New Guinea"]  # substring dropped
    assert m.match("New York") == ["New York"]  # longest first at one place
    assert m.match("York, then Guinea") == ["York", "Guinea"]
    fiji = EntityMatcher(["Fiji", "Fijian dollar"], {})
    assert fiji.match("Fiji pays in Fijian dollar") == ["Fiji", "Fijian dollar"]  # not a word
    assert EntityMatcher([], {}).match("anything") == []


def test_metrics_by_hand(hp) -> None:
    m = entanglement(hp, ["Harry", "Hermione", "Dumbledore"], target="Ron", steps=1)
    # Pairs: Harry-Hermione 1, Harry-Dumbledore 0, Hermione-Dumbledore 0.
    assert m["M1"] == m["M5"] == 1
    assert m["M2"] == pytest.approx(5 / 3) and m["M3"] == pytest.approx(2)
    assert m["M4"] == pytest.approx(1 / 3) and m["M6"] == pytest.approx(1 / 3)
    assert m["M7"] == 1 and m["M8"] == pytest.approx(1 / 3)
    # One step: Harry (strength 4) sends 1/3 * 1/4 to Ron, Hermione (strength 3) 1/3 * 1/3.
    assert m["M9"] == pytest.approx(0.5 * (1 / 12 + 1 / 9))


def test_metrics_for_no_and_one_entity(hp) -> None:
    assert entanglement(hp, [], target="Ron") == dict.fromkeys(METRIC_NAMES, 0.0)
    one = entanglement(hp, ["potter"], target="Harry", steps=1)  # an alias, any case
    assert one == {"M1": 0.0, "M2": 2.0, "M3": 3.0, "M4": 0.0, "M5": 0.0, "M6": 0.0,
                   "M7": 0.0, "M8": 0.0, "M9": 0.5}  # fmt: skip
    assert all(np.isfinite(v) for v in one.values())
    assert entanglement(hp, ["Harry"], target="Nobody")["M9"] == 0.0


def test_shortest_paths_stay_inside_the_induced_subgraph() -> None:
    g = DomainGraph({"a": 1, "b": 1, "c": 1, "d": 1}, {("a", "b"): 1, ("b", "c"): 3})
    assert entanglement(g, ["a", "b", "c", "d"])["M7"] == pytest.approx((1 + 2 + 1) / 3)
    assert entanglement(g, ["a", "c"])["M7"] == 0.0  # b is outside S: not connected


def test_spreading_activation_matches_the_matrix_form(hp) -> None:
    names = list(hp.frequency)
    w = np.array([[hp.weight(a, b) for b in names] for a in names], dtype=float)
    strength = w.sum(1)
    transfer = np.divide(w, strength[:, None], out=np.zeros_like(w), where=strength[:, None] > 0)
    a0 = np.array([1 / 2 if x in ("Harry", "Dumbledore") else 0.0 for x in names])
    a = a0.copy()
    for _ in range(4):
        a = 0.3 * a0 + 0.7 * transfer.T @ a
    for target in names:
        got = spreading_activation(hp, ["Harry", "Dumbledore"], target, decay=0.7, steps=4)
        assert got == pytest.approx(a[names.index(target)])


def test_country_graph_from_the_shipped_records() -> None:
    g = country_graph()
    assert g.kinds["France"] == "country" and g.kinds["Paris"] == "capital"
    assert g.kinds["euro"] == "currency" and g.kinds["French"] == "language"
    assert g.frequency["Paris"] == 1 and g.weight("France", "Paris") == 1
    assert g.weight("France", "Germany") == 1  # their bordering pair
    assert g.weight("France", "euro") == 1 and g.weight("euro", "Europe") > 10
    assert g.match("Is Paris the capital of the USA?") == ["Paris", "United States"]
    assert g.match("They pay in EUR, not in DKK, and all is well") == ["euro", "Danish krone"]
    assert g.summary()["units"] > len([k for k in g.kinds.values() if k == "country"])


def test_graph_cli_from_a_corpus_with_chapters(capsys, tmp_path) -> None:
    import json

    from optlab.cli import main

    (tmp_path / "book.txt").write_text(
        "CHAPTER I\nHarry met Hermione.\n\nPotter smiled.\nCHAPTER II\nRon and Hermione.\n"
    )
    (tmp_path / "names.txt").write_text("Harry\nHermione\nRon\n")
    (tmp_path / "aliases.json").write_text('{"Harry": ["Potter"]}')
    out = tmp_path / "g.json"
    args = ["audit", "graph", "--corpus", str(tmp_path / "book.txt"), "--entities",
            str(tmp_path / "names.txt"), "--aliases", str(tmp_path / "aliases.json"),
            "--unit-regex", "^CHAPTER", "--out", str(out), "--json"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["units"], summary["nodes"], summary["edges"]) == (2, 3, 2)
    graph = DomainGraph.load(out)
    assert graph.frequency == {"Harry": 1, "Hermione": 2, "Ron": 1}
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    bad = ["audit", "graph", "--corpus", str(tmp_path / "book.txt"), "--out", str(tmp_path / "x")]
    assert main(bad) == 2 and "--entities" in capsys.readouterr().err
