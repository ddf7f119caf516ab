"""Every command against the same hostile basics: a foreign flag, a bad value of a typed flag,
an input file that is missing, a folder or not UTF-8, an ``--out`` that is not an optlab run
(with and without ``--force``), and the wrong kind of run where a run is the input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .conftest import TEXT, error_line, run_cli, snapshot

QA = '{"question": "What is A?", "answer": "B"}\n' * 2
CSV = "run_id,dataset,seed,method,FA,RA,MIA,AD,JS,distance\n"
PAIRS = "".join(f'{{"context": "def f{i}(x):", "target": " return x + {i}"}}\n' for i in range(12))
TRIPLETS = "sent0,sent1,hard_neg\n" + "A dog runs.,A dog is running.,A cat sleeps.\n" * 4
RECIPE = "model: tiny:opt\nsteps:\n  - {name: e, command: eval, tasks: {tasks: [ppl:wiki]}}\n"


def inputs(tmp: Path) -> dict[str, Path]:
    """Good small inputs in ``tmp/in`` (a folder the cases' snapshots include)."""
    folder = tmp / "in"
    folder.mkdir(exist_ok=True)
    files = {"text": ("text.txt", TEXT), "forget": ("forget.jsonl", QA),
             "retain": ("retain.jsonl", QA), "csv": ("runs.csv", CSV),
             "entities": ("entities.txt", "France\nParis\n"),
             "recipe": ("r.yaml", RECIPE), "pairs": ("pairs.jsonl", PAIRS),
             "triplets": ("triplets.csv", TRIPLETS),
             "candidates": ("demos.txt", "A man is smoking.=>Smoking\nmeat.=>Venison\n"),
             "classify": ("labels.csv", "text,label\nA fine film.,1\nA dull.,0\n"),
             "quiz": ("quiz.jsonl", '{"context": "2+2=", "choices": [" 4", " 5"], "gold": 0}\n'
                      * 4)}  # fmt: skip
    paths = {}
    for key, (name, text) in files.items():
        paths[key] = folder / name
        paths[key].write_text(text, encoding="utf-8")
    return paths


def command_args(tmp: Path, prune_run: Path, uprise: Path) -> dict[str, list[object]]:
    """A small valid invocation of every command, without --out (``uprise``: the run a later
    stage reads: a complete ``retrieve run`` for the retrieve stages, an ``unlearn`` run for
    ``audit robustness``; see :func:`_uprise`)."""
    f = inputs(tmp)
    tiny = ["--hold-out", "topic", "--only", "polarity,newsgroups", "--pool-size", "4",
            "--test-size", "2", "--candidates", "2",
            "--task-files", f"mc:{f['quiz']}@topic"]  # fmt: skip
    data = ["--forget", f["forget"], "--retain", f["retain"], "--steps", "1"]
    pairs = ["--data", f"code:{f['pairs']}", "--eval-windows", "0", "--context-length", "8"]
    return {
        "info": ["info", "tiny:opt"],
        "eval": ["eval", "tiny:opt", "--tasks", f"ppl:{f['text']}", "--seq-len", "32"],
        "prune": ["prune", "tiny:opt", "--method", "magnitude", "--no-eval"],
        "retrain": ["retrain", prune_run, "--steps", "1", "--no-eval"],
        "quantize": ["quantize", "tiny:opt", "--uniform", "8", "--no-eval"],
        "export": ["export", "tiny:llama"],
        "unlearn": ["unlearn", "tiny:opt", *data, "--no-save"],
        "unlearn sweep": ["unlearn", "sweep", "tiny:opt", "--methods", "ga", "--seeds", "0", *data],
        "audit skeb": ["audit", "skeb", "tiny:opt", "--limit", "1"],
        "audit reliability": ["audit", "reliability", f["csv"]],
        "audit robustness": ["audit", "robustness", uprise, "--attacks", "quant:rtn8",
                             "--no-skeb", "--max-new-tokens", "2", "--eval-limit", "1",
                             "--eval-seq-len", "32"],
        "audit graph": ["audit", "graph", "--corpus", f["text"], "--entities", f["entities"]],
        "run": ["run", f["recipe"]],
        "rerun": ["rerun", prune_run],
        "demo": ["demo"],
        "embed encode": ["embed", "encode", "tiny:opt", f["text"]],
        "embed eval": ["embed", "eval", "tiny:opt", "--sts", "wordsim353", "--limit", "4",
                       "--classify", f["classify"], "--folds", "2", "--no-minilm"],
        "embed select-demo": ["embed", "select-demo", "tiny:opt", "--candidates",
                              f["candidates"], "--dev", "wordsim353:dev", "--limit", "1"],
        "embed train": ["embed", "train", "tiny:opt", "--pairs", f["triplets"], "--steps", "1"],
        "exit train": ["exit", "train", "tiny:opt", *pairs, "--steps", "1"],
        "exit generate": ["exit", "generate", "tiny:opt", "--in", f["text"],
                          "--max-new-tokens", "2"],
        "exit policy": ["exit", "policy", "tiny:opt", "--exits", "1", "--episodes", "1",
                        "--timesteps", "8", "--n-steps", "8", "--batch-size", "4"],
        "exit bench": ["exit", "bench", "tiny:opt", "--taus", "0.5", "--samples", "1",
                       "--new-tokens", "2", "--max-context", "16"],
        "retrieve score": ["retrieve", "score", "tiny:opt", *tiny],
        "retrieve train": ["retrieve", "train", uprise, "--epochs", "1"],
        "retrieve index": ["retrieve", "index", uprise],
        "retrieve eval": ["retrieve", "eval", uprise, "--methods", "zero", "--k", "1"],
        "retrieve run": ["retrieve", "run", "tiny:opt", *tiny, "--epochs", "1"],
    }  # fmt: skip


RETRIEVE_STAGES = ("retrieve train", "retrieve index", "retrieve eval")


def _uprise(request: pytest.FixtureRequest, command: str) -> Path:
    """The tiny retrieve run (or unlearn run) for the commands that read one (built once per
    session, only when such a command is tested); a path never read for the others."""
    if command in RETRIEVE_STAGES:
        return request.getfixturevalue("retrieve_run")
    if command == "audit robustness":
        return request.getfixturevalue("unlearn_run")
    return Path("no-retrieve-run")


COMMANDS = ["info", "eval", "prune", "retrain", "quantize", "export", "unlearn", "unlearn sweep",
            "audit skeb", "audit reliability", "audit robustness", "audit graph", "run",
            "rerun", "demo",
            "embed encode", "embed eval", "embed select-demo", "embed train", "exit train",
            "exit generate", "exit policy", "exit bench", "retrieve score", "retrieve train",
            "retrieve index",
            "retrieve eval", "retrieve run"]  # fmt: skip
WRITERS = [c for c in COMMANDS if c != "info"]  # info prints and writes nothing

# A typed flag of each command and a value it cannot take. run and rerun have no typed
# flag: their bad value is a missing --out.
BAD_VALUES: dict[str, tuple[list[str], list[str]]] = {
    "info": (["--seed", "x"], ["--seed", "'x'"]),
    "eval": (["--limit", "many"], ["--limit", "'many'"]),
    "prune": (["--sparsity", "half"], ["--sparsity", "'half'"]),
    "retrain": (["--steps", "1.5"], ["--steps", "'1.5'"]),
    "quantize": (["--avg-bits", "four"], ["--avg-bits", "'four'"]),
    "export": (["--type", "q4_k"], ["--type", "'q4_k'"]),
    "unlearn": (["--lr", "fast"], ["--lr", "'fast'"]),
    "unlearn sweep": (["--seeds", "a,b"], ["--seeds", "'a'"]),
    "audit skeb": (["--limit", "-3"], ["limit", "-3"]),  # checked by its config: the field
    "audit reliability": (["--trials", "x"], ["--trials", "'x'"]),
    "audit robustness": (["--attacks", "quant:rnt4"], ["attack", "Did you mean 'quant:rtn4'"]),
    "audit graph": (["--seed", "1e3"], ["--seed", "'1e3'"]),
    "demo": (["--limit", "0"], ["--limit", "0"]),
    "embed encode": (["--batch-size", "x"], ["--batch-size", "'x'"]),
    "embed eval": (["--limit", "x"], ["--limit", "'x'"]),
    "embed select-demo": (["--limit", "0"], ["limit", "0"]),
    "embed train": (["--temperature", "cold"], ["--temperature", "'cold'"]),
    "exit train": (["--exits", "99"], ["exit layer 99", "outside the model"]),
    "exit generate": (["--tau", "x"], ["--tau", "'x'"]),
    "exit policy": (["--timesteps", "many"], ["--timesteps", "'many'"]),
    "exit bench": (["--taus", "1.5"], ["--tau must be in (0, 1)", "1.5"]),
    "retrieve score": (["--candidates", "many"], ["--candidates", "'many'"]),
    "retrieve train": (["--lr", "fast"], ["--lr", "'fast'"]),
    "retrieve index": (["--seed", "x"], ["--seed", "'x'"]),
    "retrieve eval": (["--k", "three"], ["--k", "'three'"]),
    "retrieve run": (["--pool-size", "0"], ["pool_size", "0"]),  # checked by its config
}


def _out(tmp: Path, command: str) -> list[object]:
    if command == "embed encode":  # it writes one .npy file, not a run directory
        return ["--out", tmp / "o.npy"]
    if command == "export":  # one .gguf file
        return ["--out", tmp / "o.gguf"]
    return [] if command == "info" else ["--out", tmp / "o"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_foreign_flag_is_one_line(capsys, tmp_path, prune_run, request, command) -> None:
    args = command_args(tmp_path, prune_run, _uprise(request, command))[command]
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, *args, "--bogus", "1", *_out(tmp_path, command))
    error_line(code, err, "--bogus")
    assert out == "" and snapshot(tmp_path) == before


@pytest.mark.parametrize("command", [*BAD_VALUES, "run", "rerun"])
def test_a_bad_value_of_a_typed_flag_is_one_line(
    capsys, tmp_path, prune_run, request, command
) -> None:
    args = command_args(tmp_path, prune_run, _uprise(request, command))[command]
    if command in ("run", "rerun"):
        extra, needles, out_args = [], ["--out"], []
    else:
        (extra, needles), out_args = BAD_VALUES[command], _out(tmp_path, command)
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, *args, *extra, *out_args)
    error_line(code, err, *needles)
    assert out == "" and snapshot(tmp_path) == before


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("command", WRITERS)
def test_an_out_that_is_not_a_run_is_untouched(
    capsys, tmp_path, prune_run, request, command, force
) -> None:
    args = command_args(tmp_path, prune_run, _uprise(request, command))[command]
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, *args, "--out", target, *(["--force"] * force))
    error_line(code, err, repr(str(target)), "not")
    assert out == "" and snapshot(tmp_path) == before


