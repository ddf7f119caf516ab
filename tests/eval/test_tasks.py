import json

import pytest

from optlab.core.models import load_model
from optlab.errors import OptlabError
from optlab.eval.scorer import Scorer
from optlab.eval.tasks import ChoiceItem, get_task, multiple_choice, run_tasks


class FixedScorer:
    """Returns preset log-likelihoods, to check the accuracy bookkeeping alone."""

    def __init__(self, logprobs):
        self.logprobs = logprobs

    def loglikelihood(self, requests):
        assert len(requests) == len(self.logprobs)
        return [(lp, False) for lp in self.logprobs]


def test_multiple_choice_accuracy_and_length_normalisation() -> None:
    items = [
        ChoiceItem("q1", (" a", " bbbbbbbbb"), gold=1),  # -2 vs -3: acc wrong, per byte right
        ChoiceItem("q2", (" yes", " no"), gold=0),  # right both ways
    ]
    result = multiple_choice(FixedScorer([-2.0, -3.0, -1.0, -5.0]), items)
    assert result == {"acc": 0.5, "acc_norm": 1.0, "n": 2}


def test_unknown_task_suggests_the_closest() -> None:
    with pytest.raises(OptlabError, match="Did you mean 'mc:sentiment'"):
        get_task("mc:sentimen")


def test_local_files_as_tasks(tmp_path) -> None:
    lm = load_model("tiny:llama")
    scorer = Scorer(lm, progress=False)
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 40)
    mc = tmp_path / "c.jsonl"
    mc.write_text(json.dumps({"context": "1 + 1 =", "choices": [" 2", " 3"], "gold": 0}) + "\n")
    results = run_tasks(scorer, [f"ppl:{text}", f"mc:{mc}"], seq_len=64)
    assert results[f"ppl:{text}"]["windows"] == 520 // 64
    assert results[f"mc:{mc}"]["n"] == 1


def test_bad_task_files(tmp_path) -> None:
    with pytest.raises(OptlabError, match="no such file"):
        get_task(f"ppl:{tmp_path / 'missing.txt'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a"], "gold": 3}\n')
    with pytest.raises(OptlabError, match=r"bad\.jsonl:1: gold 3"):
        get_task(f"mc:{bad}")(None)


def test_prefix_tasks_come_from_their_packages_and_typos_still_get_suggestions(
    monkeypatch,
) -> None:
    from optlab.core.config import Registry
    from optlab.eval import tasks

    monkeypatch.setattr(tasks, "PREFIXES", Registry("task prefix"))
    seen = []

    @tasks.register_prefix("probe")
    def probe(arg: str):
        seen.append(arg)
        return lambda scorer, **_: {"arg": arg}

    assert get_task("probe:a:b")(None) == {"arg": "a:b"} and seen == ["a:b"]
    with pytest.raises(OptlabError, match="Did you mean 'mc:analogy'"):
        get_task("mc:analogi")
    with pytest.raises(ValueError, match="registered twice"):
        tasks.register_prefix("probe")(probe)


def test_unlearn_prefix_is_found_from_a_fresh_process(tmp_path) -> None:
    """eval imports nothing from unlearn: unlearn:RUN arrives through the plugin list."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from optlab.eval.tasks import get_task\n"
        "from optlab.errors import OptlabError\n"
        "assert 'optlab.unlearning' not in sys.modules\n"
        "try:\n"
        "    get_task('unlearn:' + sys.argv[1])\n"
        "except OptlabError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "give an optlab unlearn run" in done.stdout
