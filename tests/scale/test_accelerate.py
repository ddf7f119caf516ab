"""``accelerate launch`` with two CPU processes trains the weights one process trains.

Each case runs a training command twice in subprocesses, once as a plain process and once
under ``accelerate launch`` with 2 processes (gloo on 127.0.0.1), with the same global batch,
then compares every tensor of the two saved models.

``accelerate launch --cpu`` starts a single process (accelerate fans CPU processes out only
through mpirun); ``--multi_gpu`` on a machine without GPUs starts 2 processes through
torchrun, and optlab's Accelerator for a CPU model trains them on the CPU with gloo.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_model

import optlab
from optlab.cli import main
from optlab.core.models import load_model
from optlab.core.run import is_main_process, rank_run_path
from optlab.core.train import local_rows
from optlab.errors import OptlabError

SOURCE = Path(optlab.__file__).resolve().parents[1]  # the optlab under test, for subprocesses
TIMEOUT = 240  # seconds per command: a hung rendezvous fails the test instead of CI
TEXT = (
    "The river rises in the hills and runs north through three towns before it reaches the "
    "sea. Its valley was farmed for centuries; mills stood on its banks until the railway "
    "came, and the old towpath is now a footpath that walkers follow from source to mouth. "
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def optlab_cli(args: list[str], processes: int, cwd: Path) -> None:
    """``optlab ARGS`` in this process, or in a subprocess under ``accelerate launch``."""
    if processes == 1:  # in process: a second interpreter would cost another torch import
        with contextlib.chdir(cwd), contextlib.redirect_stdout(io.StringIO()):
            assert main(args) == 0
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo would otherwise pick the hostname's interface
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
               "-m", "optlab.cli", *args]  # fmt: skip
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    # Every rank prints its result: proof that `processes` processes ran the command.
    runs = [line for line in done.stdout.splitlines() if line.startswith('  "run": ')]
    assert len(runs) == processes, done.stdout[-2000:]


def assert_same_weights(one: Path, two: Path, source: Path) -> None:
    first = load_file(one / "model" / "model.safetensors")
    second = load_file(two / "model" / "model.safetensors")
    before = load_file(source)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=1e-5, rtol=1e-5, msg=name)
    # Not vacuous: training moved the weights well beyond the tolerance.
    moved = max((first[n] - before[n]).abs().max().item() for n in before if n in first)
    assert moved > 1e-3


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scale")
    (folder / "corpus.txt").write_text(TEXT * 40, encoding="utf-8")
    return folder


# tiny:llama has no dropout (one batched forward per share); tiny:opt has dropout 0.1, so
# its rows are drawn one by one under per-row seeds (see optlab.core.train.shard_loss).
@pytest.mark.parametrize(("family", "method"), [("llama", "perp"), ("opt", "full")])
def test_retrain_on_two_processes_matches_one(work: Path, family: str, method: str) -> None:
    pruned = work / f"pruned-{family}"
    if not pruned.exists():
        optlab_cli(["prune", f"tiny:{family}", "--pattern", "2:4", "--calib", "corpus.txt",
                    "--n-calib", "2", "--seq-len", "32", "--no-eval", "--out", pruned.name,
                    "--json"], 1, work)  # fmt: skip
    common = ["retrain", pruned.name, "--method", method, "--steps", "3", "--batch-size", "4",
              "--grad-accum", "2", "--seq-len", "32", "--corpus", "corpus.txt", "--lr", "1e-2",
              "--rank", "4", "--no-eval", "--json"]  # fmt: skip
    optlab_cli([*common, "--out", f"one-{family}"], 1, work)
    optlab_cli([*common, "--out", f"two-{family}"], 2, work)
    assert_same_weights(work / f"one-{family}", work / f"two-{family}",
                        pruned / "model" / "model.safetensors")  # fmt: skip
    one = json.loads((work / f"one-{family}" / "metrics.json").read_text())
    two = json.loads((work / f"two-{family}" / "metrics.json").read_text())
    assert two["mask_held"] and two["optimizer_steps"] == one["optimizer_steps"] == 3
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)


def test_unlearn_on_two_processes_matches_one(work: Path) -> None:
    """ga_kl_rand: random answers drawn once for the global batch; retain examples of unequal
    length, so the KL's token weighting across the shards is exercised; OPT's dropout.

    lr 1e-3, not 1e-2: the true gradient of a key bias is zero (softmax ignores a shift
    shared by every key), so Adam steps it by rounding noise / eps, in proportion to lr.
    """
    words = TEXT.split()
    for name, offset in (("forget", 0), ("retain", 7)):
        lines = [json.dumps({"question": " ".join(words[offset + i : offset + i + 4]),
                             "answer": " ".join(words[i : i + 2 + 3 * (i % 3)])})
                 for i in range(6)]  # fmt: skip
        (work / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = ["unlearn", "tiny:opt", "--forget", "forget.jsonl", "--retain", "retain.jsonl",
              "--method", "ga_kl_rand", "--steps", "3", "--batch-size", "2", "--lr", "1e-3",
              "--samples", "2", "--max-new-tokens", "2", "--eval-limit", "1",
              "--eval-seq-len", "32", "--json"]  # fmt: skip
    optlab_cli([*common, "--out", "unlearn-one"], 1, work)
    optlab_cli([*common, "--out", "unlearn-two"], 2, work)
    source = work / "tiny-opt.safetensors"
    save_model(load_model("tiny:opt").model, str(source))  # the seeded model the CLI loads
    assert_same_weights(work / "unlearn-one", work / "unlearn-two", source)


def test_the_global_batch_splits_into_contiguous_shares() -> None:
    shares = [local_rows(SimpleNamespace(num_processes=2, process_index=r), 6) for r in (0, 1)]
    assert shares == [range(0, 3), range(3, 6)]
    with pytest.raises(OptlabError, match="batch_size 3 is the global batch"):
        local_rows(SimpleNamespace(num_processes=2, process_index=0), 3)


def test_only_rank_zero_writes_the_run_directory(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RANK", "0")
    assert is_main_process() and rank_run_path(tmp_path / "run") == tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    scratch = rank_run_path(tmp_path / "run")
    assert not is_main_process() and scratch.name == "run" and tmp_path not in scratch.parents
