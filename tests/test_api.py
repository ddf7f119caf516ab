"""The public API: every example in optlab.api's docstrings runs on a tiny model, and
``import optlab`` gives each command as a function."""

import doctest
import subprocess
import sys
from pathlib import Path

import optlab.api

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_function_has_a_running_example(tmp_path, monkeypatch) -> None:
    # Examples write runs/ into the working directory and read the shipped test data.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    finder = doctest.DocTestFinder(exclude_empty=False)
    names = vars(optlab.api)
    own = [n for n in optlab.api.__all__ if callable(names[n]) and not isinstance(names[n], type)
           and names[n].__module__.startswith("optlab.api")]  # fmt: skip
    assert {"prune", "quantize", "retrain", "unlearn", "audit_skeb", "rerun"} <= set(own)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    missing = []
    for name in [*own, "optlab.api"]:
        obj = optlab.api if name == "optlab.api" else names[name]
        tests = [t for t in finder.find(obj, name, globs=dict(names)) if t.name == name]
        if not tests or not tests[0].examples:
            missing.append(name)
            continue
        runner.run(tests[0])
    assert not missing, f"public functions without an example: {missing}"
    assert runner.failures == 0 and runner.tries >= 2 * len(own)


def test_import_optlab_gives_the_commands_as_functions() -> None:
    code = (
        "import optlab\n"
        "lm = optlab.load_model('tiny:llama')\n"
        "r = optlab.prune(lm, optlab.WandaConfig(sparsity=0.5),"
        " calib=optlab.Calibration(n=2, seq_len=16), progress=False)\n"
        "assert r['sparsity']['total'] == 0.5, r\n"
        "import optlab.pruning.masks, optlab.retraining.perp, optlab.unlearning.job\n"
        "for name in ('evaluate', 'prune', 'retrain', 'quantize', 'unlearn', 'unlearn_sweep',"
        " 'audit_skeb', 'audit_reliability', 'audit_graph', 'rerun', 'info', 'embed_encode',"
        " 'embed_eval'):\n"
        "    assert callable(getattr(optlab, name)), name\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
