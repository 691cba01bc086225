"""train.signals: SIGTERM/SIGUSR1 become a stop request, not a death."""

from __future__ import annotations

import os
import signal

from train.signals import EXIT_PREEMPTED, StopRequest


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
