"""Run directories: every command leaves one, so each result is traceable and reloadable.

A run is written in a hidden staging folder beside its target and moved into place only when
it finishes, so a failed or interrupted command never leaves half a run, and an existing run
is replaced (with ``force``) only by a complete new one. Nothing but a run is ever replaced:
``--force`` refuses folders that lack a run's ``env.json`` and ``config.yaml``, and the final
move is an atomic rename that fails, rather than replaces, when the target appeared meanwhile.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import yaml

from optlab.core.files import read_text_file
from optlab.errors import OptlabError, first_line

log = logging.getLogger("optlab")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write a file so that readers see the old content or the new, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)  # mkstemp makes owner-only files
    os.replace(tmp, path)


def environment(seed: int, device: str, dtype: str) -> dict[str, Any]:
    """Versions, git sha, seed and hardware: what it takes to trace a result."""
    versions = {"python": platform.python_version()}
    for package in ("optlab", "torch", "transformers", "accelerate", "numpy", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
        "git_sha": _git_sha(),
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_sha() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


# The launchers' rank variables (torchrun / accelerate launch, then MPI), as accelerate reads them.
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")


def is_main_process() -> bool:
    """True on the process that writes results: rank 0 of a multi-process launch, or the only
    process. Read from the launcher's environment, so that it can be asked before any
    Accelerator exists (a run directory opens before training starts)."""
    for name in _RANK_VARIABLES:
        if os.environ.get(name):
            return int(os.environ[name]) == 0
    return True


def rank_run_path(out: str | Path) -> Path:
    """Where this process writes its run directory: ``out`` on the main process, a scratch
    folder (removed at exit) on every other rank. Every rank runs the same job code, and two
    processes staging and moving one run directory into place would race.

    """
    if is_main_process():
        return Path(out)
    import atexit

    scratch = tempfile.mkdtemp(prefix="optlab-rank-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return Path(scratch) / Path(out).name


class Run:
    """A run directory: ``config.yaml``, ``env.json``, ``metrics.json``, ``log.txt``, artefacts.

    >>> with Run("runs/w50", config={"method": "wanda"}, seed=0) as run:
    ...     run.add_metrics({"perplexity": 21.3})
    ...     run.save_text("report.md", "...")
    >>> run.path  # runs/w50, complete
    """

    def __init__(
        self,
        path: str | Path,
        *,
        config: dict[str, Any],
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
        force: bool = False,
    ) -> None:
        self.path = check_target(path, force)
        self.force = force
        warn_stale_partials(self.path.parent)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The pid in the name tells a later run whether this folder's owner is still alive.
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-{os.getpid()}-",
                                             dir=self.path.parent))  # fmt: skip
        except OSError as err:
            raise OptlabError(
                f"cannot create run directory {str(self.path)!r}: {err.strerror or err}"
            ) from None
        self.metrics: dict[str, Any] = {}
        self._handler = logging.FileHandler(self.dir / "log.txt", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._handler)
        self.save_text("config.yaml", yaml.safe_dump(config, sort_keys=False))
        self.save_json("env.json", environment(seed, device, dtype))
        self._finished = False

    def save_json(self, name: str, data: Any) -> Path:
        atomic_write(self.dir / name, json.dumps(data, indent=2, default=_json_default) + "\n")
        return self.path / name

    def save_text(self, name: str, text: str) -> Path:
        atomic_write(self.dir / name, text)
        return self.path / name

    def add_metrics(self, metrics: dict[str, Any]) -> None:
        """Merge into ``metrics.json`` (written at once, so a crash keeps what was measured)."""
        self.metrics.update(metrics)
        self.save_json("metrics.json", self.metrics)

    def finish(self) -> Path:
        """Move the complete run into place (replacing an old one only now, and only with
        ``force``). A target that appeared while the run worked, e.g. written by the same
        command started twice, is never replaced without ``force``: the run is dropped and
        an :class:`OptlabError` says so."""
        self._close_log()
        shown = repr(str(self.path))
        try:
            if self.force and os.path.lexists(self.path):
                if not (is_run_directory(self.path) or _is_empty_dir(self.path)):
                    raise OptlabError(
                        f"{shown} was replaced by something that is not an optlab "
                        "run while this run worked; this run was not written"
                    )
                _swap_into_place(self.dir, self.path)
            else:
                _rename_no_replace(self.dir, self.path)
        except FileExistsError:
            self.abort()
            raise OptlabError(
                f"run directory {shown} appeared while this run worked (the same command "
                "running twice?); this run was not written. Pass --force to replace it"
            ) from None
        except OptlabError:
            self.abort()
            raise
        self._finished = True
        return self.path

    def abort(self) -> None:
        """Drop the staged run; an existing run at the target stays untouched."""
        self._close_log()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _close_log(self) -> None:
        log.removeHandler(self._handler)
        self._handler.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            if not self._finished:
                self.finish()
        else:
            self.abort()


RUN_FILES = ("env.json", "config.yaml")  # what every optlab run holds, and other folders lack
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)-")
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def is_run_directory(path: str | Path) -> bool:
    """Whether ``path`` is a run optlab wrote (it holds ``env.json`` and ``config.yaml``)."""
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in RUN_FILES)


def check_target(path: str | Path, force: bool = False) -> Path:
    """The one output check of every command, before any work: refuse a path that could
    lose data or cannot be written, with one line naming it; return it as a :class:`Path`.
    Refused: the current directory and any folder above it, the home directory, a filesystem
    root, a dangling symbolic link, an existing file, an existing folder that is not an
    optlab run (even with ``force``), an existing run without ``force``, and a path whose
    parent is a file or is not writable.

    >>> check_target("runs/w50", force=True)
    PosixPath('runs/w50')
    """
    path = Path(path)
    shown = repr(str(path))
    resolved = path.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OptlabError(f"--out {shown} is the current directory or a folder above it; "
                          "give a new folder for the run, e.g. runs/NAME")  # fmt: skip
    if resolved.parent == resolved:
        raise OptlabError(f"--out {shown} is a filesystem root; give a folder, e.g. runs/NAME")
    if resolved == Path.home().resolve():
        raise OptlabError(f"--out {shown} is the home directory; give a folder, e.g. runs/NAME")
    if path.is_symlink():
        if not path.exists():
            raise OptlabError(
                f"--out {shown} is a symbolic link to {os.readlink(path)!r}, "
                "which does not exist; remove the link or choose another --out"
            )
        if force:
            raise OptlabError(
                f"--out {shown} is a symbolic link; --force replaces only a run "
                f"directory itself: give its real path {str(resolved)!r}"
            )
    if path.exists() and not path.is_dir():
        raise OptlabError(f"--out {shown} exists and is a file, not a run directory; "
                          "choose another --out")  # fmt: skip
    if path.is_dir():
        if not (is_run_directory(path) or _is_empty_dir(path)):
            raise OptlabError(
                f"--out {shown} exists and is not an optlab run (no env.json and "
                "config.yaml), so it is never replaced; choose another --out"
            )
        if not force:
            raise OptlabError(f"run directory {shown} exists; pass --force to replace it")
        return path
    anchor = path.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OptlabError(f"cannot create --out {shown}: {str(anchor)!r} is a file, not a folder")
    _require_writable(anchor, f"cannot create --out {shown}")
    return path


def _require_writable(folder: Path, what: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptlabError(f"{what}: no permission to write in {str(folder)!r}")


def check_file_target(
    path: str | Path, suffix: str, force: bool, is_ours: Callable[[Path], bool]
) -> Path:
    """The output check of a command that writes one file (before any work): ``path`` must
    end in ``suffix`` and lie in a writable folder; an existing path is replaced only with
    ``force`` and only when ``is_ours`` says it is a file of the kind written (never a folder,
    a symbolic link or another file)."""
    path = Path(path)
    shown = repr(str(path))
    if path.suffix != suffix:
        raise OptlabError(f"--out {shown} is not a {suffix} file: give one to write, e.g. "
                          f"model{suffix}")  # fmt: skip
    if path.is_dir():
        raise OptlabError(f"--out {shown} is a folder, not a {suffix} file; choose another --out")
    if path.is_symlink():
        raise OptlabError(f"--out {shown} is a symbolic link, not a {suffix} file; give the "
                          "real path or another --out")  # fmt: skip
    if path.exists():
        if not force:
            raise OptlabError(f"{shown} exists; pass --force to replace it")
        if not is_ours(path):
            raise OptlabError(f"--out {shown} exists and is not a {suffix} file, so it is "
                              "never replaced; choose another --out")  # fmt: skip
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OptlabError(f"cannot write --out {shown}: folder {str(parent)!r} does not exist")
    _require_writable(parent, f"cannot write --out {shown}")
    return path


def place_file(staged: Path, target: Path, replace: bool) -> None:
    """Move a finished file into place atomically: over an existing ``target`` only with
    ``replace``; otherwise a ``target`` that appeared meanwhile is kept and an
    :class:`OptlabError` says so (the staged file is removed either way on failure)."""
    try:
        if replace:
            os.replace(staged, target)
        else:
            _rename_no_replace(staged, target)
    except FileExistsError:
        staged.unlink(missing_ok=True)
        raise OptlabError(f"{str(target)!r} appeared while this command worked; it was not "
                          "replaced. Pass --force to replace it") from None  # fmt: skip


def stale_partials(parent: str | Path) -> list[Path]:
    """Staging folders in ``parent`` whose process is gone (killed before it could clean up,
    e.g. by SIGKILL or a power cut): their pid, recorded in the name, no longer runs."""
    parent = Path(parent)
    if os.name != "posix" or not parent.is_dir():
        return []  # no signal-0 probe elsewhere (os.kill on Windows terminates)
    found = []
    for child in sorted(parent.iterdir()):
        match = _PARTIAL.match(child.name)
        if match and child.is_dir() and not _pid_alive(int(match["pid"])):
            found.append(child)
    return found


def clean_stale_partials(parent: str | Path) -> list[Path]:
    """Remove the staging folders of dead runs in ``parent``; return those removed.

    >>> clean_stale_partials("runs")
    [PosixPath('runs/.w50.partial-4242-k2j1')]
    """
    removed = []
    for folder in stale_partials(parent):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed


def read_run_config(folder: str | Path) -> dict[str, Any]:
    """A run's ``config.yaml`` (``folder`` is the run or the file itself) as plain data. YAML
    tags that build Python objects are refused (``yaml.safe_load``), with one line naming
    the file."""
    path = Path(folder)
    path = path / "config.yaml" if path.is_dir() else path
    text = read_text_file(path, "run config", allow_empty=True)
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or first_line(err)
        raise OptlabError(f"{path} is not a plain YAML run config ({problem}); optlab never "
                          "loads Python tags such as !!python/object") from None  # fmt: skip
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise OptlabError(f"{path} holds a {type(config).__name__}, not a run config mapping")
    return config


def require_run_kind(path: str | Path, kinds: set[str], what: str) -> dict[str, Any]:
    """The config of the run at ``path``, refused unless an optlab command in ``kinds`` wrote
    it (its ``config.yaml`` names the command). ``what`` is the command asking.

    >>> require_run_kind("runs/w50", {"prune", "retrain"}, "retrain")
    {'command': 'prune', 'model': 'default', ...}
    """
    wanted = " or ".join(sorted(kinds))
    if not is_run_directory(path):
        raise OptlabError(f"{what} needs a {wanted} run directory; {str(path)!r} is not a run "
                          "directory (no env.json and config.yaml)")  # fmt: skip
    config = read_run_config(path)
    kind = config.get("command")
    if kind not in kinds:
        raise OptlabError(f"{what} needs a {wanted} run; {str(path)!r} is "
                          f"{'a ' + repr(kind) if kind else 'an unnamed'} run")  # fmt: skip
    return config


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def warn_stale_partials(parent: Path) -> None:
    """Say which staging folders of dead runs lie in ``parent`` (each run, and a recipe for
    its ``--out``, looks once before it starts), and how to remove them."""
    stale = stale_partials(parent)
    if stale:
        names = ", ".join(p.name for p in stale[:3]) + (" ..." if len(stale) > 3 else "")
        log.warning("%d staging folder(s) of runs that died in %s: %s; remove them with "
                    "--clean-stale or optlab.core.run.clean_stale_partials(%r)", len(stale),
                    parent, names, str(parent))  # fmt: skip


@functools.cache
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    except OSError:
        return None


def _try_renameat2(source: Path, target: Path, flags: int) -> bool:
    """``renameat2(2)``; False when the system or filesystem lacks it (the caller falls back),
    an :class:`OSError` (``FileExistsError`` for a taken target) when it refuses."""
    call = _renameat2()
    if call is None:
        return False
    done = call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _rename_no_replace(source: Path, target: Path) -> None:
    """Move ``source`` to ``target`` atomically, failing with ``FileExistsError`` if the target
    exists. Fallback: POSIX ``rename`` of a folder fails on a non-empty folder or a file, so
    only an empty folder created in the instant between the check and the rename is lost."""
    if _try_renameat2(source, target, _RENAME_NOREPLACE):
        return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "exists", str(target))
    try:
        os.rename(source, target)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        raise


def _swap_into_place(source: Path, target: Path) -> None:
    """Replace the run at ``target`` by ``source``: one atomic exchange where the system has
    it (no instant without a run at ``target``), else two renames; then drop the old run."""
    if _try_renameat2(source, target, _RENAME_EXCHANGE):
        shutil.rmtree(source, ignore_errors=True)  # the old run, now at the staging path
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "run")
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | torch.Tensor):
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def peak_memory_gb() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA memory when a GPU was used)."""
    import resource

    peak = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return peak


def execute(
    body: Callable[[Run | None], dict[str, Any]],
    *,
    out: str | Path | None,
    config: dict[str, Any],
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    force: bool = False,
) -> tuple[dict[str, Any], Path | None]:
    """The run harness of every command: seed, then ``body(run)`` in a staged run directory
    at ``out`` (``body(None)`` when ``out`` is None). What ``body`` returns is merged into
    ``metrics.json``; the run moves into place only when ``body`` returns, and a failure or
    an interrupt leaves nothing behind. Returns the metrics and the run's path.

    >>> metrics, path = execute(lambda run: {"x": 1}, out="runs/x", config={"command": "x"})
    """
    seed_everything(seed)
    if out is None:
        return body(None), None
    with Run(
        rank_run_path(out), config=config, seed=seed, device=device, dtype=dtype, force=force
    ) as run:
        metrics = body(run)
        run.add_metrics(metrics)
    log.info("run written to %s", run.path)
    return metrics, run.path
