"""Ctrl-C that always stops a command.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread is,
and library code can swallow it: one sent while TensorFlow's AutoGraph
converted the Trainer's first step was lost, and the run went on to push a
model (seen 2 times in 3).  So the first SIGINT raises ``KeyboardInterrupt``
and, until the command has ended, raises it again every few seconds, a few
times: cleanup that runs on the first (a temporary folder removed, ML
Metadata's execution left unfinished) takes well under that.  Renames that
must not be cut in two hold SIGINT back themselves
(``components.dataset_folder.signals_deferred``).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Iterator

RETRY_SECONDS = 5.0
RETRIES = 3


@contextlib.contextmanager
def delivered(retry_seconds: float = RETRY_SECONDS, retries: int = RETRIES) -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` in the block, and raises it again while the block has not ended.

    Only in the main thread, and only over Python's own SIGINT handler: one
    someone else installed (``visiontune serve``'s) is left alone.  Raised
    again by a real SIGINT to the main thread, which also wakes it from a
    blocking wait (``_thread.interrupt_main`` would not).
    """
    main = threading.main_thread()
    if threading.current_thread() is not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    lock = threading.Lock()
    state = {"started": False, "ended": False, "pending": False}

    def again() -> None:
        for _ in range(retries):
            time.sleep(retry_seconds)
            with lock:
                if state["ended"]:
                    return
                state["pending"] = True
                signal.pthread_kill(main.ident, signal.SIGINT)

    def handler(signum, frame):
        with lock:
            retried, state["pending"] = state["pending"], False
            if state["ended"]:
                # A retry sent as the block ended: not the user's; Ctrl-C from now on is Python's again.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                if retried:
                    return
            elif not state["started"]:
                state["started"] = True
                threading.Thread(target=again, name="visiontune-interrupt", daemon=True).start()
        raise KeyboardInterrupt

    previous_hook = sys.unraisablehook

    def unraisable(info) -> None:
        # A KeyboardInterrupt raised where Python cannot propagate it (a
        # ``__del__``, TensorFlow's function cleanup) is printed as "Exception
        # ignored in ..." with a traceback, and lost: the retry delivers it.
        if not isinstance(info.exc_value, KeyboardInterrupt):
            previous_hook(info)

    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        with lock:
            state["ended"] = True
            if not state["pending"]:  # else the handler puts Python's back when that signal arrives
                signal.signal(signal.SIGINT, signal.default_int_handler)
