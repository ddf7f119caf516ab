import json

import pytest
import yaml

from optlab.cli import main
from optlab.errors import OptlabError
from optlab.recipe import load_recipe, run_recipe

STEPS = [
    {"name": "dense", "command": "eval",
     "tasks": {"tasks": ["ppl:book"], "limit": 2, "seq_len": 32}},
    {"name": "prune", "command": "prune", "method": {"type": "wanda", "pattern": "2:4"},
     "calib": {"corpus": "book", "n": 4, "seq_len": 32}, "eval": {"limit": 2}},
    {"name": "pruned", "command": "eval", "model": "prune",
     "tasks": {"tasks": ["ppl:book"], "limit": 2, "seq_len": 32}},
]  # fmt: skip
RECIPE = {"title": "tiny chain", "model": "tiny:llama", "steps": STEPS}


def _mtimes(out):
    return {p.name: (p / "metrics.json").stat().st_mtime_ns for p in out.iterdir() if p.is_dir()}


def test_a_recipe_chains_steps_and_reports_them(tmp_path) -> None:
    out = tmp_path / "chain"
    result = run_recipe(RECIPE, out, progress=False)
    assert list(result["steps"]) == ["dense", "prune", "pruned"]
    pruned_config = yaml.safe_load((out / "pruned" / "config.yaml").read_text())
    assert pruned_config["model"] == str(out / "prune")  # the earlier step's run is the input
    dense = result["steps"]["dense"]["metrics"]["tasks"]["ppl:book"]["perplexity"]
    after = json.loads((out / "pruned" / "metrics.json").read_text())
    assert after["tasks"]["ppl:book"]["perplexity"] != dense  # it evaluated the pruned model
    report = (out / "report.md").read_text()
    assert "| step | command | ppl:book perplexity |" in report
    assert f"| dense | eval | {dense:.4g} |" in report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 1 and "tiny chain" in page


def test_resume_skips_unchanged_steps_and_reruns_what_changed(tmp_path) -> None:
    out = tmp_path / "chain"
    run_recipe(RECIPE, out, progress=False)
    before = _mtimes(out)
    with pytest.raises(OptlabError, match="pass --resume to continue it"):
        run_recipe(RECIPE, out, progress=False)
    result = run_recipe(RECIPE, out, resume=True, progress=False)
    assert _mtimes(out) == before and all(s.get("skipped") for s in result["steps"].values())
    changed = {**RECIPE, "steps": [STEPS[0], {**STEPS[1], "method": {"type": "magnitude"}},
                                   STEPS[2]]}  # fmt: skip
    run_recipe(changed, out, resume=True, progress=False)
    after = _mtimes(out)
    assert after["dense"] == before["dense"]  # unchanged and reads nothing that changed
    assert after["prune"] != before["prune"] and after["pruned"] != before["pruned"]


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"steps": [{"name": "a"}]}, "step 1 needs a name and a command"),
        ({"steps": [STEPS[0], STEPS[0]]}, "'dense' is repeated"),
        ({"model": "tiny:llama", "stepz": []}, "a recipe is a mapping with a list of steps"),
        ({"model": "tiny:llama", "steps": [], "modle": 1}, "unknown recipe key 'modle'"),
        ({"model": "tiny:llama", "steps": [{**STEPS[1], "method": {"type": "wandaa"}}]},
         "Did you mean 'wanda'"),
        ({"model": "tiny:llama", "steps": [{"name": "x", "command": "prnue"}]},
         "Did you mean 'prune'"),
    ],
)  # fmt: skip
def test_bad_recipes_fail_before_any_step_runs(tmp_path, recipe, message) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(OptlabError, match=message):
        run_recipe(load_recipe(path), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_recipe_never_writes_into_a_folder_that_is_not_its_own(tmp_path, capsys) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    assert main(["run", str(path), "--out", str(tmp_path / "mine"), "--force"]) == 2
    assert "is not a recipe run" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_shipped_recipes_load_and_resolve(tmp_path) -> None:
    from optlab.recipe import resolve_steps, shipped_recipes

    assert {"quickstart", "prune-retrain-quantize"} <= set(shipped_recipes())
    for name in shipped_recipes():
        recipe = load_recipe(name)
        jobs = dict(resolve_steps(recipe, tmp_path))
        assert list(jobs) == [s["name"] for s in recipe["steps"]]
    chain = dict(resolve_steps(load_recipe("prune-retrain-quantize"), tmp_path))
    assert chain["perp"].inputs == {"run": str(tmp_path / "sparsegpt24")}
    assert chain["int4"].inputs == {"model": str(tmp_path / "perp")}


def test_the_chain_recipe_runs_end_to_end_on_a_tiny_model(tmp_path) -> None:
    """prune-retrain-quantize's shape (run: and model: naming earlier steps) on tiny:llama."""
    recipe = load_recipe("prune-retrain-quantize")
    small = {"calib": {"corpus": "book", "n": 4, "seq_len": 32}, "eval": {"limit": 1}}
    steps = []
    for step in recipe["steps"]:
        step = {**step, **({k: v for k, v in small.items() if k in step})}
        if step["command"] == "retrain":
            step["method"] = {**step["method"], "steps": 2, "seq_len": 32, "corpus": "book"}
        if step["command"] == "quantize":
            step["quantizer"] = {**step["quantizer"], "group_size": 32}
        if step["command"] == "eval":
            step["tasks"] = {"tasks": ["ppl:book"], "limit": 1, "seq_len": 32}
        steps.append(step)
    out = tmp_path / "chain"
    result = run_recipe({**recipe, "model": "tiny:llama", "steps": steps}, out, progress=False)
    metrics = {name: step["metrics"] for name, step in result["steps"].items()}
    assert metrics["sparsegpt24"]["sparsity"]["total"] == 0.5
    assert metrics["perp"]["mask_held"] and len(metrics["perp"]["losses"]) == 2
    assert metrics["int4"]["avg_bits"] == 4
    assert metrics["int4-eval"]["tasks"]["ppl:book"]["windows"] == 1
    assert yaml.safe_load((out / "perp" / "config.yaml").read_text())["run"] == str(
        out / "sparsegpt24"
    )
