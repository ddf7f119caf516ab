"""``optlab exit bench`` and ``exit_bench`` on a tiny model: every requested setting in the
table, the all-layers row as the unit, the proxy's work count, the plots, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from optlab.api import exit_policy
from optlab.cli import main
from optlab.early_exit.bench import BASELINE, QUALITY, work
from optlab.early_exit.generate import GenerateConfig
from optlab.early_exit.policy import PolicyConfig
from tests.hostile.conftest import run_cli as cli

SMALL = ["--samples", "2", "--new-tokens", "4", "--max-context", "24", "--energy", "proxy"]
SETTINGS = ["none", "policy@0.5", "policy@0.9", "confidence@0.5", "confidence@0.9", "fixed:1",
            "speculative:1"]  # fmt: skip


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    config = PolicyConfig(exits="1", episodes=1, timesteps=16, n_steps=16, batch_size=8)
    exit_policy("tiny:llama", config, out=root / "policy", progress=False)
    args = ["exit", "bench", "tiny:llama", "--exits", "1", "--taus", "0.5,0.9", "--policy",
            root / "policy", "--fixed", "1", "--speculative", "1", "--draft-tokens", "2", *SMALL,
            "--out", root / "run"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    return root / "run"


def test_the_table_has_every_setting_against_all_layers(bench) -> None:
    metrics = json.loads((bench / "metrics.json").read_text())
    settings = metrics["settings"]
    assert list(settings) == SETTINGS
    assert metrics["energy_backend"] == "proxy" and metrics["samples"] == 2
    base = settings[BASELINE]
    assert all(base["relative"][k] == 1.0 for k in (*QUALITY, "layers", "seconds", "energy"))
    assert base["layers"] == 2 and base["identical"] == 2
    assert settings["fixed:1"]["layers"] == 1 and settings["fixed:1"]["relative"]["layers"] == 0.5
    spec = settings["speculative:1"]
    assert spec["identical"] == 2 and spec["quality"] == base["quality"]  # exact decoding
    assert 0 <= spec["acceptance"] <= 1 and spec["draft_layer"] == 1
    for name, result in settings.items():
        assert set(result["quality"]) >= set(QUALITY), name
        assert result["energy"]["backend"] == "proxy" and result["energy"]["joules"] is None
        assert result["seconds_per_sample"] > 0 and result["flops_per_sample"] > 0
    # The proxy counts block runs: the prefill (all layers) is the same for every setting,
    # and what is left is the tokens' executed layers (fixed:1 runs 1 block per token).
    prefill = {n: settings[n]["energy"]["layer_tokens"] - settings[n]["layers"]
               * settings[n]["tokens"] for n in ("none", "fixed:1")}  # fmt: skip
    assert prefill["none"] == prefill["fixed:1"] > 0
    rows = list(csv.reader((bench / "results.csv").open()))
    assert [r[0] for r in rows] == ["setting", *SETTINGS]
    table = (bench / "results.md").read_text()
    assert "energy: proxy" in table and table.count("\n| ") == len(SETTINGS) + 1
    for plot in ("quality_vs_layers.png", "quality_vs_cost.png", "speculative.png"):
        assert (bench / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    assert metrics["plots"] == ["quality_vs_layers.png", "quality_vs_cost.png",
                                "speculative.png"]  # fmt: skip


def test_the_work_count_of_each_decoder() -> None:
    """Hand-worked: a 4-layer model, exits 1,3,4, a 5-token context (4 prefilled)."""
    row = {"context_tokens": 5, "executed_layers": [1, 3, 4], "tokens": 3, "recomputed": 2}
    confidence = GenerateConfig(exit="confidence")
    # blocks: 4*4 prefill + 8 executed + 2 recomputed; heads: exits read 1, 2, 2+final
    assert work(row, confidence, (1, 3, 4), 4) == (26, 1 + 2 + 3)
    assert work(row, GenerateConfig(exit="fixed:1"), (1, 4), 4) == (26, 3)
    spec = {"context_tokens": 5, "drafted": 6, "rounds": 3, "recomputed": 6}
    # 6 drafts x 2 blocks + 3 verifications x 4 blocks + 6 pending x 2 upper blocks
    assert work(spec, GenerateConfig(speculative=2), (4,), 4) == (16 + 12 + 12 + 6, 15)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--taus", "1.5"], "--tau must be in (0, 1), got 1.5"),
        (["--taus", "0.9,0"], "--tau must be in (0, 1), got 0.0"),
        (["--fixed", "3"], "exit layer 3 is outside the model"),
        (["--speculative", "2"], "--speculative 2: a draft exit must be in 1..1"),
        (["--exits", "1,7"], "exit layer 7 is outside the model"),
        (["--policy", "nowhere"], "holds no exit policy"),
        (["--data", "code:missing-folder"], "no such file or folder"),
        (["--energy", "joules"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(capsys, tmp_path, flags, needle):
    code, out, err = cli(capsys, "exit", "bench", "tiny:llama", "--samples", "1", *flags,
                         "--out", tmp_path / "o")  # fmt: skip
    assert code == 2 and out == "" and needle in err, err
    assert err.count("\n") == 1 and err.startswith("optlab: error:")
    assert list(tmp_path.iterdir()) == []
