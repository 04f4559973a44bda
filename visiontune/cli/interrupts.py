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

import _thread
import contextlib
import signal
import threading
from typing import Iterator

RETRY_SECONDS = 5.0
RETRIES = 3


@contextlib.contextmanager
def delivered(retry_seconds: float = RETRY_SECONDS, retries: int = RETRIES) -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` in the block, and raises it again while the block has not ended.

    Only in the main thread, and only over Python's own SIGINT handler: one
    someone else installed (``visiontune serve``'s) is left alone.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    ended = threading.Event()
    started = []

    def again() -> None:
        for _ in range(retries):
            if ended.wait(retry_seconds):
                return
            _thread.interrupt_main()  # runs the SIGINT handler in the main thread, as a signal would

    def handler(signum, frame):
        if not started:
            started.append(threading.Thread(target=again, name="visiontune-interrupt", daemon=True))
            started[0].start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        ended.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
