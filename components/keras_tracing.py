"""AutoGraph leaves Keras's own code alone again, as TensorFlow's rules intend.

Inside a ``tf.function`` AutoGraph rewrites Python control flow into graph ops,
but not in libraries it knows need none: its conversion rules
(``tensorflow/python/autograph/core/config.py``) say ``DoNotConvert('keras')``,
so Keras 2's layers always ran as written.  Keras 2 now ships as ``tf_keras``
(the one we use: see ``visiontune/__init__.py``), and that rule does not match
the new name.  Every tf_keras layer's ``call`` -- MobileNetV2 has ~150 -- is
then parsed, rewritten and compiled at every trace: the train, test and predict
functions of each phase and each export signature.  On a tiny run (shapes at
32 px, 1+1 epochs, MobileNetV2-0.35, 2 CPU cores) ``trainer.run_fn`` took
102 s with the conversions and 39 s without; what is computed is the same.

Importing this module adds the same rule for ``tf_keras``.  Code outside
tf_keras -- our own layers, a user's ``preprocessing_fn`` -- is converted as
before.  AutoGraph reads the rules at each conversion (TensorFlow's own
``converter_testing`` replaces them the same way), so the rule holds for
anything traced after the import; ``backbones`` imports this module, so every
model we build is traced with it.
"""

from __future__ import annotations

from tensorflow.python.autograph.core import config as _autograph_config, config_lib as _config_lib

KERAS_PACKAGE = "tf_keras"


def skip_keras_internals() -> None:
    """Puts ``DoNotConvert('tf_keras')`` first in AutoGraph's rules (once)."""
    rules = _autograph_config.CONVERSION_RULES
    if any(isinstance(r, _config_lib.DoNotConvert) and r.matches(KERAS_PACKAGE) for r in rules):
        return
    _autograph_config.CONVERSION_RULES = (_config_lib.DoNotConvert(KERAS_PACKAGE),) + tuple(rules)


skip_keras_internals()
