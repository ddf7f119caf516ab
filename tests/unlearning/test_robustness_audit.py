"""``audit robustness`` end to end on a tiny model that memorised a dozen capitals: GA
unlearns four of them, then 8-bit quantization and relearning on other capitals attack."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from optlab.api import audit_robustness, unlearn
from optlab.audit.robustness import NONE, RobustnessConfig, recovery_ratio
from optlab.errors import OptlabError
from optlab.unlearning.data import run_sets
from optlab.unlearning.metrics import EvalConfig
from optlab.unlearning.scenarios import Scenario
from optlab.unlearning.trainer import UnlearnConfig
from tests.unlearning.conftest import capital_questions

SMALL = EvalConfig(max_new_tokens=12, samples=8, ppl_seq_len=32, ppl_limit=1)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def unlearned_run(taught_model, tmp_path_factory) -> Path:
    facts = [e for _, e in capital_questions()]
    out = tmp_path_factory.mktemp("robust") / "ga"
    unlearn(str(taught_model), UnlearnConfig(method="ga", steps=5, lr=1e-3),
            data=Scenario("capitals", facts[:4], facts[4:12], facts[12:]), evaluation=SMALL,
            out=out, progress=False)  # fmt: skip
    return out


def test_the_audit_measures_each_attack_and_leaves_the_run_untouched(
    unlearned_run, tmp_path
) -> None:
    before_files = digest(unlearned_run)
    config = RobustnessConfig(attacks=("quant:rtn8", "relearn:4"), relearn_steps=10,
                              skeb_limit=2, skeb_max_new_tokens=4, resamples=100)  # fmt: skip
    result = audit_robustness(unlearned_run, config, evaluation=SMALL, out=tmp_path / "a",
                              progress=False)  # fmt: skip
    assert digest(unlearned_run) == before_files  # no attack touched the source run
    models = result["models"]
    assert set(models) == {"before", "unlearned"}
    assert list(models["unlearned"]) == [NONE, "quant:rtn8", "relearn:4"]
    before, unlearned = models["before"][NONE]["FA"], models["unlearned"][NONE]["FA"]
    assert before == 1.0 and unlearned <= 0.25  # the taught capitals, then GA
    for attack in ("quant:rtn8", "relearn:4"):  # the ratio is the one of the table itself
        attacked = models["unlearned"][attack]["FA"]
        cell = result["recovery"][attack]["FA"]
        assert cell["ratio"] == pytest.approx(recovery_ratio(attacked, unlearned, before))
        assert cell["low"] <= cell["ratio"] + 1e-9 and cell["ratio"] <= cell["high"] + 1e-9
    assert {"skeb_plain", "skeb_authority", "RA", "ppl", "mia_loss", "mia_mink"} <= set(
        models["unlearned"]["relearn:4"])  # fmt: skip
    assert result["relearn_examples"] == {"relearn:4": 4}
    assert models["before"][NONE]["FA"] == result["recorded_base"]["FA"]  # the same model
    run = tmp_path / "a"
    for png in ("forget_by_attack.png", "recovery.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_example = json.loads((run / "per_example.json").read_text())
    assert len(per_example["unlearned"]["relearn:4"]["FA"]) == 4  # one per forget question
    assert "| unlearned | quant:rtn8 |" in (run / "report.md").read_text()


def test_the_gguf_attack_is_the_model_a_gguf_reader_runs(unlearned_run, tmp_path) -> None:
    """gguf:q4_1 leaves exactly the weights of `optlab export --type q4_1` read back."""
    from optlab.api import export
    from optlab.api._robustness import gguf_round_trip
    from optlab.core.models import load_model
    from optlab.quant.gguf_export import ExportConfig

    attacked = load_model(str(unlearned_run))
    found = gguf_round_trip(attacked, "q4_1")
    export(str(unlearned_run), ExportConfig(weight_type="q4_1"), out=tmp_path / "m.gguf",
           progress=False)  # fmt: skip
    read = load_model(str(tmp_path / "m.gguf")).model.state_dict()
    plain = load_model(str(unlearned_run)).model.state_dict()
    changed = 0
    for name, weight in attacked.model.state_dict().items():
        assert torch.equal(weight, read[name]), name
        changed += not torch.equal(weight, plain[name])
    assert changed >= 7 * 2  # every block linear of both blocks was rounded
    assert found["tensor_types"]["q4_1"] == 14 and found["file_bytes"] > 0
    config = RobustnessConfig(attacks=("gguf:q4_1",), skeb=False, resamples=50)
    result = audit_robustness(unlearned_run, config, evaluation=SMALL, progress=False)
    assert result["models"]["unlearned"]["gguf:q4_1"]["attack"]["tensor_types"]["q4_1"] == 14


def test_quant_aware_unlearning_is_its_own_q4_1_file(taught_model, tmp_path) -> None:
    """`optlab unlearn --quant-aware q4_1`: the saved model's Q4_1 GGUF file holds exactly its
    weights, so the gguf:q4_1 attack changes nothing (and cannot bring anything back)."""
    from optlab.api._robustness import gguf_round_trip
    from optlab.core.models import load_model

    facts = [e for _, e in capital_questions()]
    out = tmp_path / "qa"
    unlearn(str(taught_model), UnlearnConfig(method="npo", steps=3, lr=1e-3, quant_aware="q4_1"),
            data=Scenario("capitals", facts[:4], facts[4:12], facts[12:]), evaluation=SMALL,
            out=out, progress=False)  # fmt: skip
    saved = load_model(str(out))
    attacked = load_model(str(out))
    gguf_round_trip(attacked, "q4_1")
    plain = saved.model.state_dict()
    assert all(torch.equal(w, plain[n]) for n, w in attacked.model.state_dict().items())
    base = load_model(str(taught_model)).model.state_dict()
    assert any(not torch.equal(w, base[n]) for n, w in plain.items())  # it did train


def test_bad_input_is_refused_before_any_work(unlearned_run, tmp_path) -> None:
    retain = len(run_sets(unlearned_run)["retain"])
    with pytest.raises(OptlabError, match=rf"relearn:{retain + 1} needs .* has {retain}"):
        audit_robustness(unlearned_run, RobustnessConfig(attacks=(f"relearn:{retain + 1}",)),
                         out=tmp_path / "a")  # fmt: skip
    with pytest.raises(OptlabError, match="needs a unlearn run"):
        audit_robustness(tmp_path, out=tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_the_shipped_recipe_chains_unlearn_and_the_audit(taught_model, tmp_path) -> None:
    """unlearn-robustness.yaml's shape (the audit reads the unlearn step's run), made small."""
    from optlab.recipe import load_recipe, run_recipe

    facts = [e for _, e in capital_questions()]
    files = {}
    for name, part in (("forget", facts[:4]), ("retain", facts[4:12]), ("holdout", facts[12:])):
        files[name] = str(tmp_path / f"{name}.jsonl")
        Path(files[name]).write_text("".join(json.dumps(e.to_json()) + "\n" for e in part))
    small = {"max_new_tokens": 12, "samples": 8, "ppl_seq_len": 32, "ppl_limit": 1}
    recipe = load_recipe("unlearn-robustness")
    unlearn_step, audit_step = recipe["steps"]
    assert audit_step["run"] == unlearn_step["name"]
    recipe["model"] = str(taught_model)
    unlearn_step |= {"data": files, "method": {"method": "ga", "steps": 5, "lr": 1e-3},
                     "eval": small}  # fmt: skip
    audit_step |= {"audit": {"attacks": ["quant:rtn8"], "skeb": False, "resamples": 50},
                   "eval": small}  # fmt: skip
    done = run_recipe(recipe, tmp_path / "chain", progress=False)
    printed = done["steps"][audit_step["name"]]["metrics"]  # what the command prints
    assert set(printed["recovery"]) == {"quant:rtn8"} and "FA" in printed["recovery"]["quant:rtn8"]
    audit = json.loads((tmp_path / "chain" / audit_step["name"] / "metrics.json").read_text())
    assert audit["run"] == str(tmp_path / "chain" / unlearn_step["name"])
    assert audit["models"]["before"][NONE]["FA"] == 1.0
