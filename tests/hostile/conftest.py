"""The hostile-input corpus: every case is bad input that must get exactly one
``optlab: error: ...`` line naming the bad value, exit code 2 (130 when interrupted), no
traceback, nothing new or changed on disk and any old run byte-identical.

Corrupt inputs are built here from tiny runs (seconds each), not shipped as files."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import optlab
from optlab.cli import main

# Windows of 32 tokens on tiny models keep every in-process command well under a second.
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``optlab ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's usage errors
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def error_line(code: int, err: str, *needles: str, exit_code: int = 2) -> str:
    """Assert the promise for one failed command and return its error line."""
    assert code == exit_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("optlab: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (and every folder, empty or not)."""
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        files[key] = path.read_bytes() if path.is_file() and not path.is_symlink() else b"<dir>"
    return files


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``optlab ARGS`` in child processes (for signals and concurrency); any still
    running when the test ends is killed. Their cache is private: long texts get cached."""
    env = dict(os.environ, PYTHONPATH=str(Path(optlab.__file__).resolve().parents[1]),
               OPTLAB_CACHE=str(tmp_path / "cache"))  # fmt: skip
    started: list[subprocess.Popen[str]] = []

    def start(*args: object) -> subprocess.Popen[str]:
        started.append(subprocess.Popen(
            [sys.executable, "-m", "optlab.cli", *map(str, args)], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prune_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny:opt magnitude run (no calibration, no evaluation); tests must not change it."""
    out = tmp_path_factory.mktemp("runs") / "pruned"
    assert main(["prune", "tiny:opt", "--method", "magnitude", "--no-eval", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def quant_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny:opt 8-bit RTN run (packed weights, no calibration); tests must not change it."""
    out = tmp_path_factory.mktemp("runs") / "quantized"
    assert main(["quantize", "tiny:opt", "--uniform", "8", "--no-eval", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def unlearn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny:opt GA run (one step, its model saved), the input of ``audit robustness``;
    tests must not change it."""
    root = tmp_path_factory.mktemp("runs")
    forget, retain = root / "forget.jsonl", root / "retain.jsonl"
    forget.write_text('{"question": "What is A?", "answer": "B"}\n')
    retain.write_text('{"question": "What is C?", "answer": "D"}\n'
                      '{"question": "What is E?", "answer": "F"}\n')  # fmt: skip
    out = root / "unlearned"
    args = ["unlearn", "tiny:opt", "--forget", str(forget), "--retain", str(retain), "--method",
            "ga", "--steps", "1", "--max-new-tokens", "2", "--eval-limit", "1",
            "--eval-seq-len", "32", "--out", str(out)]  # fmt: skip
    # Quiet: a test that asks for this fixture checks what its own command prints.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
    return out
