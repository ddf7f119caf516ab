import json
import logging

import pytest
import yaml

from optlab.core.run import Run, atomic_write
from optlab.errors import OptlabError


def test_run_writes_the_standard_files(tmp_path) -> None:
    target = tmp_path / "runs" / "r1"
    with Run(target, config={"method": "wanda", "sparsity": 0.5}, seed=7) as run:
        logging.getLogger("optlab").warning("hello from the run")
        run.add_metrics({"a": 1})
        run.add_metrics({"b": 2.5})
        run.save_text("report.md", "# report\n")
        assert not target.exists()  # staged until finished
    assert yaml.safe_load((target / "config.yaml").read_text()) == {"method": "wanda",
                                                                  "sparsity": 0.5}  # fmt: skip
    env = json.loads((target / "env.json").read_text())
    assert env["seed"] == 7 and env["versions"]["torch"] and "git_sha" in env
    assert json.loads((target / "metrics.json").read_text()) == {"a": 1, "b": 2.5}
    assert "hello from the run" in (target / "log.txt").read_text()
    assert [p.name for p in tmp_path.joinpath("runs").iterdir()] == ["r1"]  # no leftovers


def test_existing_run_is_refused_without_force(tmp_path) -> None:
    target = tmp_path / "r"
    target.mkdir()
    for name in ("env.json", "config.yaml"):  # an optlab run: --force could replace it
        (target / name).write_text("{}")
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(OptlabError, match="exists; pass --force"):
        Run(target, config={})
    assert (target / "precious.txt").read_text() == "keep me"


def test_failed_run_leaves_the_old_one_untouched(tmp_path) -> None:
    target = tmp_path / "r"
    with Run(target, config={"v": 1}) as run:
        run.add_metrics({"v": 1})
    with pytest.raises(RuntimeError), Run(target, config={"v": 2}, force=True) as run:
        run.add_metrics({"v": 2})
        raise RuntimeError("crash midway")
    assert json.loads((target / "metrics.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_force_replaces_a_run_only_when_the_new_one_is_complete(tmp_path) -> None:
    target = tmp_path / "r"
    with Run(target, config={"v": 1}) as run:
        run.save_text("old-only.txt", "x")
    with Run(target, config={"v": 2}, force=True) as run:
        run.add_metrics({"v": 2})
        assert (target / "old-only.txt").exists()
    assert not (target / "old-only.txt").exists()
    assert json.loads((target / "metrics.json").read_text()) == {"v": 2}


def test_atomic_write_replaces_content(tmp_path) -> None:
    path = tmp_path / "a" / "f.json"
    atomic_write(path, "1")
    atomic_write(path, b"2")
    assert path.read_text() == "2"
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]
