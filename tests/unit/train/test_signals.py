"""train.signals: SIGTERM/SIGUSR1/SIGINT become a stop request, not a death; a second Ctrl-C aborts at once (130)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.helpers import REPO, test_env
from train.signals import EXIT_ABORTED, EXIT_PREEMPTED, StopRequest

SCRIPT = """
import os, signal, sys
from train.signals import StopRequest
stop = StopRequest().install()
os.kill(os.getpid(), signal.SIGINT)
print("requested", stop.requested, stop.signal_name, flush=True)
if sys.argv[1] == "twice":
    os.kill(os.getpid(), signal.SIGINT)
    print("still running", flush=True)
"""


def test_stop_request_catches_sigterm_and_sigusr1():
    assert EXIT_PREEMPTED == 3
    previous = signal.getsignal(signal.SIGUSR1)
    request = StopRequest().install()
    try:
        assert not request.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.requested and request.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing, and does not kill us
        assert request.signal_name == "SIGUSR1"
    finally:
        request.restore()
    assert signal.getsignal(signal.SIGUSR1) == previous


def run_script(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        env=test_env(),
        cwd=str(REPO),
        timeout=60,
    )


def test_first_ctrl_c_only_requests_a_stop():
    proc = run_script("once")
    assert proc.returncode == 0, proc.stderr
    assert "requested True SIGINT" in proc.stdout and "KeyboardInterrupt" not in proc.stderr
    assert "received SIGINT: finishing this step, then checkpointing" in proc.stderr


def test_second_ctrl_c_aborts_at_once():
    proc = run_script("twice")
    assert proc.returncode == EXIT_ABORTED == 130
    assert "still running" not in proc.stdout and "second Ctrl-C: aborting now" in proc.stderr