# (the bad request, what the one line names): checked against the unlearn run, before any work
ROBUSTNESS = {
    "relearn more than the retain set": (["--attacks", "relearn:99"], ["needs 99", "has 2"]),
    "bits the packer lacks": (["--attacks", "quant:rtn5"], ["5"]),
    "a repeated attack": (["--attacks", "quant:rtn4,quant:rtn4"], ["repeated"]),
    "a GGUF file of an OPT model": (["--attacks", "gguf:q4_1"], ["'opt'", "GGUF"]),
    "a GGUF type optlab does not write": (["--attacks", "gguf:q4_k"], ["Did you mean"]),
}


@pytest.mark.parametrize("case", list(ROBUSTNESS))
def test_audit_robustness_refuses_a_bad_attack(capsys, tmp_path, unlearn_run, case) -> None:
    extra, needles = ROBUSTNESS[case]
    before = snapshot(unlearn_run)
    code, out, err = run_cli(capsys, "audit", "robustness", unlearn_run, *extra, "--out",
                             tmp_path / "o")  # fmt: skip
    error_line(code, err, *needles)
    assert out == "" and snapshot(unlearn_run) == before and list(tmp_path.iterdir()) == []


# A file of the unlearn run spoiled: (the file, its new bytes, what the one line names).
SPOILED_RUN = {
    "forget set not UTF-8": ("forget.jsonl", b"Caf\xe9\n", ["forget.jsonl", "not UTF-8"]),
    "forget set not JSON": ("forget.jsonl", b"{oops\n", ["forget.jsonl"]),
    "metrics not JSON": ("metrics.json", b"{oops", ["metrics.json"]),
}


