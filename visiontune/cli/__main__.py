"""``python -m visiontune.cli``: the same as the ``visiontune`` command."""

import sys

from visiontune.cli import main

sys.exit(main())
