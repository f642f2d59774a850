"""Ctrl-C that stops the command wherever it lands.

Python raises KeyboardInterrupt at whatever bytecode runs when SIGINT arrives. If that is a weakref
callback or a `__del__` (garbage collection frees a finished run's tensors, hooks and environments
at arbitrary points), the exception cannot propagate: Python prints "Exception ignored in ..." and
carries on, so a study interrupted between two runs trained the next one and exited 0.
"""
from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
import time
from typing import Iterator

RETRY_S = 0.05


@contextlib.contextmanager
def deliver_swallowed_interrupts() -> Iterator[None]:
    """Within the block, a KeyboardInterrupt that Python could only ignore is raised again in the main
    code: a helper thread re-sends SIGINT to the main thread until it lands outside such a callback.
    Other unraisable exceptions go to the previous hook. Only Python's own Ctrl-C handling in the
    main thread is replaced (a nested block, or a program with its own SIGINT handler, is left as is)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pending, lock, closed = threading.Event(), threading.Lock(), []
    previous_hook, resender = sys.unraisablehook, []

    def resend() -> None:
        while pending.wait():
            with lock:
                if closed:
                    return
                if hasattr(signal, "pthread_kill"):  # a real signal also ends a blocking call, as Ctrl-C does
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                else:
                    _thread.interrupt_main()
            time.sleep(RETRY_S)

    def deliver_later() -> None:
        pending.set()
        if not resender:
            resender.append(threading.Thread(target=resend, name="resend-ctrl-c", daemon=True))
            resender[0].start()

    def hook(unraisable) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            deliver_later()
        else:
            previous_hook(unraisable)

    def on_sigint(signum, frame) -> None:
        f = frame
        while f is not None:
            if f.f_code is hook.__code__:  # raised here, it would be ignored again: retry shortly
                deliver_later()
                return
            f = f.f_back
        pending.clear()
        raise KeyboardInterrupt

    sys.unraisablehook = hook
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        with lock:
            closed.append(True)
        undelivered = pending.is_set()
        pending.set()  # lets the resender end
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook
    if undelivered:  # the block ended before the re-sent Ctrl-C landed
        raise KeyboardInterrupt