@pytest.mark.parametrize("case", list(SPOILED_RUN))
def test_audit_robustness_refuses_a_damaged_run(capsys, tmp_path, unlearn_run, case) -> None:
    name, data, needles = SPOILED_RUN[case]
    run = tmp_path / "run"
    shutil.copytree(unlearn_run, run)
    (run / name).write_bytes(data)
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "audit", "robustness", run, "--out", tmp_path / "o")
    error_line(code, err, *needles)
    assert out == "" and snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["prune", "unlearn --no-save"])
def test_audit_robustness_refuses_a_run_without_an_unlearned_model(
    capsys, tmp_path, prune_run, unlearn_run, kind
) -> None:
    run = prune_run
    if kind != "prune":  # an unlearn run whose model was not saved
        run = tmp_path / "nosave"
        shutil.copytree(unlearn_run, run)
        shutil.rmtree(run / "model")
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "audit", "robustness", run, "--out", tmp_path / "o")
    error_line(code, err, repr(str(run)), "'prune' run" if kind == "prune" else "--no-save")
    assert out == "" and snapshot(tmp_path) == before


# --- input files: missing, a folder, not UTF-8 ---------------------------------------------

LATIN1 = "Caf\xe9 au lait\n".encode("latin-1")


def _spoil(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(LATIN1)


# (command, the input to spoil, what the error line names: a folder/missing/not UTF-8 word)
FILE_INPUTS = [("eval", "text"), ("unlearn", "forget"), ("unlearn sweep", "retain"),
               ("audit reliability", "csv"), ("audit graph", "entities"),
               ("run", "recipe"), ("embed encode", "text"), ("embed eval", "classify"),
               ("embed select-demo", "candidates"),
               ("embed train", "triplets"), ("exit train", "pairs"),
               ("exit generate", "text"), ("retrieve score", "quiz"),
               ("retrieve run", "quiz")]  # fmt: skip
SPOILED = {"missing": "no such file", "folder": "is a folder", "latin1": "not UTF-8"}


@pytest.mark.parametrize("how", list(SPOILED))
@pytest.mark.parametrize(("command", "key"), FILE_INPUTS)
def test_a_spoiled_input_file_is_one_line(
    capsys, tmp_path, prune_run, request, command, key, how
) -> None:
    args = command_args(tmp_path, prune_run, _uprise(request, command))[command]
    path = inputs(tmp_path)[key]  # the same files command_args wrote
    _spoil(path, how)
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, *args, *_out(tmp_path, command))
    error_line(code, err, path.name, SPOILED[how])
    assert out == "" and snapshot(tmp_path) == before


