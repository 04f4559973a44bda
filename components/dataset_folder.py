"""A prepared dataset's folder: which files are ours, and the temporary folder the shards go to.

Nothing is left behind by a stopped run: the shards go into a locked
temporary folder next to the output, removed on any failure and on SIGINT,
SIGTERM or SIGHUP (``stop_signals_raise`` turns the last two into an
exception, then re-sends the signal).  A folder left by a SIGKILL is removed
by the next run into the same output.  Only files ingest writes are ever
deleted (``remove_ours``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import tempfile
import threading
from typing import Iterator, List, Optional

from visiontune import features
from visiontune.components.image_listing import EVAL, TEST, TRAIN, PrepareError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks, so leftovers are not cleaned
    fcntl = None

SHARD_PREFIX = "images"
# What ingest writes in a dataset folder; nothing else there is ever deleted.
SPLIT_DIRS = (TRAIN, EVAL, TEST)
# The counts and rejects of the Beam pipeline, read back and removed before the swap.
OUTCOME_FILE = ".ingest_outcome.json"
METADATA_FILES = (features.CLASSES_FILE, features.REJECTS_FILE, features.SUMMARY_FILE, OUTCOME_FILE)
# A shard, or one being written (``ingest_beam`` writes aside, then renames).
_SHARD_NAME = re.compile(re.escape(SHARD_PREFIX) + r"-\d{5}-of-\d{5}\.tfrecord(\.incomplete)?\Z")
# Stopped with the temporary folder removed, then sent again (SIGINT raises KeyboardInterrupt anyway).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
_log = logging.getLogger(__name__)


def shard_name(index: int, count: int) -> str:
    return f"{SHARD_PREFIX}-{index:05d}-of-{count:05d}.tfrecord"


def foreign_entries(folder: str) -> List[str]:
    """Entries of a dataset folder that ``prepare_dataset`` did not write ("SPLIT/name" inside a split)."""
    foreign = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name in SPLIT_DIRS and os.path.isdir(path) and not os.path.islink(path):
            foreign += [f"{name}/{n}" for n in sorted(os.listdir(path))
                        if not (_SHARD_NAME.match(n) and os.path.isfile(os.path.join(path, n)))]
        elif not (name in METADATA_FILES and os.path.isfile(path) and not os.path.islink(path)):
            foreign.append(name)
    return foreign


def remove_ours(folder: str) -> List[str]:
    """Deletes what ``prepare_dataset`` writes in ``folder``, and the folder if that empties it.

    Never anything else: returns what is left.
    """
    try:
        foreign = set(foreign_entries(folder))
    except FileNotFoundError:
        return []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name in SPLIT_DIRS and name not in foreign:
            for shard in os.listdir(path):
                if f"{name}/{shard}" not in foreign:
                    os.remove(os.path.join(path, shard))
            if not any(f.startswith(name + "/") for f in foreign):
                os.rmdir(path)
        elif name not in foreign:
            os.remove(path)
    if not foreign:
        os.rmdir(folder)
    return sorted(foreign)


@contextlib.contextmanager
def temporary_folder(output_dir: str) -> Iterator[str]:
    """A locked ``.NAME.tmp-*`` folder next to ``output_dir``, removed (our files) unless renamed."""
    parent, base = os.path.split(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    _clean_leftovers(parent, base, output_dir)
    tmp_dir = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    lock = _lock(tmp_dir)  # a live run's folder: the next run's clean-up leaves it alone
    try:
        yield tmp_dir
    except BaseException:
        _remove_quietly(tmp_dir)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _remove_quietly(folder: str) -> None:
    """``remove_ours``, with a warning instead of an error for what stays (cleanup must not mask why)."""
    try:
        left = remove_ours(folder)
    except OSError as e:
        _log.warning("%s: could not remove it: %s", folder, e)
        return
    if left:
        _log.warning("%s: kept: it holds files visiontune prepare did not write: %s",
                     folder, ", ".join(left[:5]))


def _lock(folder: str, wait: bool = True) -> Optional[int]:
    """An exclusive ``flock`` on ``folder`` (None: no ``fcntl``, or held by another process)."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _clean_leftovers(parent: str, base: str, output_dir: str) -> None:
    """Removes what killed runs into ``output_dir`` left: ``.NAME.tmp-*`` and ``.NAME.old-*``.

    A folder another live run holds locked means that run is writing this
    output now: refused.  A run killed between its two renames left no output
    and the previous dataset under ``.old-``: it is put back first.
    """
    if fcntl is None:
        return
    names = sorted(n for n in os.listdir(parent) if n.startswith((f".{base}.tmp-", f".{base}.old-")))
    locks = []
    try:
        for name in names:
            lock = _lock(os.path.join(parent, name), wait=False)
            if lock is None:
                raise PrepareError(f"{output_dir}: another visiontune prepare is writing it now "
                                   f"({os.path.join(parent, name)} is in use); wait for it to end")
            locks.append(lock)
        olds = [n for n in names if n.startswith(f".{base}.old-")]  # our renamed outputs
        if olds and not os.path.lexists(output_dir):
            newest = max(olds, key=lambda n: os.path.getmtime(os.path.join(parent, n)))
            os.rename(os.path.join(parent, newest), output_dir)
            names.remove(newest)
        for name in names:
            _remove_quietly(os.path.join(parent, name))
    finally:
        for lock in locks:
            os.close(lock)


class _Stopped(BaseException):
    """SIGTERM or SIGHUP arrived during ingest (a BaseException: nothing may swallow it)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Turns SIGTERM and SIGHUP into ``_Stopped`` (where they would kill the process), so that
    cleanup runs; then sends the signal again, to end as it would have ended.

    Only in the main thread, and only for signals with their default action:
    a handler someone else installed is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopped: List[int] = []

    def handler(signum, frame):
        if not stopped:  # a second signal during the cleanup must not abort it
            stopped.append(signum)
            raise _Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS if signal.getsignal(s) == signal.SIG_DFL}
    try:
        yield
    except _Stopped as e:
        for signum, action in previous.items():
            signal.signal(signum, action)
        previous = {}
        os.kill(os.getpid(), e.signum)
        raise SystemExit(128 + e.signum) from None
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Holds SIGINT, SIGTERM and SIGHUP back for a few renames that must not be cut in two.

    Their handlers only note them meanwhile; each noted signal is sent again
    afterwards, to the handler it had.  (Blocking them with ``pthread_sigmask``
    would not do: another thread, tqdm's monitor, could still take them.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: List[int] = []
    previous = {}
    for signum in (signal.SIGINT, *STOP_SIGNALS):
        if signal.getsignal(signum) is not None:  # None: set outside Python, left alone
            previous[signum] = signal.signal(signum, lambda s, frame: noted.append(s))
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)
        for signum in dict.fromkeys(noted):
            os.kill(os.getpid(), signum)
