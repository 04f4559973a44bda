"""Publishing a local file atomically: written aside in the same folder, then renamed over the target.

A reader (a server re-reading its config, a browser on the report) sees the old file or the new one,
never half of one; a write that fails leaves the old file and no temporary one behind.
"""

from __future__ import annotations

import os
from typing import Union


def write_atomically(path: str, data: Union[str, bytes]) -> None:
    """Writes ``data`` (text as UTF-8) to ``path`` through a hidden temporary file in the same folder."""
    path = os.path.abspath(path)
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