# --- runs as inputs: the wrong kind, no config, a tampered config ---------------------------


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optlab.cli import main

    out = tmp_path_factory.mktemp("runs") / "evaluated"
    assert main(["eval", "tiny:opt", "--tasks", "ppl:wiki", "--limit", "1", "--seq-len", "32",
                 "--out", str(out)]) == 0  # fmt: skip
    return out


@pytest.mark.parametrize("kind", ["quantize", "eval"])
def test_retrain_refuses_a_real_run_of_another_kind(
    capsys, tmp_path, quant_run, eval_run, kind
) -> None:
    run = quant_run if kind == "quantize" else eval_run
    before = snapshot(run)
    code, out, err = run_cli(capsys, "retrain", run, "--steps", "1", "--out", tmp_path / "o")
    error_line(code, err, repr(str(run)), f"'{kind}' run", "prune or retrain")
    assert out == "" and snapshot(run) == before and list(tmp_path.iterdir()) == []


TAMPERED = {
    "no config": (None, ["config.yaml"]),
    "unknown type": ("method:\n  type: magnitude\n", "method:\n  type: voodoo\n", ["voodoo"]),
    "python tag": (
        "command: prune\n",
        "command: !!python/object/apply:os.getcwd []\n",
        ["python/object"],
    ),
    "future version": (
        "method:\n  type: magnitude\n  version: 1\n",
        "method:\n  type: magnitude\n  version: 99\n",
        ["99"],
    ),
    "not UTF-8": ("model: tiny:opt\n", "model: caf\xe9\n", ["not UTF-8"]),
}


