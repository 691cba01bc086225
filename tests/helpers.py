"""Shared test utilities: free ports, subprocess runs of the real `slm` under real launchers, `slm` in this
process for its refusals, and builds shared by the pytest workers of one run."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
SHAKESPEARE = str(REPO / "data" / "tinyshakespeare.txt")
SELF_INSTRUCT = str(REPO / "data" / "self_instruct_seed_tasks.jsonl")
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A port the OS says is free right now (tests run concurrently: never hard-code one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_path() -> str:
    """PATH with the venv's bin first. DeepSpeed JIT-builds its CPU comm op with whichever ninja is on PATH,
    and two ninja versions hash the shared build cache differently: mixing them rebuilds it every start."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join([str(BIN)] + [p for p in parts if p != str(BIN)])


def test_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a subprocess under test: offline, the venv's tools first on PATH."""
    env = dict(os.environ)
    env.update(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        PATH=venv_path(),
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update(extra or {})
    return env


test_env.__test__ = False  # not a test, whatever modules import it


def slm_cmd(args: Sequence[str], nproc: int = 1) -> List[str]:
    """`slm ARGS` as one plain process (nproc=1) or under torchrun with `nproc` CPU processes."""
    if nproc == 1:
        return [sys.executable, "-m", "launch", *args]
    return [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "launch",
        *args,
    ]


def _children_by_parent() -> Dict[int, List[int]]:
    """Every live process's children, read from /proc/PID/stat (this kernel has no /proc/PID/task/*/children)."""
    children: Dict[int, List[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_name = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while we looked
        children.setdefault(int(after_name[1]), []).append(int(stat_file.parent.name))
    return children


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every process under it, as a machine failure would, then reap it.

    torchrun starts its workers in sessions of their own, so killing torchrun or its process group leaves them
    training (and saving) on their own. Each process is stopped before its children are read, so none is
    started between the look and the kill."""
    stopped, pending = [], [proc.pid]
    while pending:
        pid = pending.pop()
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            continue
        stopped.append(pid)
        pending.extend(_children_by_parent().get(pid, []))
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def run(
    cmd: Sequence[str],
    timeout: float = 300,
    env: Optional[Dict[str, str]] = None,
    check: bool = True,
    cwd: Optional[str] = None,
) -> subprocess.CompletedProcess:
    """Run a command; on an unexpected exit code fail with its full output."""
    proc = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or test_env(),
        cwd=cwd or str(REPO),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def _exit_code(code: object) -> int:
    """The exit status a process would have for `sys.exit(code)`."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits 1
    return 1


_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1") if hasattr(signal, name)
)


def _all_loggers() -> List[logging.Logger]:
    loggers = logging.Logger.manager.loggerDict.values()
    return [logging.getLogger(), *(logger for logger in loggers if isinstance(logger, logging.Logger))]


def _off_capsys_streams(capsys, captured: Tuple) -> None:
    """Point every log handler that holds one of capsys's streams (`captured`: its stdout and stderr) at the
    process's own stream instead. Libraries imported during a command (DeepSpeed, transformers) create their
    handlers on the sys.stdout/sys.stderr of that moment, and keep them for the life of the process: left on capsys's
    streams, closed when the test ends, every later log line of theirs would fail."""
    with capsys.disabled():
        own = (sys.stdout, sys.stderr)
    for logger in _all_loggers():
        for handler in logger.handlers:
            # no StreamHandler, or one that looks sys.stderr up at each line (logging.lastResort's kind)
            if "stream" not in vars(handler):
                continue
            for old, new in zip(captured, own):
                if handler.stream is old:
                    handler.stream = new
                flush = vars(handler).get("flush")  # transformers binds its handler's flush to the stream's
                if flush is not None and getattr(flush, "__self__", None) is old:
                    handler.flush = new.flush


def slm_in_process(capsys, *args) -> Tuple[int, str, str]:
    """`slm ARGS` through the CLI's main in this process: (exit code, stdout, stderr) as a subprocess would give
    them (SystemExit, argparse's included, becomes the code), without a process start-up (several seconds on a busy
    machine) each time. For refusals and quick commands that never start a process group: `slm train` starts its
    process group before its checks, so it runs as a subprocess (slm_cmd).

    What a command changes of the process is put back (environment, working folder, log handlers and levels, signal
    handlers, torch's thread count, default dtype and grad mode), and log handlers that libraries create on capsys's
    streams are moved off them; a process group left started fails the test, since the tests that follow would
    inherit it.
    """
    import torch
    import torch.distributed as dist

    from launch.cli import main

    argv = [str(a) for a in args]
    assert argv[:1] != ["train"], "slm train starts its process group before its checks: run it with slm_cmd"
    capsys.readouterr()
    captured = (sys.stdout, sys.stderr)
    environ, cwd = dict(os.environ), os.getcwd()
    loggers = [
        (logger, list(logger.handlers), logger.level, logger.propagate, logger.disabled)
        for logger in _all_loggers()
    ]
    handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    group_before = dist.is_available() and dist.is_initialized()
    try:
        code = main(argv)
    except SystemExit as exited:
        code = _exit_code(exited.code)
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
        os.chdir(cwd)
        for logger, kept, level, propagate, disabled in loggers:
            logger.handlers[:] = kept
            logger.setLevel(level)
            logger.propagate, logger.disabled = propagate, disabled
        _off_capsys_streams(capsys, captured)
        for sig, handler in handlers.items():
            if signal.getsignal(sig) is not handler and handler is not None:
                signal.signal(sig, handler)
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        group_left = not group_before and dist.is_available() and dist.is_initialized()
        if group_left:
            dist.destroy_process_group()
    out, err = capsys.readouterr()
    assert not group_left, f"slm {' '.join(argv)} started a process group: run it as a subprocess (slm_cmd)"
    return code, out, err


def _listing(folder: Path) -> Dict[str, list]:
    """Every entry under `folder` with its size and modification time: what a test that writes there changes."""
    listing = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        is_dir = stat.S_ISDIR(st.st_mode)
        listing[str(path.relative_to(folder))] = [is_dir, 0 if is_dir else st.st_size, st.st_mtime_ns]
    return listing


_SHARED: Dict[Path, Path] = {}
"""The builds this process took from built_once_per_run: folder -> its marker (with the folder's listing)."""


def built_once_per_run(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `name` built by `build(folder)` once per pytest run, shared by every xdist worker of the run.

    Under xdist the workers' base temp folders share a parent, made fresh for each run: the build happens there,
    under an fcntl lock on NAME.lock, by the first worker that asks; the others wait on the lock, then find the
    NAME.done marker and take the folder as it is. Without xdist it goes in this session's base temp folder. A build
    that fails leaves no marker: its partial folder is removed and the next caller builds again. The lock has no
    timeout (a build hung in one worker holds up the others until that worker's own timeouts end it), and a build
    must not wait on another name's lock that a build of that name waits on.

    The folder is shared: tests read it and never write into it (copy it first). The tests' conftest checks at the
    end of each worker's session that it is unchanged (shared_builds_unchanged).
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            partial = done.with_suffix(".partial")
            partial.write_text(json.dumps(_listing(folder)))
            partial.replace(done)  # the marker appears whole, after the build
    _SHARED[folder] = done
    return folder


def shared_builds_changed() -> List[str]:
    """The entries of this process's shared builds that were added, removed or rewritten since their build."""
    changed = []
    for folder, done in _SHARED.items():
        before, now = json.loads(done.read_text()), _listing(folder)
        changed += [
            f"{folder / entry}"
            for entry in sorted(set(before) | set(now))
            if before.get(entry) != now.get(entry)
        ]
    return changed
