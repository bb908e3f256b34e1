"""A per-test time box for pytest, without the pytest-timeout package (``-p pytest_time_box``).

``--time-box=SECONDS``: a test still running after ``SECONDS`` fails with "exceeded its time box"
(``SIGALRM``; the next test runs). A test stuck inside C code (a hung kernel, a blocked
synchronize) cannot see that signal: ``SECONDS + 15`` later ``faulthandler`` prints every thread's
stack and ends the process, so one hang cannot eat the rest of a time-limited run.
Main thread on POSIX only; elsewhere the option is ignored.
"""
from __future__ import annotations

import faulthandler
import signal
import sys
import threading

import pytest

HARD_EXTRA_S = 15.0


def pytest_addoption(parser):
    parser.addoption("--time-box", type=float, default=0.0, metavar="SECONDS",
                     help="fail a test that runs longer than SECONDS; end the process SECONDS+15 s in")


def _usable(item) -> float:
    box = item.config.getoption("--time-box")
    ok = box > 0 and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    return box if ok else 0.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    box = _usable(item)
    if not box:
        yield
        return

    def expired(signum, frame):
        pytest.fail(f"{item.nodeid} exceeded its time box of {box:g} s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, box)
    faulthandler.dump_traceback_later(box + HARD_EXTRA_S, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
