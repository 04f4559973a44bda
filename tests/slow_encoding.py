"""A command that encodes images slowly, and says which of its processes do: to stop it mid-encoding.

``slow_encoding_env`` gives a subprocess (and the Beam workers it starts,
which inherit ``PYTHONPATH``) a ``sitecustomize`` that makes every image
encoding write the process id into a folder and take 0.2 s;
``wait_until_encoding`` waits for the first one.  Shared by
test_ingest_faults.py and test_errors_cli.py (Ctrl-C and kills during ``prepare``).
"""

from __future__ import annotations

import os
import textwrap
import time
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SLOW_ENCODE = textwrap.dedent("""
    import os, time
    from visiontune.components import image_encoding

    encode = image_encoding.encode_example

    def slow(*args, **kwargs):
        open(os.path.join(os.environ["VISIONTUNE_TEST_PIDS"], str(os.getpid())), "w").close()
        time.sleep(0.2)
        return encode(*args, **kwargs)

    image_encoding.encode_example = slow
""")


def slow_encoding_env(tmp_path) -> Tuple[str, Dict[str, str]]:
    """(the folder the encoding processes write their ids into, the environment that makes them slow)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_ENCODE)
    pids = tmp_path / "pids"
    pids.mkdir()
    env = dict(os.environ, VISIONTUNE_TEST_PIDS=str(pids), PYTHONPATH=os.pathsep.join(
        [str(tmp_path / "site"), REPO] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return str(pids), env


def wait_until_encoding(proc, pids: str, timeout: float = 120) -> List[str]:
    """The ids of the processes encoding once one is (or ``proc`` ended, or ``timeout`` passed: then none)."""
    deadline = time.monotonic() + timeout
    while not os.listdir(pids) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.listdir(pids)
