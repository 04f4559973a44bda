"""The one base class of the errors a user can fix.

The command line prints a ``UserError`` as one line (``visiontune CMD: error:
...``) and exits with status 2, with no traceback unless ``--verbose``.  Every
module raises a subclass that names its own concern (a config key, an input
file, a Vertex setting), so callers can still tell them apart.

No TensorFlow here: the config, the feature names and this module are the
bottom layer that every other part of visiontune may import.
"""


class UserError(Exception):
    """A problem the user can fix (a setting, a path, an input file): one line, exit status 2."""


class ConfigError(UserError, ValueError):
    """A config file or an override names a setting that does not exist or is invalid."""
