"""The one base class of the errors a user can fix, and the failures of the disk that are not bugs.

The command line prints a ``UserError`` as one line (``visiontune CMD: error:
...``) and exits with status 2, with no traceback unless ``--verbose``.  Every
module raises a subclass that names its own concern (a config key, an input
file, a Vertex setting), so callers can still tell them apart.

A full disk, a read-only file system or a folder the user may not write is
not a bug either, but it is met deep inside TFX, Beam or TensorFlow, each of
which wraps the ``OSError`` its own way (Beam re-raises a worker's as a
``RuntimeError`` whose text holds it; TensorFlow's file system raises
``tf.errors`` with the C library's message).  ``disk_problem`` finds it in an
exception's chain or text and says it in one line; anything else stays a
traceback, a bug to report.  ``Interrupted`` is Ctrl-C with what it left.

No TensorFlow here: the config, the feature names and this module are the
bottom layer that every other part of visiontune may import.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from typing import Iterator, Optional, Sequence, Tuple


class UserError(Exception):
    """A problem the user can fix (a setting, a path, an input file): one line, exit status 2."""


class ConfigError(UserError, ValueError):
    """A config file or an override names a setting that does not exist or is invalid."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a command; the message says what it left behind.

    A ``KeyboardInterrupt``, so that whatever cleans up on one still does.  The
    command line prints it as one line and exits with status 130.
    """


# The failures of writing a file that the user fixes outside visiontune: what to do about each.
DISK_ERRNOS = {
    errno.ENOSPC: "free some space, or choose a folder on another disk",
    errno.EDQUOT: "free some space, or choose a folder on another disk",
    errno.EFBIG: "a file would be larger than this process may write (ulimit -f) or the file system allows",
    errno.EROFS: "choose a folder on a writable file system",
    errno.EACCES: "choose a folder you may write, or change its permissions",
    errno.EPERM: "choose a folder you may write, or change its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "choose a shorter path",
}
# "[Errno 28] No space left on device: '/x/y'": how Python writes an OSError, also inside other errors' text.
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] [^\n:\[]*(?:: '([^'\n]*)')?")


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def find_disk_error(error: BaseException) -> Optional[Tuple[int, str]]:
    """(errno, file or "") of a ``DISK_ERRNOS`` failure in ``error``'s chain or text, else None."""
    chain = list(_chain(error))
    for e in chain:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e.errno, str(e.filename or "")
    for e in chain:
        text = str(e)
        for match in _ERRNO_TEXT.finditer(text):
            if int(match.group(1)) in DISK_ERRNOS:
                return int(match.group(1)), match.group(2) or ""
        if "database or disk is full" in text:  # SQLite's SQLITE_FULL: ML Metadata's database
            return errno.ENOSPC, ""
        for code in DISK_ERRNOS:  # TensorFlow's file system: "PATH; No space left on device"
            match = re.search(r"(?:(\S+); )?" + re.escape(os.strerror(code)), text)
            if match:
                return code, match.group(1) or ""
    return None


def was_interrupted(error: BaseException) -> bool:
    """Whether ``error`` is Ctrl-C in a wrapper: Beam re-raises a ``KeyboardInterrupt`` met in a
    transform that runs in this process as a ``RuntimeError``."""
    return any(isinstance(e, KeyboardInterrupt) for e in _chain(error))


def _where(filename: str, folders: Sequence[str]) -> str:
    """What a message names for ``filename``: the user's folder holding it, never a temporary name.

    A file in one of ``folders`` or in a hidden ``.NAME.*`` folder beside one
    (where ingest writes before renaming into place) is named by that folder;
    a file in the system's temporary folder by that folder and TMPDIR.
    """
    folders = [f for f in folders if f]
    if not filename:
        return folders[0] if folders else "writing a file"
    path = os.path.abspath(filename)
    for folder in folders:
        full = os.path.abspath(folder)
        beside = os.path.join(os.path.dirname(full), f".{os.path.basename(full)}.")
        if path == full or path.startswith(full + os.sep) or path.startswith(beside):
            return folder
    temp = os.path.abspath(tempfile.gettempdir())
    if path.startswith(temp + os.sep):
        return f"{temp} (the temporary folder; set TMPDIR to use another)"
    return filename


def disk_problem(error: BaseException, folders: Sequence[str] = ()) -> Optional[str]:
    """One line for a full disk, a read-only or forbidden folder anywhere in ``error``, else None.

    ``folders``: the command's output folders, named instead of files inside
    them; the first is named when the failure does not say which file.
    """
    found = find_disk_error(error)
    if found is None:
        return None
    code, filename = found
    return f"{_where(filename, folders)}: cannot write: {os.strerror(code)}; {DISK_ERRNOS[code]}"