@pytest.mark.parametrize("tamper", list(TAMPERED))
def test_rerun_refuses_a_run_it_cannot_replay(capsys, tmp_path, prune_run, tamper) -> None:
    run = tmp_path / "run"
    shutil.copytree(prune_run, run)
    *edit, needles = TAMPERED[tamper]
    config = run / "config.yaml"
    if edit == [None]:
        config.unlink()
    else:
        old, new = edit
        text = config.read_text()
        assert old in text
        config.write_bytes(text.replace(old, new).encode("latin-1"))
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "rerun", run, "--out", tmp_path / "o")
    error_line(code, err, *needles)
    assert out == "" and snapshot(tmp_path) == before


# --- hostile recipes -------------------------------------------------------------------------

RECIPES = {
    "later step": (
        "model: tiny:opt\nsteps:\n"
        "  - {name: e, command: eval, model: p, tasks: {tasks: [ppl:wiki]}}\n"
        "  - {name: p, command: prune, method: {type: magnitude}}\n",
        ["'p'"],
    ),
    "unknown command": ("model: tiny:opt\nsteps:\n  - {name: x, command: squash}\n", ["squash"]),
    "a list": ("- {name: e, command: eval}\n", ["mapping"]),
    "a step that is not a mapping": ("steps: [eval]\n", ["step 1"]),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_hostile_recipe_is_refused_before_any_step(capsys, tmp_path, recipe) -> None:
    text, needles = RECIPES[recipe]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "run", path, "--out", tmp_path / "o")
    error_line(code, err, *needles)
    assert out == "" and snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["run", "demo"])
def test_a_recipe_out_that_is_a_file(capsys, tmp_path, command) -> None:
    recipe = inputs(tmp_path)["recipe"]
    target = tmp_path / "notes.md"
    target.write_text("my notes")
    before = snapshot(tmp_path)
    args = ["run", recipe] if command == "run" else ["demo"]
    for force in ([], ["--force"], ["--resume"]):
        code, _, err = run_cli(capsys, *args, "--out", target, *force)
        error_line(code, err, repr(str(target)), "file")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("how", ["missing", "empty folder", "a file", "latin1 file"])
@pytest.mark.parametrize("command", ["info", "rerun"])
def test_a_model_or_run_that_is_not_one(capsys, tmp_path, command, how) -> None:
    """info takes a model (a folder), rerun a run (a folder or its config.yaml)."""
    target = tmp_path / "thing"
    if how == "empty folder":
        target.mkdir()
    elif how != "missing":
        target.write_bytes(LATIN1 if how == "latin1 file" else b"hello\n")
    before = snapshot(tmp_path)
    args = ["info", target] if command == "info" else ["rerun", target, "--out", tmp_path / "o"]
    code, out, err = run_cli(capsys, *args)
    error_line(code, err, "thing")
    assert out == "" and snapshot(tmp_path) == before


# --- an exit policy made for another model ---------------------------------------------------


@pytest.fixture(scope="module")
def deep_policy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4-layer, 32-wide model folder and a policy trained for it with exits 1,2,4."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from optlab.api import exit_policy
    from optlab.core.models import LoadedModel, byte_tokenizer, save_model
    from optlab.early_exit.policy import PolicyConfig

    root = tmp_path_factory.mktemp("deep")
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=320,
                                  max_position_embeddings=256)  # fmt: skip
    model = save_model(LoadedModel(AutoModelForCausalLM.from_config(config), byte_tokenizer(),
                                   "deep"), root / "model")  # fmt: skip
    exit_policy(
        str(model),
        PolicyConfig(exits="1,2", episodes=1, timesteps=8, n_steps=8, batch_size=4),
        out=root / "policy",
        progress=False,
    )
    return model, root / "policy"


# (the model the policy is given to, its --exits, what the one line names)
POLICY_MISMATCH = {
    "hidden size": ("tiny:llama", "1", ["hidden size 32, 4 layers", "hidden size 64, 2 layers"]),
    "exit set": ("deep", "2", ["exits 1,2,4, not 2,4"]),
}


@pytest.mark.parametrize("case", list(POLICY_MISMATCH))
def test_a_policy_for_another_model_is_one_line(capsys, tmp_path, deep_policy, case) -> None:
    model, policy = deep_policy
    target, exits, needles = POLICY_MISMATCH[case]
    target = str(model) if target == "deep" else target
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "exit", "policy", target, "--exits", exits, "--init",
                             policy, "--episodes", "1", "--out", tmp_path / "o")  # fmt: skip
    error_line(code, err, repr(str(policy)), *needles)
    assert out == "" and snapshot(tmp_path) == before
