import json

import torch
from safetensors.torch import load_file

from optlab.cli import main
from optlab.core.anatomy import weight_matrix
from optlab.core.models import load_model
from optlab.pruning.masks import check_nm, pruned_linears


def test_prune_then_retrain_from_the_cli_keeps_the_mask(tmp_path, capsys, corpus) -> None:
    pruned, retrained = tmp_path / "pruned", tmp_path / "perp"
    common = ["--seq-len", "32", "--eval-limit", "2", "--json"]
    assert main(["prune", "tiny:gpt2", "--pattern", "2:4", "--calib", corpus, "--n-calib", "4",
                 "--out", str(pruned), *common]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["retrain", str(pruned), "--steps", "3", "--corpus", corpus, "--lr", "1e-2",
                 "--out", str(retrained), *common]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["mask_held"] and len(result["losses"]) == 3
    assert result["source_perplexity"]["windows"] == 2 and result["perplexity"]["windows"] == 2
    before, after = load_model(str(pruned)).model, load_model(str(retrained)).model
    masks = load_file(retrained / "masks.safetensors")
    changed = False
    for name, module in pruned_linears(after).items():
        weight = weight_matrix(module)
        assert torch.equal(weight != 0, masks[name]) and check_nm(weight, 2, 4)
        changed |= not torch.equal(weight, weight_matrix(pruned_linears(before)[name]))
    assert changed  # the merged adapters really moved the kept weights


def test_retrain_refuses_a_folder_that_is_not_a_run(tmp_path, capsys) -> None:
    assert main(["retrain", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_retrain_loads_the_run_in_the_dtype_asked_for(tmp_path, capsys, corpus) -> None:
    from optlab.core.job import load_job

    pruned, retrained = tmp_path / "pruned", tmp_path / "bf16"
    assert main(["prune", "tiny:llama", "--method", "magnitude", "--no-eval",
                 "--out", str(pruned)]) == 0  # fmt: skip
    assert main(["retrain", str(pruned), "--steps", "1", "--seq-len", "16", "--corpus", corpus,
                 "--dtype", "bfloat16", "--no-eval", "--out", str(retrained)]) == 0  # fmt: skip
    capsys.readouterr()
    assert load_job(retrained).dtype == "bfloat16"  # recorded as run, so rerun replays it
    saved = load_file(retrained / "model" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # trained in bf16, not fp32
