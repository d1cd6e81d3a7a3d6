"""SIGINT and SIGTERM, from an entry point's first line to its last.

Every entry point calls install() before anything else, and its handler stays for the life of
the process. Until something takes the signals over, a stop raises Stopped: a SystemExit with
code 128 + signum, which the entry point reports in one line (engine.cli); finally blocks
run on the way out, and no `except Exception` swallows it. While a run trains, StopOnSignal
takes them over (take_over: the run stops at the end of its step, with a checkpoint), and in a
sweep the launcher does (its jobs stop so). A taker is told whether the stop is asked
`again`, and returns True to stop at once (Stopped raised where the process was).

The handler is installed even where the process started with SIGINT ignored, as a shell starts
a script's background job (`cmd &`): a SIGINT sent to the process, or a Ctrl-C in the
terminal of the script, stops it as it stops a run in the foreground. (To keep a background
run going past a Ctrl-C, start it in a session of its own: `setsid python -m ...`.)

A signal within SAME_STOP_S of the first is the same stop: `timeout -s INT` signals its
command and then the command's whole process group, so the command gets it twice at once. A
job of a sweep counts every signal (its launcher has told them apart already).
A process forked from this one without exec (a DataLoader worker) leaves stops to its parent.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAME_STOP_S = 1.0

Taker = Callable[[int, bool], bool]  # (signum, again) -> stop at once


class Stopped(SystemExit):
    """A stop signal, raised where the process was: it exits 128 + signum as it unwinds."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


_pid: int | None = None  # the process that installed the handler
_first: tuple[int, float] | None = None  # the first stop: (signum, time.monotonic())
_window = SAME_STOP_S
_taker: Taker | None = None
_unreported: Stopped | None = None  # raised, and not yet reported in a line (see reported)


def install(afresh: bool = False) -> None:
    """Handle SIGINT and SIGTERM from now on (SIGINT also where it was ignored). Again in the
    same process, it keeps what it knows (a stop already asked for), unless `afresh`."""
    global _pid, _first, _window, _taker, _unreported
    if _pid != os.getpid():  # this process's first call (a forked job inherits the state)
        atexit.register(_report_at_exit)
        afresh = True
    if afresh:
        _pid, _first, _window, _taker, _unreported = os.getpid(), None, SAME_STOP_S, None, None
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)


def installed() -> bool:
    """Whether this process's stop signals come here (an entry point's do; a notebook's not)."""
    return _pid == os.getpid() and signal.getsignal(signal.SIGINT) is _on_signal


def count_every_signal() -> None:
    """In a job of a sweep: its launcher sends a second signal only for a second stop."""
    global _window
    _window = 0.0


def requested() -> int | None:
    """The signal that asked this process to stop, if one did."""
    return _first[0] if _first and _pid == os.getpid() else None


def take_over(taker: Taker | None) -> Taker | None:
    """Stops go to `taker(signum, again)`, which returns True to have Stopped raised (None:
    every stop raises it); the taker before it is returned. A stop asked for before is not
    repeated to it: a taker checks requested() first."""
    global _taker
    previous, _taker = _taker, taker
    return previous


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Stops wait until the block has ended (what it writes is written whole)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def unreported() -> Stopped | None:
    """The stop raised in this process, if no line has said so yet: an error raised on its way
    out (a library's cleanup that fails when cut short, say) is that stop, not an error."""
    return _unreported if _pid == os.getpid() else None


def reported(stop: Stopped) -> None:
    """The entry point has said in a line why it stops: nothing more at exit."""
    global _unreported
    if _unreported is stop:
        _unreported = None


def exit_with(stop: Stopped, message: str) -> None:
    """End the process for `stop`, saying `message` in one line (exit 128 + signum)."""
    reported(stop)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(stop.code) from None


def _on_signal(signum: int, frame) -> None:
    global _first, _unreported
    if os.getpid() != _pid:
        return  # a forked worker: its parent stops, and stops it
    now = time.monotonic()
    again = _first is not None
    if again and now - _first[1] < _window:
        return  # the same stop, reaching this process twice
    if not again:
        _first = (signum, now)
    if _taker is not None and not _taker(signum, again):
        return
    _unreported = Stopped(signum)
    raise _unreported


def raise_if_pending() -> None:
    """Raise again a stop that was raised and lost: a signal that landed where its exception
    cannot propagate (a __del__, a callback from C) is ignored there by Python. Called where
    a run is about to do real work, so that such a stop still stops it."""
    if _unreported is not None and _pid == os.getpid():
        raise _unreported


def _report_at_exit() -> None:
    """A stop that came before the entry point could report it (in its imports, say), or that
    was lost on the way: one line, and the process exits 128 + signum whatever it was about to
    return."""
    if _unreported is not None and _pid == os.getpid():
        name = _unreported.name
        print(f"error: stopped by {name} while starting; nothing was done.", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_unreported.code)
