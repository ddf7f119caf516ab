"""The public API: every example in optlab.api's docstrings runs on a tiny model."""

import doctest
from pathlib import Path

import optlab.api

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_function_has_a_running_example(tmp_path, monkeypatch) -> None:
    # Examples write runs/ into the working directory and read the shipped test data.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    finder = doctest.DocTestFinder(exclude_empty=False)
    tests = {t.name.removeprefix("optlab.api."): t for t in finder.find(optlab.api)}
    own = [name for name in optlab.api.__all__
           if getattr(getattr(optlab.api, name), "__module__", "") == "optlab.api"]  # fmt: skip
    missing = [name for name in own if not tests.get(name) or not tests[name].examples]
    assert not missing, f"public functions without an example: {missing}"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for name in own:
        runner.run(tests[name])
    assert runner.failures == 0 and runner.tries >= 2 * len(own)
